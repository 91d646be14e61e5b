"""SIGKILL at every phase of a tiny run, then resume: the metric stream equals an uninterrupted one.

Each kill lands at an exact moment through the test-only hook `LLDS_KILL_AT` (llds_jax/faults.py).
The kills are chained (each resumed run is killed at the next phase), so seven processes cover:
warm-up, rollout, update, checkpoint write (committed, not yet sealed), validation, a torn metrics
line, and the final clean resume. A persistent compilation cache shared by the processes keeps
the whole test near two minutes on two cores.
"""

import os
import signal
import subprocess
import sys

import pytest

from llds_jax import checkpoint
from test_trainer import FAST, ROOT, _stream

# Smaller still than test_trainer's runs: 2 warm-up steps, validation of 2 questions at step 2.
KILL = FAST + ["--config.model.format_warmup_steps=2", "--config.model.format_warmup_batch=4",
               "--config.log.eval_every=2", "--config.log.eval_limit=2",
               "--config.log.eval_max_turns=1", "--config.log.plots=False",
               "--config.total_steps=3"]


def _run(workdir, cache_dir, kill_at=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  env.pop("LLDS_KILL_AT", None)
  if kill_at:
    env["LLDS_KILL_AT"] = kill_at
  proc = subprocess.run([sys.executable, "-m", "llds_jax.main", "--config=configs/tiny.py",
                         f"--config.workdir={workdir}", *KILL], cwd=ROOT, env=env,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
  want = -signal.SIGKILL if kill_at else 0
  assert proc.returncode == want, f"{kill_at}: rc {proc.returncode}\n{proc.stdout[-4000:]}"
  return proc.stdout


def test_kill_at_every_phase_then_resume_equals_uninterrupted(tmp_path):
  cache, full, killed = tmp_path / "jax_cache", tmp_path / "full", tmp_path / "killed"
  _run(full, cache)
  ckpts = str(killed / "checkpoints")
  _run(killed, cache, "warmup")
  assert not os.path.exists(killed / "metrics.jsonl")
  _run(killed, cache, "rollout:1")
  _run(killed, cache, "update:1")
  _run(killed, cache, "checkpoint:1")  # step 1 recorded and committed, not sealed
  assert [r["step"] for r in _stream(killed)] == [1]
  assert checkpoint.newest_intact(ckpts)[0] is None
  out = _run(killed, cache, "validation:2")  # checkpoint 1 moved aside, step 1 redone
  assert "moving it to" in out and os.listdir(ckpts + ".quarantine")
  assert [r["step"] for r in _stream(killed)] == [1]
  _run(killed, cache, "metrics:2")  # a torn line for step 2
  assert not (killed / "metrics.jsonl").read_text().endswith("\n")
  out = _run(killed, cache)
  assert "torn last line" in out
  assert _stream(killed) == _stream(full)
  assert checkpoint.saved_steps(ckpts) == checkpoint.saved_steps(str(full / "checkpoints"))
