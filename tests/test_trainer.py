"""End to end on CPU: the tiny config trains, checkpoints, resumes exactly, and fails loud."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from llds_jax import metrics as mlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Smaller than configs/tiny.py so each run is a few seconds after compilation.
FAST = ["--config.model.format_warmup_steps=0", "--config.rollout.prompts=2",
        "--config.rollout.group_size=4", "--config.rollout.max_turns=1",
        "--config.rollout.max_turn_tokens=12", "--config.rollout.max_obs_tokens=24", "--config.rl.minibatch_size=4",
        "--config.rl.micro_batch_size=4", "--config.mesh.data=2", "--config.mesh.fsdp=2",
        "--config.mesh.tensor=2", "--config.log.eval_every=0", "--config.log.progress=False",
        "--config.log.tensorboard=False", "--config.ckpt.every=1", "--config.ckpt.keep=5"]


def _run(workdir, *extra, wait=True):
  cmd = [sys.executable, "-m", "llds_jax.main", "--config=configs/tiny.py",
         f"--config.workdir={workdir}", *FAST, *extra]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  if not wait:
    return proc
  out, _ = proc.communicate(timeout=900)
  assert proc.returncode == 0, out[-4000:]
  return out


def _stream(workdir):
  recs = mlib.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in recs]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("full")
  _run(workdir, "--config.total_steps=3")
  return workdir


def test_tiny_run_writes_metrics_checkpoints_and_plots(uninterrupted):
  recs = mlib.read_metrics(os.path.join(uninterrupted, "metrics.jsonl"))
  assert [r["step"] for r in recs] == [1, 2, 3]
  for key in mlib.REQUIRED_KEYS:
    assert key in recs[0], key
  assert max(r["loss/llds_last"] for r in recs) > 0  # LLDS acts after the first minibatch
  assert all(r["skipped_nonfinite"] == 0 for r in recs)
  assert sorted(os.listdir(os.path.join(uninterrupted, "checkpoints")))[-1] == "3"
  assert json.load(open(os.path.join(uninterrupted, "config.json")))["rl"]["llds_lambda"] == 0.2
  plots = sorted(os.listdir(os.path.join(uninterrupted, "plots")))
  assert {"overview.png", "reward.png", "lld.png", "losses.png"} <= set(plots), plots
  # The update widths (P, R) and the rollout's cache only grow, and each checkpoint keeps them
  # for an exact resume.
  metas = [json.load(open(os.path.join(uninterrupted, "checkpoints", str(s), "meta",
                                       "metadata"))) for s in (1, 2, 3)]
  shapes = [m["widths"] + [m["capacity"]] for m in metas]
  assert all(min(s) > 0 for s in shapes), shapes
  assert all(a <= b for s0, s1 in zip(shapes, shapes[1:]) for a, b in zip(s0, s1)), shapes


def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(uninterrupted, tmp_path):
  """Two jax.distributed CPU processes × 4 devices == one process × 8 devices, same (2,2,2) mesh.

  Each process rolls out its own prompt (contiguous share) with its own retriever; the rows meet in
  one global batch. Step 1 must agree to float noise. From step 2 on only the rollout is compared:
  on the first minibatch of a step old == current policy, so LLDS's gate is decided by ~1e-8
  differences in summation order (gloo vs in-process collectives) and the update legitimately
  drifts; the sampled tokens do not.
  """
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  procs = [subprocess.Popen(
      [sys.executable, "-m", "llds_jax.main", "--config=configs/tiny.py",
       f"--config.workdir={tmp_path}", *FAST, "--config.total_steps=2", "--config.log.eval_every=2",
       "--config.log.eval_limit=3", f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=900)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  two, one = _stream(tmp_path), _stream(uninterrupted)[:2]
  assert [r["step"] for r in two] == [1, 2]
  for key, value in one[0].items():
    assert two[0][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
  for key in [k for k in one[1] if k.startswith(("rollout/", "reward/"))]:
    assert two[1][key] == pytest.approx(one[1][key], rel=1e-6), key
  # Validation: 3 questions padded to 4 over the two processes, the repeat dropped.
  assert two[1]["val/all/n"] == 3
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]


def test_sigkill_then_resume_matches_uninterrupted(uninterrupted, tmp_path):
  proc = _run(tmp_path, "--config.total_steps=3", wait=False)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
      break
    time.sleep(0.2)
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  _run(tmp_path, "--config.total_steps=3")
  assert _stream(tmp_path) == _stream(uninterrupted)


def test_corrupt_newest_checkpoint_falls_back(uninterrupted, tmp_path):
  import shutil
  shutil.copytree(uninterrupted, tmp_path, dirs_exist_ok=True)
  newest = tmp_path / "checkpoints" / "3" / "state"
  for root, _, files in os.walk(newest):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
  out = _run(tmp_path, "--config.total_steps=3")
  assert "checkpoints/3 is incomplete or corrupt" in out and "quarantine" in out
  recs = mlib.read_metrics(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in recs] == [1, 2, 3]  # step 3 redone from checkpoint 2
  assert _stream(tmp_path) == _stream(uninterrupted)


@pytest.mark.parametrize("override,field", [
    ("--config.rl.minibatch_size=3", "rl.minibatch_size"),
    ("--config.rl.llds_gate=chunk", "rl.llds_gate"),
    ("--config.data.train=/nonexistent.parquet", "data.train"),
    ("--config.mesh.tensor=3", "config.mesh"),
    ("--config.resume=False", "config.resume"),
    ("--config.rollout.weight_sharding=fsdp", "rollout.weight_sharding"),
    ("--config.rollout.prompts=0", "rollout.prompts"),
    ("--config.rollout.group_size=-1", "rollout.group_size"),
    ("--config.total_steps=0", "config.total_steps"),
    ("--config.rl.reward_scope=text", "rl.reward_scope"),
    ("--config.rollout.obs_truncation=tags", "rollout.obs_truncation"),
])
def test_bad_config_names_the_field(override, field, tmp_path):
  from llds_jax import config_check
  sys.path.insert(0, ROOT)
  from configs import tiny
  c = tiny.get_config()
  c.workdir = str(tmp_path)
  c.mesh.update(data=2, fsdp=2, tensor=2)  # valid on the 8 test devices, as in FAST
  c.rl.micro_batch_size = 4
  os.makedirs(tmp_path / "checkpoints" / "2")  # a previous run's, which resume=False must not wipe
  key, value = override[len("--config."):].split("=")
  if "." in key:
    section, name = key.split(".")
    c[section][name] = type(c[section][name])(value)
  else:
    c[key] = value == "True" if isinstance(c[key], bool) else type(c[key])(value)
  with pytest.raises((ValueError, FileNotFoundError), match=field):
    config_check.validate(c)


def test_lld_monitor_warns_on_sustained_fall_and_degeneration(caplog):
  import numpy as np
  mon = mlib.LLDMonitor(patience=3, repeat_threshold=0.5)
  with caplog.at_level("WARNING"):
    out = [mon.update(s, lp, 0.0) for s, lp in enumerate([-1.0, -1.1, -1.2, -1.1, -1.3, -1.4, -1.5])]
  assert [o["lld/falling_steps"] for o in out] == [0, 1, 2, 0, 1, 2, 3]
  assert sum("fell 3 steps in a row" in r.message for r in caplog.records) == 1
  resumed = mlib.LLDMonitor(patience=3)
  resumed.restore([{"lld/preserving_logp": -1.5, "lld/falling_steps": 3}])
  assert resumed.update(7, -1.6, 0.0)["lld/falling_steps"] == 4
  ids = np.array([[5, 5, 5, 5, 7, 9], [1, 2, 3, 4, 5, 6]])
  mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
  assert mlib.repeat_counts(ids, mask) == (3, 8)  # repeats, sampled pairs
  with caplog.at_level("WARNING"):
    mon.update(8, -1.0, 0.75)
  assert any("degenerate" in r.message for r in caplog.records)


def test_build_batch_layout_and_length_cap():
  import types

  import numpy as np
  from llds_jax import batch_layout
  rng = np.random.RandomState(0)
  plen, rlen = np.array([5, 40]), np.array([300, 7])
  ro = types.SimpleNamespace(
      prompt_len=plen, response_len=rlen, prompt_ids=rng.randint(1, 99, (2, 40)),
      response_ids=rng.randint(1, 99, (2, 320)), loss_mask=np.ones((2, 320)),
  )
  adv, weight = np.array([0.5, -0.5]), np.full((2, 320), 0.2)
  free = batch_layout.build_batch(ro, adv, weight)
  capped = batch_layout.build_batch(ro, adv, weight, max_len=320)
  # Buckets: P = 48, R = 384 uncapped (432 > 320); capped R = max(320 − 48, 300 → 320) = 320.
  assert free["input_ids"].shape == (2, 48 + 384)
  assert capped["input_ids"].shape == (2, 48 + 320) and capped["loss_mask"].shape == (2, 320)
  # Earlier, wider batches set a floor: the widths stay (64, 512) and no new shape is compiled.
  floored = batch_layout.build_batch(ro, adv, weight, floor=(64, 512))
  assert batch_layout.widths(floored) == (64, 512)
  # Capped: R = max(320 − 64, the 300-token response rounded up to 64) = 320.
  assert batch_layout.widths(batch_layout.build_batch(ro, adv, weight, max_len=320,
                                                      floor=(64, 512))) == (64, 320)
  for b in (free, capped, floored):
    P = b["input_ids"].shape[1] - b["loss_mask"].shape[1]
    for i in range(2):
      np.testing.assert_array_equal(b["input_ids"][i, P - plen[i]:P], ro.prompt_ids[i, :plen[i]])
      np.testing.assert_array_equal(b["input_ids"][i, P:P + rlen[i]], ro.response_ids[i, :rlen[i]])
      assert b["attn_mask"][i].sum() == plen[i] + rlen[i]
      assert b["positions"][i, P + rlen[i] - 1] == plen[i] + rlen[i] - 1


def test_sft_warmup_rows_are_the_rl_rows():
  import types

  import numpy as np
  from llds_jax import batch_layout, sft
  trajs = [sft.Trajectory([5, 6, 7], [8, 9], [1.0, 0.0]),
           sft.Trajectory([4], [3, 2, 1, 0], [1.0] * 4)]
  ro = types.SimpleNamespace(
      prompt_len=np.array([3, 1]), response_len=np.array([2, 4]),
      prompt_ids=np.array([[5, 6, 7], [4, 0, 0]]),
      response_ids=np.array([[8, 9, 0, 0], [3, 2, 1, 0]]),
      loss_mask=np.array([[1.0, 0.0, 0.0, 0.0], [1.0] * 4]))
  warm, rl = sft.layout(trajs), batch_layout.build_batch(ro, np.zeros(2), np.ones((2, 4)))
  # Same rows; the RL batch only pads further (P and R bucketed), on the outer sides.
  p_w, p_r = 3, rl["input_ids"].shape[1] - rl["loss_mask"].shape[1]
  for key in ("input_ids", "attn_mask", "positions"):
    np.testing.assert_array_equal(warm[key], rl[key][:, p_r - p_w:p_r + 4])
  np.testing.assert_array_equal(warm["loss_mask"], rl["loss_mask"][:, :4])


def test_sampling_weights_in_compute_dtype_are_exact():
  import jax
  import ml_collections
  import numpy as np
  from flax import nnx
  from llds_jax import policy, sharding
  from llds_jax.model import ModelConfig, Transformer
  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, dtype="bfloat16", param_dtype="float32",
                    attention_bias=True)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  graphdef, params = nnx.split(sharding.init_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)),
                                                     mesh))
  c = ml_collections.ConfigDict({"model": {"dtype": "bfloat16", "param_dtype": "float32"},
                                 "rollout": {"weight_sharding": "tensor"}})
  abstract = jax.eval_shape(lambda: params)
  cast = policy.compute_dtype_weights(c, abstract, mesh)(params)
  dtypes = {str(x.dtype) for x in jax.tree.leaves(cast) if x.ndim >= 2}
  assert dtypes == {"bfloat16"}
  # The tensor layout: split over `tensor` only, whole over data/fsdp; the dry run's view agrees.
  assert tuple(cast["layers"][0]["gate"][...].sharding.spec) == (None, "tensor")
  spec = policy.rollout_weights(c, abstract, mesh)
  assert [(x.dtype, x.sharding) for x in jax.tree.leaves(cast)] == [
      (x.dtype, x.sharding) for x in jax.tree.leaves(spec)]
  assert {str(x.dtype) for x in jax.tree.leaves(cast) if x.ndim == 1} == {"float32"}
  ids = np.random.RandomState(0).randint(0, 64, (4, 12))
  # Against the float32 weights in the same layout: a layout change alone moves bf16 rounding.
  want = nnx.merge(graphdef, jax.device_put(params, jax.tree.map(lambda x: x.sharding, spec)))(ids)
  got = nnx.merge(graphdef, cast)(ids)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_sampling_weights_are_the_params_when_dtype_and_layout_match():
  import jax
  import ml_collections
  from flax import nnx
  from llds_jax import policy, sharding
  from llds_jax.model import ModelConfig, Transformer
  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                    num_kv_heads=2, head_dim=8)
  params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))[1]
  for mesh_shape, layout in (({"data": 2, "fsdp": 2, "tensor": 2}, "train"),
                             ({"data": 4, "fsdp": 1, "tensor": 2}, "tensor")):  # no fsdp split
    mesh = sharding.make_mesh(mesh_shape)
    placed = jax.device_put(params, sharding.state_shardings(params, mesh))
    c = ml_collections.ConfigDict({"model": {"dtype": "float32", "param_dtype": "float32"},
                                   "rollout": {"weight_sharding": layout}})
    assert policy.compute_dtype_weights(c, jax.eval_shape(lambda: placed), mesh)(placed) is placed


def test_unknown_config_field_is_named_before_parsing():
  from llds_jax import overrides
  tiny = os.path.join(ROOT, "configs", "tiny.py")
  assert overrides.unknown_field(["main", f"--config={tiny}", "--config.rl.llds_lambda=0.3",
                                  "--config.workdir=/tmp/x"]) is None
  msg = overrides.unknown_field(["main", f"--config={tiny}", "--config.rl.llds_lamda=0.3"])
  assert "no field config.rl.llds_lamda" in msg and "llds_lambda" in msg
  assert "no field config.foo" in overrides.unknown_field(["m", "--config", tiny, "--config.foo"])
  assert "config.seed is a value" in overrides.unknown_field(["m", f"--config={tiny}",
                                                              "--config.seed.x=1"])
  out = subprocess.run([sys.executable, "-m", "llds_jax.main", f"--config={tiny}",
                        "--config.workdir=/tmp/x", "--config.foo=1"], cwd=ROOT, text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
  assert out.returncode == 1 and "Traceback" not in out.stdout
  assert "--config.foo=1: " in out.stdout and "no field config.foo" in out.stdout


def test_resume_with_another_model_is_refused_and_touches_nothing(uninterrupted, tmp_path):
  import shutil
  shutil.copytree(uninterrupted, tmp_path, dirs_exist_ok=True)
  before = {p: os.path.getmtime(os.path.join(r, p)) for r, _, fs in os.walk(tmp_path) for p in fs}
  proc = _run(tmp_path, "--config.total_steps=4", "--config.model.random.hidden_size=32",
              wait=False)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode != 0
  assert "'model.random.hidden_size': checkpoint has 64, this config 32" in out, out[-3000:]
  after = {p: os.path.getmtime(os.path.join(r, p)) for r, _, fs in os.walk(tmp_path) for p in fs}
  assert after == before  # checkpoints, metrics and config.json untouched


def test_over_long_question_anywhere_fails_before_the_warm_up(tmp_path):
  from llds_jax import trainer
  sys.path.insert(0, ROOT)
  from configs import tiny
  c = tiny.get_config()  # 300 warm-up steps: minutes, if the check came after them
  c.workdir = str(tmp_path)
  c.mesh.update(data=2, fsdp=2, tensor=2)
  c.rl.micro_batch_size = 4
  c.rollout.max_prompt_tokens = 200
  t0 = time.time()
  with pytest.raises(ValueError, match=r"config.data.train: question \d+ .* prompt tokens, over "
                                       r"config.rollout.max_prompt_tokens=200"):
    trainer.train(c)
  assert time.time() - t0 < 60
  c.rollout.max_prompt_tokens, c.rollout.prompts = 512, 84  # the file has 83 questions
  with pytest.raises(ValueError, match="config.rollout.prompts=84 exceeds the 83 questions"):
    trainer.train(c)
