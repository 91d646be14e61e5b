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
