"""The update phase on packed rows: old/ref log-prob passes and minibatch steps without padding.

Dims (llds_jax/__init__.py): B rollout rows, R response tokens, A micro-batches, D embed; from
packing.py: Bp packed sequences of Lp tokens (a micro-batch holds Bpm of them), Tk loss-token
positions kept per sequence, Bm row slots per micro-batch.

Layouts come from `packing.py`. The model runs on the packed `Bp×Lp` grid (segment ids keep rows
apart) and the unembedding only on its loss-token positions (`Bp×Tk`); the per-token log-probs
and entropies are gathered back to a row grid (`B×R`, or `Bm×R`
per micro-batch) and the unchanged `losses.policy_loss` runs there. A minibatch holds the same
rows as the padded path's minibatch; its micro-batches are token budgets (Bpm sequences), so
their row counts differ, and `micro_scales` weights each micro-batch's means by its share of the
minibatch's denominators. Summed, they give the minibatch loss and gradient of the padded path
with one micro-batch (`num_micro = 1`) exactly, whatever the micro-batch split: unlike the
official fixed-size micro-batches (mean of micro-batch means), micro-batching no longer changes
the loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llds_jax import hosts, losses, packing, sharding as shd
from llds_jax.logprobs import token_logprobs
from llds_jax.train_step import (StepConfig, TrainState, accumulate_micro, place_batch,
                                 train_step)

SEQ_KEYS = packing.SEQ_KEYS  # Bp×Lp tokens, positions, segment ids; Bp×Tk loss positions
ROW_KEYS = ("loss_mask", "adv", "old_logp", "ref_logp", "answer_weight")  # gathered per row slot


def packed_logprobs(graphdef, params, seqs: dict, *, step_cfg: StepConfig,
                    with_entropy: bool = True):
  """(logp_BpxTk, entropy_BpxTk) at each sequence's `keep` positions: log p of the token after
  each, from that position's hidden state.

  Only positions that predict a loss token get logits: prompts, observations and padding cost
  the transformer but not the `D×V` unembedding (the padded path computes it on all of `B×R`).
  The gather runs along each sequence, so it stays local to the sequence's shard.
  """
  model = nnx.merge(graphdef, params)
  ids_BpxLp, seg_BpxLp, keep_BpxTk = seqs["input_ids"], seqs["segment_ids"], seqs["keep"]
  h_BpxLpxD, _ = model.hidden(ids_BpxLp, seqs["positions"], seg_BpxLp > 0,
                              segment_ids_BxT=seg_BpxLp)
  tgt_BpxLp = jnp.concatenate([ids_BpxLp[:, 1:], jnp.zeros_like(ids_BpxLp[:, :1])], axis=1)
  h_BpxTkxD = jnp.take_along_axis(h_BpxLpxD, keep_BpxTk[:, :, None], axis=1)
  tgt_BpxTk = jnp.take_along_axis(tgt_BpxLp, keep_BpxTk, axis=1)
  return token_logprobs(h_BpxTkxD, model.unembed(), tgt_BpxTk,
                        chunk_size=step_cfg.chunk_size, temperature=step_cfg.temperature,
                        with_entropy=with_entropy)


def _take(x_BpxTk, gather_BxR):
  return jnp.take(x_BpxTk.reshape(-1), gather_BxR, axis=0)


def blocked_packed_logprobs(graphdef, params, seqs: dict, gather_BxR, *, step_cfg: StepConfig,
                            block: int = 0):
  """Response log-probs `B×R` (no entropy) of a packed rollout batch, `block` sequences per
  block (0 = `step_cfg.logprob_rows`; the packed counterpart of `train_step.blocked_logprobs`)."""
  q = seqs["input_ids"].shape[0]
  block = block or step_cfg.logprob_rows
  rows = min(block, q) if block else q
  if q % rows:
    raise ValueError(f"{q} packed sequences do not split into log-prob blocks of {rows}")
  fn = lambda s: packed_logprobs(graphdef, params, s, step_cfg=step_cfg,  # noqa: E731
                                 with_entropy=False)[0]
  if rows == q:
    logp_BpxTk = fn(seqs)
  else:
    blocks = {k: shd.constrain(v.reshape(q // rows, rows, -1), (None, "batch", None))
              for k, v in seqs.items()}
    logp_BpxTk = jax.lax.map(fn, blocks).reshape(q, -1)
  return shd.constrain(_take(logp_BpxTk, gather_BxR), ("batch", None))


def micro_scales(mask_AxBmxR, adv_AxBm) -> dict[str, jax.Array]:
  """Each micro-batch's share of the minibatch's loss denominators (`policy_loss(scales=...)`).

  "token": loss tokens; "seq": rows with loss tokens (seq-mean-token-mean); "resp": preserving
  (Â ≥ 0) rows with loss tokens (LLDS norm "response"). Each is count_a / max(Σ_a count_a, 1).
  """
  m_AxBmxR = mask_AxBmxR.astype(jnp.float32)
  n_AxBm = jnp.sum(m_AxBmxR, axis=2)
  has_AxBm = (n_AxBm > 0).astype(jnp.float32)
  pres_AxBm = has_AxBm * (adv_AxBm >= 0)
  share = lambda c_AxBm: jnp.sum(c_AxBm, 1) / jnp.maximum(jnp.sum(c_AxBm), 1.0)  # noqa: E731
  return {"token": share(n_AxBm), "seq": share(has_AxBm), "resp": share(pres_AxBm)}


def micro_objective(logp_BpxTk, ent_BpxTk, micro: dict, loss_cfg: losses.LossConfig):
  """One micro-batch's share of the minibatch loss, from its packed per-token log-probs."""
  logp_BmxR, ent_BmxR = _take(logp_BpxTk, micro["gather"]), _take(ent_BpxTk, micro["gather"])
  scales = micro["scales"]
  ref = micro["ref_logp"] if loss_cfg.kl_coef else None
  total, metrics = losses.policy_loss(
      logp_BmxR, micro["old_logp"], micro["adv"], micro["loss_mask"], loss_cfg, ref_logp_BxT=ref,
      entropy_BxT=ent_BmxR, answer_weight_BxT=micro["answer_weight"], scales=scales)
  metrics["entropy"] = losses.masked_mean(jax.lax.stop_gradient(ent_BmxR),
                                          micro["loss_mask"]) * scales["token"]
  return total, metrics


def _packed_micro_loss(params, graphdef, micro: dict, step_cfg: StepConfig):
  logp_BpxTk, ent_BpxTk = packed_logprobs(graphdef, params, micro, step_cfg=step_cfg)
  return micro_objective(logp_BpxTk, ent_BpxTk, micro, step_cfg.loss)


def packed_minibatch_grads(params, batch: dict, *, graphdef, step_cfg: StepConfig,
                           grad_shardings=None):
  """(float32 grads, metrics) of one packed minibatch: Σ over its A token-budget micro-batches."""
  micros = {k: shd.constrain(batch[k], (None, "batch", *([None] * (batch[k].ndim - 2))))
            for k in SEQ_KEYS + ("gather",) + ROW_KEYS}
  micros["scales"] = micro_scales(batch["loss_mask"], batch["adv"])
  return accumulate_micro(params, micros, lambda p, m: _packed_micro_loss(p, graphdef, m, step_cfg),
                          divisor=1, grad_shardings=grad_shardings)


class PackedPrograms:
  """The jitted packed passes of an `Updater` (same params, mesh and step config)."""

  def __init__(self, updater):
    mesh, step_cfg, graphdef = updater.mesh, updater.step_cfg, updater.graphdef
    rep = shd.replicated(mesh)
    row = lambda nd: shd.batch_sharding(mesh, nd)  # noqa: E731
    # Micro-batch stacks: A whole, sequences / row slots over the row shards.
    stack = lambda nd: jax.sharding.NamedSharding(  # noqa: E731
        mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp"), *([None] * (nd - 2))))
    self.seq_shardings = {k: row(2) for k in SEQ_KEYS}
    self.step_shardings = {k: stack(3) for k in SEQ_KEYS + ("gather", "old_logp", "ref_logp",
                                                          "loss_mask", "answer_weight")}
    self.step_shardings["adv"] = stack(2)
    self.step = shd.OnMesh(jax.jit(
        lambda s, b: train_step(s, b, graphdef=graphdef, tx=updater.tx,
                                schedule=updater.schedule, step_cfg=step_cfg,
                                grad_shardings=updater.param_shardings,
                                grads_fn=packed_minibatch_grads),
        in_shardings=(updater.state_shardings, self.step_shardings),
        out_shardings=(updater.state_shardings, rep), donate_argnames=("s",)), mesh)
    self.logprobs = shd.OnMesh(jax.jit(
        lambda p, s, g, block: blocked_packed_logprobs(graphdef, p, s, g, step_cfg=step_cfg,
                                                       block=block),
        in_shardings=(updater.param_shardings, self.seq_shardings, row(2)),
        out_shardings=row(2), static_argnums=3), mesh)

    def select(placed, rows_AxBm):
      # Padding slots index past the last row: mode="fill" gives them zeros (no loss tokens).
      return {k: jnp.take(placed[k], rows_AxBm, axis=0, mode="fill", fill_value=0)
              for k in ROW_KEYS}

    self.select_rows = jax.jit(select, out_shardings={k: self.step_shardings[k]
                                                      for k in ROW_KEYS})
    self.row_shardings = row(2)


def _place(arrs: dict, shardings: dict, axis: int) -> dict:
  """Arrays every process computed identically → global arrays: each passes its own slice of
  `axis` (the one split over the row shards; hosts own contiguous blocks, `hosts.split`)."""
  out = {}
  for k, x in arrs.items():
    local = np.moveaxis(np.asarray(hosts.split(np.moveaxis(x, axis, 0))), 0, axis)
    out[k] = jax.make_array_from_process_local_data(shardings[k], local, x.shape)
  return out


def sequences_used(batch: dict, rows, seq_len: int) -> int:
  """Packed sequences of `seq_len` that `rows` of a padded host batch need (`first_fit`)."""
  p_B, r_B = packing.row_extents(batch["attn_mask"][rows], batch["input_ids"].shape[1]
                                 - batch["loss_mask"].shape[1])
  return packing.first_fit(p_B + r_B, seq_len)[2]


def block_size(used: int, most: int, row_shards: int) -> int:
  """Sequences per log-prob block for `used` sequences: at most `most` (0 = no limit).

  The blocks are balanced (`used` split into ceil(used / most) blocks of equal size, bucketed
  by `packing.few_shapes`), so a pass pays at most one bucket step of empty sequences: rounding
  `used` up to whole blocks of `most` cost up to a whole block (21 sequences in blocks of 16
  ran 32, now 24).
  """
  blocks = -(-used // most) if most else 1
  size = packing.round_up(packing.few_shapes(-(-max(used, 1) // blocks)), row_shards)
  return min(size, most) if most else size


def micro_size(used_I: list[int], most: int, row_shards: int) -> tuple[int, int]:
  """(sequences per micro-batch Bpm, micro-batches per minibatch A) for minibatches needing
  `used_I` sequences: the Bpm ≤ `most` with the fewest sequences in all (`most` 0: A = 1).

  All minibatches of a phase run one compiled step, A×Bpm sequences each, A the most any needs
  (bucketed). A minibatch needing 12 sequences with `most` 8 ran 2×8; 2×6 holds it with a
  quarter fewer slots. Ties go to the larger Bpm (fewer, bigger micro-batches).
  """
  if not most:
    return packing.round_up(packing.few_shapes(max(used_I)), row_shards), 1
  best = None
  for qm in range(row_shards, most + 1, row_shards):
    if qm != most and packing.few_shapes(qm) != qm:
      continue  # only bucketed sizes (and `most`): few compiled shapes across steps
    a = packing.few_shapes(max(-(-u // qm) for u in used_I))
    if best is None or a * qm <= best[0] * best[1]:
      best = (a, qm)
  return best[1], best[0]


def phase_layout(batch: dict, step_cfg: StepConfig, row_shards: int, *, minibatch: int,
                 ppo_epochs: int = 1, shuffle_seed: int | None = None) -> dict:
  """Host side of a packed update phase: the log-prob pass's sequences (`logprob`, with its
  `block` size) and every minibatch step's stacked micro-batches (`steps`, in step order).

  `batch` holds all rows' input_ids / attn_mask / loss_mask (padded). Minibatches are contiguous
  row blocks, or a permutation per epoch with `shuffle_seed`, as in `train_step.update_phase`.
  """
  n = batch["input_ids"].shape[0]
  if n % minibatch:
    raise ValueError(f"rollout rows {n} not divisible by rl.minibatch_size={minibatch}")
  # A batch that needs fewer sequences than a block (or a micro-batch) gets a smaller one:
  # short rollouts would otherwise pay for pack_len × logprob_rows slots of padding.
  block = block_size(sequences_used(batch, np.arange(n), step_cfg.pack_len), step_cfg.logprob_rows,
                     row_shards)
  lp = packing.pack_rows(batch, np.arange(n), step_cfg.pack_len, seq_multiple=block)
  steps = [(e, i) for e in range(ppo_epochs) for i in range(n // minibatch)]
  orders = {e: (np.arange(n) if shuffle_seed is None
                else np.random.default_rng((shuffle_seed, e)).permutation(n))
            for e in range(ppo_epochs)}
  mb_rows = [orders[e][i * minibatch:(i + 1) * minibatch] for e, i in steps]
  qm, a = micro_size([sequences_used(batch, r, step_cfg.pack_len) for r in mb_rows],
                     step_cfg.pack_micro_seqs, row_shards)
  layouts = [packing.minibatch_layout(batch, r, step_cfg.pack_len, qm) for r in mb_rows]
  return dict(logprob=lp, block=block, steps=packing.stack_micro(layouts, n, row_shards, micro=a))


def packed_update_phase(updater, state: TrainState, batch: dict, ref_params, *, minibatch: int,
                        ppo_epochs: int = 1, shuffle_seed: int | None = None, progress=None):
  """`train_step.update_phase` on packed rows: same minibatch rows, same steps, no padding."""
  step_cfg, progs = updater.step_cfg, updater.packed
  row_shards = updater.mesh.shape["data"] * updater.mesh.shape["fsdp"]
  placed = place_batch({k: batch[k] for k in ("loss_mask", "adv", "answer_weight")},
                       updater.batch_shardings)
  # A minibatch's rows may live on other hosts: every process packs all rows (the same layout
  # everywhere) and places its own slice of the sequences.
  batch = {k: hosts.gather_rows(batch[k]) for k in ("input_ids", "attn_mask", "loss_mask")}
  lay = phase_layout(batch, step_cfg, row_shards, minibatch=minibatch, ppo_epochs=ppo_epochs,
                     shuffle_seed=shuffle_seed)
  lp, block = lay["logprob"], lay["block"]
  seqs = _place({k: lp[k] for k in SEQ_KEYS}, progs.seq_shardings, axis=0)
  gather = _place({"g": lp["gather"]}, {"g": progs.row_shardings}, axis=0)["g"]
  placed["old_logp"] = progs.logprobs(state.params, seqs, gather, block)
  if step_cfg.loss.kl_coef:
    placed["ref_logp"] = progs.logprobs(ref_params, seqs, gather, block)
  else:
    placed["ref_logp"] = jnp.zeros_like(placed["old_logp"])
  batch_stats = updater.lld_stats(placed["old_logp"], placed["adv"], placed["loss_mask"],
                                  placed["ref_logp"])
  metrics = []
  for st in (progress(lay["steps"]) if progress else lay["steps"]):
    mb = progs.select_rows(placed, jnp.asarray(st["rows"]))
    mb.update(_place({k: st[k] for k in SEQ_KEYS + ("gather",)}, progs.step_shardings, axis=1))
    state, m = progs.step(state, mb)
    metrics.append(m)
  return updater.advance(state), metrics, batch_stats


def abstract_inputs(updater, lay: dict) -> dict:
  """ShapeDtypeStructs of the packed programs' inputs for a `phase_layout` (tools/dry_run.py):
  `seqs`, `gather` and `block` of the log-prob pass, `minibatch` of one step (all steps of a
  phase share its shape)."""
  progs, st = updater.packed, lay["steps"][0]
  sds = lambda x, dt, sh: jax.ShapeDtypeStruct(x.shape, dt, sharding=sh)  # noqa: E731
  lp = lay["logprob"]
  a, m, r = st["gather"].shape
  rows_sh = {k: jax.ShapeDtypeStruct((a, m) if k == "adv" else (a, m, r), jnp.float32,
                                     sharding=progs.step_shardings[k])
             for k in ROW_KEYS}
  return dict(seqs={k: sds(lp[k], jnp.int32, progs.seq_shardings[k]) for k in SEQ_KEYS},
              gather=sds(lp["gather"], jnp.int32, progs.row_shardings), block=lay["block"],
              minibatch=rows_sh | {k: sds(st[k], jnp.int32, progs.step_shardings[k])
                                   for k in SEQ_KEYS + ("gather",)})
