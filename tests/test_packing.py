"""Packed rows: layout, segment isolation, and packed == padded losses and gradients."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llds_jax import losses, packing, sharding
from llds_jax.model import Transformer
from llds_jax.packed_step import (ROW_KEYS, micro_objective, micro_scales, packed_logprobs,
                                  packed_minibatch_grads)
from llds_jax.train_step import (StepConfig, Updater, minibatch_grads, response_logprobs,
                                 update_phase)
from test_train_step import CFG, B, P, R, _opt, _updater, fake_batch

SINGLE = {"data": 1, "fsdp": 1, "tensor": 1}
MESH = {"data": 2, "fsdp": 2, "tensor": 2}
LP = 24  # packed sequence length (Lp): 1-3 rows of up to P + R = 16 tokens each


def _model(mesh_shape=SINGLE):
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:int(np.prod(list(mesh_shape.values())))])
  return mesh, sharding.init_sharded(lambda: Transformer(CFG, rngs=nnx.Rngs(0)), mesh)


def test_first_fit_and_layout_round_trip():
  batch = fake_batch(3)
  pk = packing.pack_rows(batch, np.arange(B), LP)
  p_B, r_B = packing.row_extents(batch["attn_mask"], P)
  q, k = pk["keep"].shape
  assert q < B  # several rows share a sequence
  for i in range(B):
    seq, seg = pk["row_seq"][i], pk["row_segment"][i]
    where = np.flatnonzero(pk["segment_ids"][seq] == seg)
    assert len(where) == p_B[i] + r_B[i] and np.all(np.diff(where) == 1)
    np.testing.assert_array_equal(pk["positions"][seq, where], np.arange(len(where)))
    np.testing.assert_array_equal(pk["input_ids"][seq, where],
                                  batch["input_ids"][i, P - p_B[i]:P + r_B[i]])
    # Each loss token's gathered position is the one before it in its row's segment.
    t = np.flatnonzero(batch["loss_mask"][i])
    g = pk["gather"][i, t]
    assert np.all(g // k == seq)
    pos = pk["keep"].reshape(-1)[g]
    np.testing.assert_array_equal(pk["input_ids"][seq, pos + 1], batch["input_ids"][i, P + t])
    assert np.all(pk["segment_ids"][seq, pos] == seg)
  assert (pk["segment_ids"] > 0).sum() == batch["attn_mask"].sum()  # every token exactly once
  assert packing.non_pad_fraction(batch["attn_mask"], LP) == (
      batch["attn_mask"].sum() / pk["input_ids"].size)
  assert packing.non_pad_fraction(batch["attn_mask"]) == batch["attn_mask"].mean()


def test_row_longer_than_sequence_is_named():
  with pytest.raises(ValueError, match="row 0 has"):
    packing.pack_rows(fake_batch(), np.arange(B), 4)


def test_segments_never_see_their_neighbours():
  """Packed log-probs equal each row's padded log-probs; rewriting a neighbour changes nothing."""
  mesh, model = _model()
  graphdef, params = nnx.split(model)
  batch = fake_batch(1)
  step_cfg = StepConfig(loss=losses.LossConfig(), num_micro=1, chunk_size=4)
  pad_BxR, _ = response_logprobs(graphdef, params, batch, resp_len=R, chunk_size=4)
  pk = packing.pack_rows(batch, np.arange(B), LP)
  seqs = {k: jnp.asarray(pk[k]) for k in packing.SEQ_KEYS}
  logp_BpxTk, _ = packed_logprobs(graphdef, params, seqs, step_cfg=step_cfg)
  mask_BxR = batch["loss_mask"] > 0
  got_BxR = np.asarray(logp_BpxTk).reshape(-1)[pk["gather"]]
  np.testing.assert_allclose(np.where(mask_BxR, got_BxR, 0), np.where(mask_BxR, pad_BxR, 0),
                             atol=1e-5)
  # Scramble every token of segment 1 in each sequence: rows in other segments keep their values.
  ids = np.where(pk["segment_ids"] == 1, (pk["input_ids"] * 7 + 3) % CFG.vocab_size,
                 pk["input_ids"])
  logp2_BpxTk, _ = packed_logprobs(graphdef, params, dict(seqs, input_ids=jnp.asarray(ids)),
                                 step_cfg=step_cfg)
  got2_BxR = np.asarray(logp2_BpxTk).reshape(-1)[pk["gather"]]
  other_B = pk["row_segment"] > 1
  assert other_B.any()
  np.testing.assert_array_equal(np.where(mask_BxR, got2_BxR, 0)[other_B],
                                np.where(mask_BxR, got_BxR, 0)[other_B])
  assert not np.allclose(got2_BxR[~other_B][mask_BxR[~other_B]],
                         got_BxR[~other_B][mask_BxR[~other_B]])


def test_query_blocked_attention_keeps_segments():
  """The query-blocked kernel (long packed sequences) masks segments like the dense one."""
  from llds_jax.attention import attend
  rng = np.random.RandomState(0)
  q = jnp.asarray(rng.randn(2, 10, 4, 8), jnp.float32)
  k, v = (jnp.asarray(rng.randn(2, 10, 2, 8), jnp.float32) for _ in range(2))
  seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 3, 3, 0], [1] * 6 + [2] * 4])
  pos = jnp.asarray([[0, 1, 2, 0, 1, 2, 3, 0, 1, -1], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])
  dense = attend(q, k, v, pos, pos, 0, 0, seg, seg)
  np.testing.assert_allclose(attend(q, k, v, pos, pos, 3, 0, seg, seg), dense, atol=1e-6)
  # Segment 2's first token sees only itself: its output is its own value (GQA: head h → h // 2).
  np.testing.assert_allclose(dense[0, 3], jnp.repeat(v[0, 3], 2, axis=0), atol=1e-6)


def test_blocks_and_micro_batches_are_balanced():
  """Sequences are split into balanced blocks / micro-batches, not rounded up to whole blocks of
  the largest size (which made packing run as many slots as the padded path)."""
  from llds_jax.packed_step import block_size, micro_size
  assert block_size(21, 16, 1) == 12  # 2 blocks of 12 (24 sequences), not 2 × 16
  assert block_size(57, 16, 1) == 16  # 4 blocks of 16
  assert block_size(5, 16, 4) == 8  # one block, a multiple of the row shards
  assert block_size(5, 0, 1) == 6  # no limit: one bucketed block
  assert micro_size([12, 12, 11, 12], 8, 1) == (6, 2)  # 2 × 6 sequences, not 2 × 8
  assert micro_size([12, 13], 8, 1) == (8, 2)  # 13 needs a bucket step: 2 × 8 is the fewest
  assert micro_size([5, 3], 8, 4) == (8, 1)  # one micro-batch of 8 rather than 2 × 4
  assert micro_size([9], 0, 1) == (12, 1)  # no limit: one micro-batch per minibatch
  for used, most, shards in itertools.product(range(1, 40), (1, 2, 8, 16), (1, 2)):
    if most % shards:
      continue
    b = block_size(used, most, shards)
    assert b <= most and b % shards == 0 and packing.round_up(used, b) <= used + b
    qm, a = micro_size([used, max(used // 2, 1)], most, shards)
    assert qm <= most and qm % shards == 0 and a * qm >= used


def _rows_of(batch, old, ref, stacked):
  """The device gather of `packed_update_phase`, on the host: row keys per micro-batch slot."""
  full = dict(batch, old_logp=old, ref_logp=ref)
  out = {}
  for k in ROW_KEYS:
    x = np.asarray(full[k], np.float32)
    pad = np.zeros((1, *x.shape[1:]), np.float32)
    out[k] = np.concatenate([x, pad])[stacked["rows"]]
  return out


def _packed_minibatch(batch, old, ref, micro_seqs, row_multiple=1):
  lay = packing.minibatch_layout(batch, np.arange(B), LP, micro_seqs)
  st = packing.stack_micro([lay], B, row_multiple)[0]
  return {**{k: st[k] for k in packing.SEQ_KEYS + ("gather",)},
          **_rows_of(batch, old, ref, st)}, st


def _loss_inputs(seed=0):
  batch = fake_batch(seed)
  rng = np.random.RandomState(seed + 10)
  logp_BxR = -np.abs(rng.randn(B, R)).astype(np.float32)
  old_BxR = (logp_BxR + 0.3 * rng.randn(B, R)).astype(np.float32)
  ref_BxR = (logp_BxR + 0.3 * rng.randn(B, R)).astype(np.float32)
  ent_BxR = np.abs(rng.randn(B, R)).astype(np.float32)
  batch["answer_weight"] = np.where(rng.rand(B, R) < 0.3, 0.25, 1.0).astype(np.float32)
  return batch, logp_BxR, old_BxR, ref_BxR, ent_BxR


VARIANTS = [dict(loss=loss, agg=agg, llds_gate=gate, llds_norm=norm)
            for (loss, agg), gate, norm in itertools.product(
                [("grpo", None), ("gspo", None), ("grpo", "seq-mean-token-mean"),
                 ("gspo", "token-mean")], losses.GATES, losses.NORMS)]


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_packed_objective_equals_padded(kw):
  """Every loss × gate × norm (with LLDS-MA weights, KL and entropy on): value and gradient
  with respect to the per-token log-probs and entropies, packed into 3 uneven micro-batches."""
  loss_cfg = losses.LossConfig(**kw, kl_kind="k3", kl_coef=0.1, entropy_coef=0.01)
  batch, logp_BxR, old_BxR, ref_BxR, ent_BxR = _loss_inputs()
  mb, st = _packed_minibatch(batch, old_BxR, ref_BxR, micro_seqs=1)
  a = mb["input_ids"].shape[0]
  assert a >= 3
  valid_BxR = batch["loss_mask"] > 0  # the positions whose log-probs the losses read

  def padded(lp, ent):
    return losses.policy_loss(lp, old_BxR, batch["adv"], batch["loss_mask"], loss_cfg,
                              ref_logp_BxT=ref_BxR, entropy_BxT=ent,
                              answer_weight_BxT=batch["answer_weight"])[0]

  def packed(lp, ent):
    scales = micro_scales(jnp.asarray(mb["loss_mask"]), jnp.asarray(mb["adv"]))
    total = 0.0
    for u in range(a):
      rows = st["rows"][u][st["rows"][u] < B]
      idx = st["gather"][u][:len(rows)][valid_BxR[rows]]
      grid = lambda x: jnp.zeros(mb["keep"][u].size).at[idx].set(  # noqa: E731
          x[rows][valid_BxR[rows]]).reshape(mb["keep"][u].shape)
      micro = {k: mb[k][u] for k in ("gather",) + ROW_KEYS}
      micro["scales"] = {k: v[u] for k, v in scales.items()}
      total += micro_objective(grid(lp), grid(ent), micro, loss_cfg)[0]
    return total

  want, want_g = jax.value_and_grad(padded, argnums=(0, 1))(logp_BxR, ent_BxR)
  got, got_g = jax.value_and_grad(packed, argnums=(0, 1))(logp_BxR, ent_BxR)
  assert float(jnp.abs(want)) > 1e-3
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  for g, w in zip(got_g, want_g):
    np.testing.assert_allclose(np.where(valid_BxR, g, 0), np.where(valid_BxR, w, 0), atol=1e-6)


@pytest.mark.parametrize("mesh_shape,kw", [
    (SINGLE, dict(loss="gspo", llds_gate="response", llds_norm="response", kl_kind="k3",
                  kl_coef=0.1)),
    (MESH, dict(loss="grpo", llds_gate="action", llds_norm="response", kl_coef=0.1)),
], ids=["single-gspo-kl", "mesh222-grpo-kl"])
def test_packed_model_gradients_equal_padded(mesh_shape, kw):
  """Through the model: packed micro-batches (token budgets) == the padded minibatch, ≤ 1e-5."""
  mesh, model = _model(mesh_shape)
  graphdef, params = nnx.split(model)
  rs = mesh.shape["data"] * mesh.shape["fsdp"]
  step_cfg = StepConfig(loss=losses.LossConfig(**kw, llds_lambda=0.5), num_micro=1, chunk_size=4,
                        pack_len=LP, pack_micro_seqs=2 * rs)
  batch, _, _, _, _ = _loss_inputs(1)
  lp_BxR, _ = response_logprobs(graphdef, params, batch, resp_len=R, chunk_size=4)
  rng = np.random.RandomState(5)
  old = np.asarray(lp_BxR) + 0.2 * rng.randn(B, R).astype(np.float32)
  ref = np.asarray(lp_BxR) + 0.2 * rng.randn(B, R).astype(np.float32)
  pad = {k: batch[k] for k in ("input_ids", "attn_mask", "positions", "loss_mask", "adv",
                               "answer_weight")}
  pad.update(old_logp=old, ref_logp=ref)
  mb, _ = _packed_minibatch(batch, old, ref, micro_seqs=2 * rs, row_multiple=rs)
  with jax.set_mesh(mesh):
    want_g, want_m = jax.jit(
        lambda p, b: minibatch_grads(p, b, graphdef=graphdef, step_cfg=step_cfg))(
        params, pad)
    got_g, got_m = jax.jit(
        lambda p, b: packed_minibatch_grads(p, b, graphdef=graphdef, step_cfg=step_cfg))(
        params, mb)
  for k in ("loss/total", "loss/pg", "loss/llds", "loss/kl", "entropy"):
    np.testing.assert_allclose(got_m[k], want_m[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert float(want_m["loss/llds"]) > 0
  for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5)


def test_packed_update_phase_matches_padded():
  """The whole phase (old + ref passes, 2 minibatch steps): same metrics and params as padded."""
  results = []
  for pack in (0, LP):
    up, state, ref = _updater(SINGLE, num_micro=1, llds_lambda=0.0, kl_coef=0.1)
    if pack:  # the same model and optimizer, packed
      up = Updater(up.graphdef, jax.eval_shape(lambda: ref), opt=_opt(), mesh=up.mesh,
                   step_cfg=dataclasses.replace(up.step_cfg, pack_len=LP, pack_micro_seqs=1))
    state, m, _ = update_phase(up, state, fake_batch(2), ref, minibatch=4)
    results.append((jax.tree.map(np.asarray, state.params), [float(x["loss/total"]) for x in m]))
  np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(results[0][0]), jax.tree.leaves(results[1][0])):
    np.testing.assert_allclose(a, b, atol=1e-5)


def _tiny_config(tmp_path):
  import os
  import sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import tiny
  c = tiny.get_config()
  c.workdir = str(tmp_path)
  c.mesh.update(data=2, fsdp=2, tensor=2)
  c.rl.micro_batch_size = 4
  return c


def test_pack_config_switch_and_bad_fields(tmp_path):
  from llds_jax import config_check, train_step
  c = _tiny_config(tmp_path)
  assert train_step.step_config(c).pack_len == 0  # the padded path unless asked
  c.rl.pack = True
  step_cfg = train_step.step_config(c)
  assert (step_cfg.pack_len, step_cfg.pack_micro_seqs) == (c.rollout.max_context,
                                                         c.rl.micro_batch_size)
  config_check.validate(c)
  for field, value in (("pack_len", c.rollout.max_context - 1), ("pack_micro_seqs", 6)):
    bad = _tiny_config(tmp_path)
    bad.rl.pack = True
    bad.rl[field] = value
    with pytest.raises(ValueError, match=f"rl.{field}"):
      config_check.validate(bad)


@pytest.mark.parametrize("name", ["pod_qwen3b_v4", "pod_qwen3b_v5e", "pod_qwen3b_v5p",
                                  "pod_qwen7b_v4", "pod_qwen7b_v5e", "pod_qwen7b_v5p"])
def test_pod_configs_pack_by_default(name):
  """The pod configs run the packed update (bench/RESULTS.md, docs/scaling.md) with valid sizes."""
  import importlib
  import os
  import sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from llds_jax import config_check, train_step
  c = importlib.import_module(f"configs.{name}").get_config()
  assert c.rl.pack
  config_check.validate_packing(c, c.mesh.data * c.mesh.fsdp)
  step_cfg = train_step.step_config(c)
  assert (step_cfg.pack_len, step_cfg.pack_micro_seqs) == (c.rollout.max_context,
                                                         c.rl.micro_batch_size)


def test_zero_variance_filter_drops_equal_groups_and_cuts_to_minibatches():
  from llds_jax.trainer import zero_variance_filter
  group_B = np.repeat(np.arange(4), 3)
  reward_B = np.array([1, 1, 1, 0, 1, 0, 0, 0, 0, 1, 0, 0], np.float32)
  used, m = zero_variance_filter(reward_B, group_B, minibatch=2)
  np.testing.assert_array_equal(used, [3, 4, 5, 9, 10, 11])  # groups 1 and 3
  assert m == {"filter/zero_variance_frac": 0.5, "filter/rows_used": 6.0}
  used, m = zero_variance_filter(reward_B, group_B, minibatch=4)
  np.testing.assert_array_equal(used, [3, 4, 5, 9])  # whole minibatches only
  used, _ = zero_variance_filter(np.zeros(12, np.float32), group_B, minibatch=2)
  assert used.size == 0


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--config.rl.pack=True"],
                                   ["--config.rl.pack=True", "--config.rl.filter_zero_variance=True"]],
                         ids=["packed", "packed-filtered"])
def test_tiny_run_packed(extra, tmp_path):
  """The trainer end to end with packing (and with every group filtered: a random model scores 0)."""
  from test_trainer import _run, _stream
  _run(tmp_path, "--config.total_steps=2", "--config.log.plots=False", *extra)
  recs = _stream(tmp_path)
  assert [r["step"] for r in recs] == [1, 2]
  filtered = "--config.rl.filter_zero_variance=True" in extra
  assert all(r["update/optimizer_steps"] == (0 if filtered else 2) for r in recs)
  assert all(("filter/zero_variance_frac" in r) == filtered for r in recs)


@pytest.mark.slow
def test_packed_two_processes_match_one_process(tmp_path):
  """Packing across hosts: each process packs every row and places its slice of the sequences;
  step 1 of two jax.distributed processes × 4 devices == one process × 8 devices."""
  import os
  import subprocess
  import sys

  from test_trainer import FAST, ROOT, _free_port, _run, _stream
  _run(tmp_path / "one", "--config.total_steps=1", "--config.log.plots=False",
       "--config.rl.pack=True")
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  procs = [subprocess.Popen(
      [sys.executable, "-m", "llds_jax.main", "--config=configs/tiny.py",
       f"--config.workdir={tmp_path / 'two'}", *FAST, "--config.total_steps=1",
       "--config.log.plots=False", "--config.rl.pack=True",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=900)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  one, two = _stream(tmp_path / "one"), _stream(tmp_path / "two")
  assert one[0]["update/optimizer_steps"] == 2
  for key, value in one[0].items():
    assert two[0][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
