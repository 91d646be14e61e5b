"""Opt-in (--runslow): tools/real_run.py end to end on SmolLM2-135M at --smoke size, on CPU.

Needs the assets of tools/fetch_assets.py. Every stage of the accelerator recipe runs: the format
warm-up of the GGUF model in its own chat template, EM before and after it, a GRPO and an LLDS
arm from the warmed-up weights, EM after each, summary.json/md. At this size nothing is learned;
the test checks the pipeline and the records, not the numbers.
"""

import json
import os

import numpy as np
import pytest

from llds_jax import data
from tool_loader import load

pytestmark = pytest.mark.slow


def test_real_run_smoke(tmp_path):
  data.asset_paths(require=["smollm_gguf", "wiki_index", "fanoutqa_train", "fanoutqa_test"])
  real_run = load("tools/real_run.py", "real_run")
  summary = real_run.main(["--model=smollm", f"--outdir={tmp_path}", "--smoke"])
  for stage in ("eval_base", "eval_warm", "eval_grpo", "eval_llds_action"):
    assert summary[stage]["n"] == 4 and 0.0 <= summary[stage]["em"] <= 1.0, stage
  assert np.isfinite(summary["warmup"]["nll_last"]) and summary["warmup"]["steps"] == 2
  for arm in ("grpo", "llds_action"):
    assert summary[arm]["steps"] == 1 and len(summary[arm]["reward"]) == 1
    assert os.path.isdir(tmp_path / arm / "checkpoints")
  assert json.loads((tmp_path / "summary.json").read_text())["model"] == "smollm"
  assert "| after llds_action |" in (tmp_path / "summary.md").read_text()
  # A second call finds every stage done and redoes nothing.
  again = real_run.main(["--model=smollm", f"--outdir={tmp_path}", "--smoke"])
  assert again["grpo"]["stage_seconds"] == summary["grpo"]["stage_seconds"]
