"""Opt-in (--runslow): tools/real_run.py end to end on SmolLM2-135M at --smoke size, on CPU.

Needs the assets of tools/fetch_assets.py. Every stage of the accelerator recipe runs: the format
warm-up of the GGUF model in its own chat template, EM before and after it, a GRPO and an LLDS
arm from the warmed-up weights, EM after each, summary.json/md. At this size nothing is learned;
the test checks the pipeline and the records, not the numbers.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from llds_jax import assets

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def real_run(outdir) -> dict:
  """tools/real_run.py --smoke in a process of its own on one CPU device: replicated on the 8
  simulated devices of the test process, SmolLM2's weights and optimizer state exceed 24 GiB."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env = dict(os.environ, XLA_FLAGS=" ".join(flags + ["--xla_force_host_platform_device_count=1"]))
  subprocess.run([sys.executable, os.path.join(ROOT, "tools", "real_run.py"), "--model=smollm",
                  f"--outdir={outdir}", "--smoke"], check=True, env=env, cwd=ROOT)
  with open(os.path.join(outdir, "summary.json")) as f:
    return json.load(f)


def test_real_run_smoke(tmp_path):
  assets.asset_paths(require=["smollm_gguf", "wiki_index", "fanoutqa_train", "fanoutqa_test"])
  summary = real_run(tmp_path)
  for stage in ("eval_base", "eval_warm", "eval_grpo", "eval_llds_action"):
    assert summary[stage]["n"] == 4 and 0.0 <= summary[stage]["em"] <= 1.0, stage
  assert np.isfinite(summary["warmup"]["nll_last"]) and summary["warmup"]["steps"] == 2
  for arm in ("grpo", "llds_action"):
    assert summary[arm]["steps"] == 1 and len(summary[arm]["reward"]) == 1
    assert os.path.isdir(tmp_path / arm / "checkpoints")
  assert summary["model"] == "smollm" and summary["devices"] == 1
  assert "| after llds_action |" in (tmp_path / "summary.md").read_text()
  # A second call finds every stage done and redoes nothing.
  again = real_run(tmp_path)
  assert again["grpo"]["stage_seconds"] == summary["grpo"]["stage_seconds"]
