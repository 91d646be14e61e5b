"""The jitted, mesh-sharded update: TrainState, optimizer, log-prob passes and the update phase.

Dims (llds_jax/__init__.py): B rollout rows, L = P + R tokens per row (left-padded prompt of P, right-padded response
of R), A micro-batches per minibatch, D embed, V vocab.

A rollout batch is laid out as `[prompt | response]` with the prompt left-padded, so the response
region is the fixed slice `[P, L)` and the hidden states that predict it are `[P-1, L-1)`. Every
loss term lives on that `B×R` grid; `loss_mask_BxR` is 1 exactly on model-sampled tokens.

Why several optimizer steps per rollout: the LLDS term compares the current policy with the
policy that produced the rollout (old log-probs, fixed once per rollout). With a single optimizer
step per rollout it is identically zero (PAPER.md §B.2), so `update_phase` computes old and
reference log-probs once and then takes `ppo_epochs × B / minibatch` steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from llds_jax import losses, sharding as shd
from llds_jax.logprobs import token_logprobs

BATCH_KEYS = ("input_ids", "attn_mask", "positions", "loss_mask", "adv", "old_logp", "ref_logp",
              "answer_weight")


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # completed training (rollout) steps; the lr schedule reads it
  opt_step: jax.Array  # optimizer updates applied
  params: Any  # nnx.State of the policy's parameters
  opt_state: Any
  skipped: jax.Array  # updates skipped because the loss or a gradient was non-finite


def lr_schedule(opt) -> Callable[[jax.Array], jax.Array]:
  """Linear warmup from 0 over `warmup_steps` training steps, then constant (official verl)."""
  warm = max(int(opt.warmup_steps), 0)

  def lr(step):
    if warm == 0:
      return jnp.float32(opt.lr)
    return jnp.float32(opt.lr) * jnp.minimum(1.0, step.astype(jnp.float32) / warm)

  return lr


def make_optimizer(opt) -> optax.GradientTransformation:
  """Global-norm clip then AdamW; the lr is injected per step from the training-step schedule."""
  adamw = optax.inject_hyperparams(optax.adamw)(
      learning_rate=opt.lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay)
  return optax.chain(optax.clip_by_global_norm(opt.grad_clip), adamw)


def _set_lr(opt_state, lr):
  clip_state, adam_state = opt_state
  hp = dict(adam_state.hyperparams, learning_rate=lr)
  return (clip_state, adam_state._replace(hyperparams=hp))


def response_logprobs(graphdef, params, batch: dict, *, resp_len: int, chunk_size: int,
                      temperature: float = 1.0, with_entropy: bool = True):
  """(logp_BxR, entropy_BxR) of the last `resp_len` tokens, never materializing B×R×V logits."""
  model = nnx.merge(graphdef, params)
  ids_BxL = batch["input_ids"]
  h_BxLxD, _ = model.hidden(ids_BxL, batch["positions"], batch["attn_mask"])
  L = ids_BxL.shape[1]
  h_BxRxD = h_BxLxD[:, L - resp_len - 1:L - 1]
  return token_logprobs(h_BxRxD, model.unembed(), ids_BxL[:, L - resp_len:],
                        chunk_size=chunk_size, temperature=temperature, with_entropy=with_entropy)


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static knobs of the jitted step (hashable)."""

  loss: losses.LossConfig
  num_micro: int
  chunk_size: int = 256
  temperature: float = 1.0
  logprob_rows: int = 0  # rows per block of the old/ref log-prob pass; 0 = the whole batch at once
  # Packed rows (packed_step.py): sequence length, 0 = the padded path; sequences per micro-batch
  # (its token budget is pack_micro_seqs × pack_len); `logprob_rows` then counts sequences.
  pack_len: int = 0
  pack_micro_seqs: int = 0


def step_config(c) -> StepConfig:
  """The step knobs of a run config (`config.rl`, the sampling temperature, the packing sizes)."""
  rl = c.rl.to_dict()
  rl["ratio_clamp"] = rl["ratio_clamp"] or None
  rl["agg"] = rl["agg"] or None
  return StepConfig(loss=losses.LossConfig.from_config(rl),
                    num_micro=c.rl.minibatch_size // c.rl.micro_batch_size,
                    chunk_size=c.rl.logprob_chunk, temperature=c.rollout.temperature or 1.0,
                    logprob_rows=c.rl.logprob_micro_batch_size,
                    pack_len=(c.rl.pack_len or c.rollout.max_context) if c.rl.pack else 0,
                    pack_micro_seqs=c.rl.pack_micro_seqs or c.rl.micro_batch_size)


def _micro_loss(params, graphdef, micro: dict, step_cfg: StepConfig):
  logp, ent = response_logprobs(graphdef, params, micro, resp_len=micro["loss_mask"].shape[1],
                                chunk_size=step_cfg.chunk_size, temperature=step_cfg.temperature)
  ref = micro["ref_logp"] if step_cfg.loss.kl_coef else None
  total, metrics = losses.policy_loss(
      logp, micro["old_logp"], micro["adv"], micro["loss_mask"], step_cfg.loss, ref_logp_BxT=ref,
      entropy_BxT=ent, answer_weight_BxT=micro["answer_weight"])
  metrics["entropy"] = losses.masked_mean(jax.lax.stop_gradient(ent), micro["loss_mask"])
  return total, metrics


def _blocks(x, num: int):
  """[B, ...] → [num, B/num, ...] with the rows of every block still sharded over the mesh."""
  x = x.reshape(num, x.shape[0] // num, *x.shape[1:])
  return shd.constrain(x, (None, "batch", *([None] * (x.ndim - 2))))


def blocked_logprobs(graphdef, params, batch: dict, *, resp_len: int, step_cfg: StepConfig):
  """`response_logprobs` over blocks of `step_cfg.logprob_rows` rows, one after another.

  The no-grad passes (old and reference policy) see the whole rollout batch (512 × 5 rows in the
  paper's setting); in one block their activations would dwarf the update's. Blocks bound that
  like the official `log_prob_micro_batch_size`.
  """
  n = batch["input_ids"].shape[0]
  rows = step_cfg.logprob_rows or n
  if n % rows:
    raise ValueError(f"{n} rollout rows do not split into log-prob blocks of {rows} rows")
  fn = lambda b: response_logprobs(graphdef, params, b, resp_len=resp_len,  # noqa: E731
                                   chunk_size=step_cfg.chunk_size, temperature=step_cfg.temperature)
  if rows == n:
    return fn(batch)
  out = jax.lax.map(fn, {k: _blocks(v, n // rows) for k, v in batch.items()})
  return jax.tree.map(lambda x: x.reshape(n, *x.shape[2:]), out)


def minibatch_grads(params, batch: dict, *, graphdef, step_cfg: StepConfig, grad_shardings=None):
  """(float32 grads, metrics) of one minibatch, accumulated over `step_cfg.num_micro` micro-batches.

  Each micro-batch loss is a token mean over its own loss tokens and the gradients are averaged
  over micro-batches, as the official actor does (`loss / grad_accum` then backward).
  """
  A = step_cfg.num_micro
  micros = {k: _blocks(batch[k], A) for k in BATCH_KEYS}
  return accumulate_micro(params, micros, lambda p, m: _micro_loss(p, graphdef, m, step_cfg),
                          divisor=A, grad_shardings=grad_shardings)


def accumulate_micro(params, micros: dict, loss_fn, *, divisor: int, grad_shardings=None):
  """Σ over the leading (micro-batch) axis of `loss_fn(params, micro)`'s (grad, metrics) / divisor."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  # The float32 accumulator is pinned to the params' sharding (`grad_shardings`), so each
  # micro-batch's gradient can be reduce-scattered into 1/fsdp of it. Unconstrained, the
  # partitioner may keep full-size gradients on every device (the 3B fsdp-32 CPU dry run shows
  # 27 GB of them; the CPU backend lowers reduce-scatter as all-reduce + slice either way, so the
  # saving is only visible on TPU/GPU).
  pin = (lambda g: jax.lax.with_sharding_constraint(g, grad_shardings)) if grad_shardings else (
      lambda g: g)

  def accumulate(carry, micro):
    grads, msum = carry
    (_, metrics), g = grad_fn(params, micro)
    grads = pin(jax.tree.map(lambda a, b: a + b.astype(jnp.float32) / divisor, grads, g))
    msum = jax.tree.map(lambda a, b: a + b / divisor, msum, metrics)
    return (grads, msum), None

  zeros = pin(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
  _, m_shape = jax.eval_shape(lambda: loss_fn(params, jax.tree.map(lambda x: x[0], micros)))
  m0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape)
  (grads, metrics), _ = jax.lax.scan(accumulate, (zeros, m0), micros)
  return grads, metrics


def apply_grads(state: TrainState, grads, metrics: dict, *, tx,
                schedule) -> tuple[TrainState, dict]:
  """One optimizer update from accumulated grads; a non-finite loss or gradient skips it."""
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(grad_norm) & jnp.isfinite(metrics["loss/total"])
  lr = schedule(state.step)
  opt_state = _set_lr(state.opt_state, lr)
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
  updates, new_opt = tx.update(grads, opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  # A finite gradient can still overflow the weights (e.g. a huge lr or Adam's tiny-denominator
  # step): such a step is skipped and counted exactly like a non-finite gradient.
  finite &= jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(new_params)]))
  # A non-finite update is dropped whole: params and optimizer state stay bitwise as they were
  # (the official NAN_CLIP is a no-op, PAPER.md §B.3.6). One `cond` on the whole tree, not a
  # `where` per leaf: XLA fused the flag's reduction over every leaf into each leaf's `where`, so
  # the program grew with leaves² (24 layers, ~300 leaves: 88 s of the update's CPU compile,
  # bench/RESULTS.md; the cond compiles in ~3 s).
  params, opt_state = jax.lax.cond(finite, lambda: (new_params, new_opt),
                                   lambda: (state.params, state.opt_state))
  state = state.replace(
      params=params,
      opt_state=opt_state,
      opt_step=state.opt_step + finite.astype(jnp.int32),
      skipped=state.skipped + (~finite).astype(jnp.int32))
  metrics.update({"grad_norm": grad_norm, "lr": lr, "skipped_nonfinite": (~finite).astype(jnp.int32)})
  return state, metrics


def train_step(state: TrainState, batch: dict, *, graphdef, tx, schedule, step_cfg: StepConfig,
               grad_shardings=None, grads_fn=None) -> tuple[TrainState, dict]:
  """One optimizer update on a minibatch: `grads_fn` (default `minibatch_grads`, padded rows;
  `packed_step.packed_minibatch_grads` for packed ones), then `apply_grads`."""
  grads, metrics = (grads_fn or minibatch_grads)(state.params, batch, graphdef=graphdef,
                                                 step_cfg=step_cfg, grad_shardings=grad_shardings)
  return apply_grads(state, grads, metrics, tx=tx, schedule=schedule)


class Updater:
  """Owns the jitted functions of one (model, mesh, config): init, log-probs, train step."""

  def __init__(self, graphdef, abstract_params, *, opt, step_cfg: StepConfig, mesh: Mesh):
    self.graphdef, self.mesh, self.step_cfg = graphdef, mesh, step_cfg
    self.tx, self.schedule = make_optimizer(opt), lr_schedule(opt)
    schedule = self.schedule
    self.param_shardings = shd.state_shardings(abstract_params, mesh)
    rep = shd.replicated(mesh)
    abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
    opt_shardings = optax.tree_map_params(
        self.tx, lambda _, s: s, abstract_opt, self.param_shardings,
        transform_non_params=lambda _: rep)
    self.state_shardings = TrainState(step=rep, opt_step=rep, params=self.param_shardings,
                                      opt_state=opt_shardings, skipped=rep)
    row = lambda nd: shd.batch_sharding(mesh, nd)  # noqa: E731
    self.batch_shardings = {k: row(1 if k == "adv" else 2) for k in BATCH_KEYS}
    self.init_state = jax.jit(self.fresh_state, out_shardings=self.state_shardings)
    # The jitted programs, each called (and lowered, e.g. by tools/dry_run.py) under the mesh:
    # the model pins its activations to row sharding only while a mesh is active (shd.constrain).
    self.step = shd.OnMesh(jax.jit(
        lambda s, b: train_step(s, b, graphdef=graphdef, tx=self.tx, schedule=schedule,
                                step_cfg=step_cfg, grad_shardings=self.param_shardings),
        in_shardings=(self.state_shardings, self.batch_shardings),
        out_shardings=(self.state_shardings, rep), donate_argnames=("s",)), mesh)
    self.lp_keys = ("input_ids", "attn_mask", "positions")
    self.logprobs_program = shd.OnMesh(jax.jit(
        lambda p, b, resp_len: blocked_logprobs(graphdef, p, b, resp_len=resp_len,
                                                step_cfg=step_cfg),
        in_shardings=(self.param_shardings, {k: self.batch_shardings[k] for k in self.lp_keys}),
        out_shardings=(row(2), row(2)), static_argnums=2), mesh)
    kl = bool(step_cfg.loss.kl_coef)
    self.lld_stats = jax.jit(
        lambda old, adv, mask, ref: losses.lld_stats(old, adv, mask, ref if kl else None))
    self.advance = jax.jit(lambda s: s.replace(step=s.step + 1),
                           out_shardings=self.state_shardings, donate_argnums=0)
    self.select_rows = jax.jit(lambda b, rows: {k: v[rows] for k, v in b.items()},
                               out_shardings=self.batch_shardings)
    self.packed = None
    if step_cfg.pack_len:
      from llds_jax.packed_step import PackedPrograms  # it builds on this module
      self.packed = PackedPrograms(self)

  def fresh_state(self, params) -> TrainState:
    """Step 0: the optimizer initialized on `params` (pure; `init_state` is it jitted, sharded)."""
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, opt_step=zero, params=params, opt_state=self.tx.init(params),
                      skipped=zero)

  def logprobs(self, params, batch: dict):
    """Response log-probs and entropy (no grad) for a whole rollout batch."""
    return self.logprobs_program(params, {k: batch[k] for k in self.lp_keys},
                                 batch["loss_mask"].shape[1])


def place_batch(batch: dict, shardings: dict) -> dict:
  """Process-local host rows -> one globally sharded array per key (multi-host safe)."""
  return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
          for k, v in batch.items()}


def update_phase(updater: Updater, state: TrainState, batch: dict, ref_params, *,
                 minibatch: int, ppo_epochs: int = 1, shuffle_seed: int | None = None,
                 progress: Callable | None = None) -> tuple[TrainState, list[dict], dict]:
  """Fix old/ref log-probs on the whole rollout batch, then take the minibatch steps.

  `batch` holds this process's host rows for every key of BATCH_KEYS except old_logp/ref_logp.
  Minibatches are contiguous row blocks (official: no shuffle) unless `shuffle_seed` is given.
  Returns the state with `step` advanced by one, the per-minibatch metrics and whole-batch LLD
  statistics (device scalars, for the caller to fetch when it needs them). With
  `step_cfg.pack_len` the rows are packed (`packed_step.packed_update_phase`).
  """
  if updater.step_cfg.pack_len:
    from llds_jax.packed_step import packed_update_phase  # it builds on this module
    return packed_update_phase(updater, state, batch, ref_params, minibatch=minibatch,
                               ppo_epochs=ppo_epochs, shuffle_seed=shuffle_seed,
                               progress=progress)
  placed = place_batch({k: v for k, v in batch.items() if k in BATCH_KEYS}, updater.batch_shardings)
  n = placed["input_ids"].shape[0]
  if n % minibatch:
    raise ValueError(f"rollout rows {n} not divisible by rl.minibatch_size={minibatch}")
  placed["old_logp"], _ = updater.logprobs(state.params, placed)
  if updater.step_cfg.loss.kl_coef:
    placed["ref_logp"], _ = updater.logprobs(ref_params, placed)
  else:
    placed["ref_logp"] = jnp.zeros_like(placed["old_logp"])
  # LLD diagnostics over the whole rollout batch under π_old (per-minibatch means would be
  # diluted by minibatches that hold no preserving / non-preserving rows).
  batch_stats = updater.lld_stats(placed["old_logp"], placed["adv"], placed["loss_mask"],
                                  placed["ref_logp"])
  metrics = []
  steps = [(e, i) for e in range(ppo_epochs) for i in range(n // minibatch)]
  for e, i in (progress(steps) if progress else steps):
    order = np.arange(n)
    if shuffle_seed is not None:
      order = np.random.default_rng((shuffle_seed, e)).permutation(n)
    rows = jnp.asarray(order[i * minibatch:(i + 1) * minibatch])
    state, m = updater.step(state, updater.select_rows(placed, rows))
    metrics.append(m)
  return updater.advance(state), metrics, batch_stats
