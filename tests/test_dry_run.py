"""tools/dry_run.py and llds_jax/roofline.py on 8 simulated CPU devices.

The dry run of a tiny config must report exactly the memory of the step the trainer compiles
from real arrays; the HLO parser must find known collectives and matmul FLOPs (weighted by loop
trip counts); the roofline must reproduce hand-computed predictions.
"""

import tool_loader
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from llds_jax import roofline, sharding
from llds_jax.model import Transformer
from llds_jax.train_step import BATCH_KEYS, Updater

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_load = tool_loader.load


dry_run = _load("tools/dry_run.py", "dry_run_tool")


def _tiny_pod():
  """configs/tiny.py on a 2×2×2 mesh with pod-style sections (hardware, micro-batches)."""
  c = _load("configs/tiny.py", "tiny_config").get_config()
  c.mesh.data = c.mesh.fsdp = c.mesh.tensor = 2
  c.model.scan_layers = True  # as in the pod configs (configs/tiny.py unrolls its 2 blocks)
  c.rl.minibatch_size, c.rl.micro_batch_size = 8, 4
  c.rollout.max_turn_tokens, c.rollout.max_obs_tokens, c.rollout.max_context = 16, 24, 256
  return c


@pytest.fixture(scope="module")
def tiny_run():
  c = _tiny_pod()
  return c, dry_run.run(c, devices=jax.devices()[:8], prompt_tokens=40, chip="v5p",
                        log=lambda _: None)


def test_dry_run_compiles_every_program_and_predicts(tiny_run):
  _, out = tiny_run
  assert out["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  # P = bucket(40) = 48; worst response 3·16 + 2·24 = 96 ≤ cap − 1 = 143 → R = bucket(96) = 96.
  assert (out["shapes"]["P"], out["shapes"]["R"], out["shapes"]["cap"]) == (48, 96, 144)
  assert out["shapes"]["views"] == [144, 144, 144]  # MIN_VIEW 256 > cap
  for name in dry_run.PROGRAMS:
    p = out["programs"][name]
    assert p["memory"]["argument"] > 0 and p["dot_flops"] > 0, name
  # The update step's matmuls run once per micro-batch: the HLO count is 2× one body's.
  assert out["programs"]["train_step"]["dot_flops"] > out["programs"]["train_step"]["xla_flops"]
  assert out["programs"]["train_step"]["collectives"]["all-reduce"]["count"] > 0
  pred = out["prediction"]
  assert pred["chip"] == "v5p" and pred["step_s"] > 0
  assert pred["counts"]["update_steps"] == 16 // 8
  assert all(pred["memory"][k]["fits"] for k in dry_run.PROGRAMS)
  assert "PREDICTED on v5p" in dry_run.report(out)


def test_dry_run_memory_equals_the_real_compiled_step(tiny_run):
  c, out = tiny_run
  mesh = sharding.make_mesh(dict(c.mesh), jax.devices()[:8])
  cfg = dry_run.model_config(c)
  model = sharding.init_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
  graphdef, params = nnx.split(model)
  from llds_jax import train_step
  up = Updater(graphdef, jax.eval_shape(lambda: params), opt=c.opt,
               step_cfg=train_step.step_config(c), mesh=mesh)
  state = up.init_state(params)
  s, mb = out["shapes"], c.rl.minibatch_size
  ints = ("input_ids", "attn_mask", "positions")
  host = {k: np.zeros((mb,) if k == "adv" else (mb, s["L"] if k in ints else s["R"]),
                      np.int32 if k in ints else np.float32) for k in BATCH_KEYS}
  batch = {k: jax.device_put(v, up.batch_shardings[k]) for k, v in host.items()}
  real = up.step.lower(state, batch).compile().memory_analysis()
  dry = out["programs"]["train_step"]["memory"]
  for k in ("argument", "output", "alias", "temp"):
    assert dry[k] == getattr(real, f"{k}_size_in_bytes"), k
  # The reported sizes are per device: the arguments are exactly this device's shards.
  shard_bytes = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves((state, batch)))
  assert dry["argument"] == shard_bytes
  assert out["resident"]["train_state"] == sum(
      x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state))


def test_dry_run_packed_programs_from_recorded_lengths(tiny_run):
  """With rl.pack the dry run lowers the packed step and log-prob pass on sequences sized by the
  recorded lengths (stretched to P and R): fewer token slots than the padded batch."""
  _, padded = tiny_run
  c = _tiny_pod()
  c.rl.pack = True
  out = dry_run.run(c, devices=jax.devices()[:8], prompt_tokens=40, chip="v5p",
                    programs=("train_step", "logprobs"), log=lambda _: None)
  s, pk = out["shapes"], out["shapes"]["packed"]
  a, qm, seq = pk["micro"]
  assert seq == c.rollout.max_context and qm % 4 == 0  # pack_len; whole row shards
  q = pk["logprob_seqs"][0]
  assert q % pk["block"] == 0 and q * seq < s["rows"] * s["L"]  # fewer slots than padded
  assert pk["tokens"] <= q * seq
  for name in ("train_step", "logprobs"):
    assert out["programs"][name]["dot_flops"] > 0
    # Different programs from the padded ones (packed inputs, unembedding at loss tokens only).
    assert out["programs"][name]["dot_flops"] != padded["programs"][name]["dot_flops"], name
  assert "packed" in dry_run.report(out)


def test_recorded_rows_stretch_the_recording():
  from llds_jax import packing
  dist = dict(max_context=100, prompt_len=[10, 20], response_len=[30, 80], loss_tokens=[30, 9])
  rows = packing.recorded_rows(dist, 50, prompt_width=40, response_width=160, seed=1)
  attn, loss = rows["attn_mask"], rows["loss_mask"]
  assert attn.shape == (50, 200) and loss.shape == (50, 160)
  p_B, r_B = packing.row_extents(attn, 40)
  # Prompts × 40/20, responses and loss tokens × 160/(100 − 20).
  assert set(zip(p_B.tolist(), r_B.tolist(), loss.sum(1).astype(int).tolist())) == {
      (20, 60, 60), (40, 160, 18)}
  for i in np.flatnonzero(r_B == 160):  # 9 head + 9 tail loss tokens, observations between
    np.testing.assert_array_equal(np.flatnonzero(loss[i]), np.r_[0:9, 151:160])


def _mesh8():
  return jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))


def test_collective_parser_on_a_known_all_reduce_in_a_loop():
  mesh = _mesh8()

  @jax.jit
  def f(a_MxK, b_KxN):
    def body(a, _):  # contraction over the sharded K: one all-reduce of the M×N partials
      a = a * 2.0  # the carry feeds the matmul, so XLA cannot hoist the all-reduce out of the loop
      part = jax.shard_map(lambda x, y: jax.lax.psum(x @ y, "x"), mesh=mesh,
                           in_specs=(P(None, "x"), P("x", None)), out_specs=P(),
                           check_vma=False)(a, b_KxN)
      return a, part
    return jax.lax.scan(body, a_MxK, None, length=3)[1]

  a = jax.ShapeDtypeStruct((64, 128), jnp.float32, sharding=NamedSharding(mesh, P(None, "x")))
  b = jax.ShapeDtypeStruct((128, 32), jnp.float32, sharding=NamedSharding(mesh, P("x", None)))
  stats = roofline.hlo_stats(f.lower(a, b).compile().as_text(), 8)
  ar = stats["collectives"]["all-reduce"]
  assert ar["count"] == 1 and ar["weighted_count"] == 3  # one instruction, run 3 times
  assert ar["max_group"] == 8
  assert ar["operand_bytes"] == 3 * 64 * 32 * 4
  assert ar["link_bytes"] == pytest.approx(3 * 2 * 64 * 32 * 4 * 7 / 8)
  assert stats["dot_flops"] == 3 * 2 * 64 * (128 // 8) * 32  # per device, per iteration × 3
  assert all(v["count"] == 0 for k, v in stats["collectives"].items() if k != "all-reduce")


def test_collective_parser_all_gather_and_loop_free_flops_match_xla():
  mesh = _mesh8()

  @jax.jit
  def g(x_NxD, w_DxF):
    full = jax.shard_map(lambda x: jax.lax.all_gather(x, "x", tiled=True), mesh=mesh,
                         in_specs=P("x", None), out_specs=P(), check_vma=False)(x_NxD)
    return full @ w_DxF

  x = jax.ShapeDtypeStruct((256, 64), jnp.float32, sharding=NamedSharding(mesh, P("x", None)))
  w = jax.ShapeDtypeStruct((64, 48), jnp.float32, sharding=NamedSharding(mesh, P()))
  compiled = g.lower(x, w).compile()
  stats = roofline.hlo_stats(compiled.as_text(), 8)
  ag = stats["collectives"]["all-gather"]
  assert ag["weighted_count"] == 1 and ag["result_bytes"] == 256 * 64 * 4
  assert ag["link_bytes"] == 256 * 64 * 4 * 7 / 8
  assert stats["dot_flops"] == 2 * 256 * 64 * 48
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert stats["dot_flops"] == pytest.approx(cost["flops"], rel=0.02)


def test_shape_bytes_and_link_bytes():
  assert roofline.shape_bytes("f32[2,3]{1,0}") == 24
  assert roofline.shape_bytes("(s32[], bf16[4]{0})") == 12
  assert roofline.link_bytes("all-reduce", 800, 800, 4) == 1200  # 2 · 800 · 3/4
  assert roofline.link_bytes("reduce-scatter", 800, 200, 4) == 600
  assert roofline.link_bytes("all-gather", 200, 800, 4) == 600
  assert roofline.link_bytes("all-gather", 200, 200, 1) == 0


def test_roofline_prediction_by_hand():
  chip = roofline.Chip("toy", peak_flops=1e12, hbm_bytes=10e9, hbm_bw=1e11, ici_bidir_bw=4e10,
                       links=4, source="test")
  a = roofline.Assumptions(mfu=0.5, prefill_mfu=0.25, hbm_eff=0.5, ici_eff=0.5, headroom=0.1)
  assert chip.ring_bw == 1e10
  pred = roofline.predict_step(
      chip,
      decode=dict(dot_flops=1e9, link_bytes=1e8, hbm_bytes_per_token=[1e9, 3e9]),
      prefill=dict(dot_flops=1e10, link_bytes=5e8, weight_bytes=1e9),
      logprobs=dict(dot_flops=2e12, link_bytes=1e9),
      update=dict(dot_flops=4e12, link_bytes=2e9),
      counts=dict(decode_steps=[10, 20], fed_tokens=100, feed_calls=2, logprob_passes=2,
                  update_steps=3),
      resident_bytes=4e9, peaks={"train_step": 9e9, "decode": 9.5e9}, a=a)
  # decode: memory (10·1e9 + 20·3e9)/(1e11·0.5) = 1.4 s; compute 30·1e9/1e12 = 0.03 s;
  # collectives 30·1e8/(1e10·0.5) = 0.6 s.
  assert pred["decode"]["memory_s"] == pytest.approx(1.4)
  assert pred["decode"]["compute_lower_bound_s"] == pytest.approx(0.03)
  assert pred["decode"]["collective_s"] == pytest.approx(0.6)
  assert pred["decode"]["total_s"] == pytest.approx(2.0)
  # prefill: max(100·1e10/(1e12·0.25) = 4 s, 2·1e9/(1e11·0.5) = 0.04 s) + 2·5e8/5e9 = 0.2 s.
  assert pred["prefill"]["total_s"] == pytest.approx(4.2)
  # log-probs: 2·2e12/(1e12·0.5) = 8 s + 2·1e9/5e9 = 0.4 s; update: 3·4e12/5e11 = 24 s + 1.2 s.
  assert pred["logprobs"]["total_s"] == pytest.approx(8.4)
  assert pred["update"]["total_s"] == pytest.approx(25.2)
  assert pred["step_s"] == pytest.approx(2.0 + 4.2 + 8.4 + 25.2)
  assert pred["memory"]["budget_bytes"] == pytest.approx(9e9)
  assert pred["memory"]["train_step"]["fits"] and not pred["memory"]["decode"]["fits"]


def test_chip_table_is_vendor_peaks():
  v5p = roofline.CHIPS["v5p"]
  assert (v5p.peak_flops, v5p.hbm_bw, v5p.ring_bw) == (459e12, 2765e9, 200e9)
  assert {"v4", "v5e", "v5p", "v6e", "H100"} <= set(roofline.CHIPS)


def test_device_count_from_config():
  c = _tiny_pod()
  assert dry_run.device_count(c) == 8
  c.mesh.data = -1
  with pytest.raises(ValueError, match="hardware.devices"):
    dry_run.device_count(c)
  assert dry_run.device_count(c, 16) == 16


def test_cpu_upcast_accounting_on_a_loop_over_a_bf16_argument():
  # A bf16 matmul in a loop: the CPU backend converts the loop-invariant bf16 weight to f32 once,
  # a buffer the size of the f32 weight that a bf16-native chip would not allocate.
  w_bf16 = jax.ShapeDtypeStruct((512, 1024), jnp.bfloat16)
  x = jax.ShapeDtypeStruct((8, 512), jnp.bfloat16)

  def f(w, x):
    body = lambda h, _: ((h @ w)[:, :512], None)  # noqa: E731
    return jax.lax.scan(body, x, None, length=4)[0]

  compiled, report = dry_run.compile_with_report(jax.jit(f).lower(w_bf16, x))
  m = dry_run.analyze(compiled, 1, report)["memory"]
  assert m["cpu_upcast"] >= 512 * 1024 * 4, (m, report)
  assert m["peak_native"] == m["peak"] - m["cpu_upcast"] and m["cpu_upcast"] <= m["temp"]
  # Only f32 copies of bf16 *arguments* count: the same program on f32 inputs has none.
  f32 = lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32)  # noqa: E731
  compiled, report = dry_run.compile_with_report(jax.jit(f).lower(f32(w_bf16), f32(x)))
  assert dry_run.analyze(compiled, 1, report)["memory"]["cpu_upcast"] == 0


def test_cpu_upcast_parser_on_a_written_report():
  hlo = ("HloModule m\n\nENTRY %main (p0: bf16[80,3884,2,128], p1: f32[16]) -> f32[16] {\n"
         "  ROOT %r = f32[16] add(%p1, %p1)\n}\n")
  report = """Memory Space: default (color=0)
Total bytes: 1 (1B)
  cumulative_size;       size;       offset; used_by_n_values; shapes_list
  ------------------------------------------------------------
    1.00GiB( 50%);    303.44MiB;  0;  3; f32[80,2,128,3884], 2×f32[80,3884,2,128]
    1.50GiB( 75%);    512.00MiB;  0;  2; f32[80,3884,2,128], f32[7]
    2.00GiB(100%);      1.00KiB;  0;  1; bf16[80,3884,2,128]
"""
  # Row 1: f32 copies (one transposed) of the bf16 argument; row 2 shares its buffer with an
  # unrelated f32 value; row 3 is bf16 itself.
  assert roofline.cpu_upcast_bytes(report, hlo) == pytest.approx(303.44 * 2**20)
