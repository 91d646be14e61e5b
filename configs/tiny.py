"""CPU smoke run: a random 2-layer Qwen2 on the shipped 300-summary wiki sample and FanOutQA Qs.

  python -m llds_jax.main --config=configs/tiny.py --config.workdir=/tmp/llds_tiny

Every stage of a real run executes (multi-turn rollout against a BM25 index, EM reward, GRPO +
LLDS minibatch updates, checkpoint, metrics.jsonl, TensorBoard). Measured on 2 CPU cores: 38 s
for 3 steps including compilation, 2 s per step once compiled. The model is random, so it emits
no valid <search>/<answer> (every turn gets the invalid-action observation) and rewards are 0:
this checks the plumbing, not learning. tools/lld_experiment.py shows a policy that first learns
the format (config.model.format_warmup_steps) and then searches.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import base  # noqa: E402  (config files are loaded by path)

_TESTDATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests",
                         "testdata")


def get_config():
  c = base.get_config()
  c.total_steps = 3
  c.model.tokenizer = os.path.join(_TESTDATA, "tiny_tokenizer")
  c.model.dtype = "float32"
  c.model.remat = "none"
  c.data.train = os.path.join(_TESTDATA, "fanoutqa_answerable.parquet")
  c.data.val = os.path.join(_TESTDATA, "fanoutqa_answerable.parquet")
  c.retriever.index = os.path.join(_TESTDATA, "wiki_sample.jsonl")  # a corpus is indexed on load
  c.rollout.prompts = 4
  c.rollout.group_size = 4
  c.rollout.max_turns = 2
  c.rollout.max_turn_tokens = 24
  c.rollout.max_obs_tokens = 64
  c.rollout.max_prompt_tokens = 512
  c.rollout.max_context = 1024
  c.rollout.cache_dtype = "float32"
  c.rl.minibatch_size = 4  # 4 optimizer steps per rollout batch, so LLDS acts
  c.rl.micro_batch_size = 2
  c.rl.logprob_micro_batch_size = 4
  c.rl.logprob_chunk = 64
  c.opt.lr = 1e-3
  c.opt.warmup_steps = 0
  c.ckpt.every = 2
  c.ckpt.async_save = False
  c.log.eval_every = 3
  c.log.eval_limit = 4
  return c
