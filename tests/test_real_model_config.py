"""configs/real_model.py loads for each shipped model, its sizes divide, and a bad name is named."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import real_model  # noqa: E402


@pytest.mark.parametrize("model", sorted(real_model.MODELS))
def test_real_model_config_sizes(model):
  c = real_model.get_config(model)
  assert c.model.path.endswith(".gguf") and os.path.isabs(c.model.path)
  assert c.model.tokenizer == "" and c.model.format_warmup_steps > 0
  rows = c.rollout.prompts * c.rollout.group_size
  assert rows % c.rl.minibatch_size == 0 and rows // c.rl.minibatch_size > 1  # LLDS acts
  assert c.rl.minibatch_size % c.rl.micro_batch_size == 0
  assert rows % c.rl.logprob_micro_batch_size == 0
  # One row per data shard on up to 8 devices (a GPU, or a v5e-8/v6e-8 host).
  assert c.rl.micro_batch_size % 8 == 0 and c.model.format_warmup_batch % 8 == 0
  worst = ((c.rollout.max_turns + 1) * c.rollout.max_turn_tokens
           + c.rollout.max_turns * c.rollout.max_obs_tokens)
  assert c.rollout.max_prompt_tokens + worst <= c.rollout.max_context


def test_unknown_model_is_named():
  with pytest.raises(ValueError, match="configs/real_model.py:gpt2: unknown model"):
    real_model.get_config("gpt2")


def test_accelerator_script_needs_only_its_own_model(tmp_path):
  """tools/accelerator_run.sh checks the chosen model's assets (a GPU box need not carry the
  other GGUF) and hands its extra flags to tools/real_run.py (here --help: nothing runs)."""
  import subprocess
  for name, rel in [("smollm_gguf", "models/smollm2-135m-instruct.q4_1.gguf"),
                    ("wiki_index", "data/wiki_summaries/bm25_okapi/meta.json"),
                    ("fanoutqa_train", "data/fanoutqa/train.parquet"),
                    ("fanoutqa_test", "data/fanoutqa/test.parquet")]:
    os.makedirs(os.path.dirname(tmp_path / rel), exist_ok=True)
    (tmp_path / rel).write_text(name)
  env = dict(os.environ, LLDS_ASSETS=str(tmp_path), PYTHON=sys.executable, JAX_PLATFORMS="cpu")
  run = lambda model: subprocess.run(  # noqa: E731
      ["bash", os.path.join(ROOT, "tools", "accelerator_run.sh"), str(tmp_path / "out"), "--help"],
      env=dict(env, MODEL=model), capture_output=True, text=True, timeout=300)
  ok = run("smollm")
  assert ok.returncode == 0 and "--eval_limit" in ok.stdout, ok.stdout[-2000:] + ok.stderr[-2000:]
  missing = run("qwen05b")
  assert missing.returncode != 0 and "qwen_gguf" in missing.stderr, missing.stderr[-2000:]
