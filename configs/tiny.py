"""CPU smoke run: a random 2-layer Qwen2 on the shipped 300-summary wiki sample and FanOutQA Qs.

  python -m llds_jax.main --config=configs/tiny.py --config.workdir=/tmp/llds_tiny

Every stage of a real run executes: a short supervised format warm-up (the model is random and
would otherwise never close a <search> tag), then multi-turn rollouts that search a BM25 index,
EM reward, GRPO + LLDS minibatch updates, checkpoints, metrics.jsonl, TensorBoard and plots.
Measured on 2 CPU cores with 2/4-row blocks: 2.5 min in all, ~2 min of it the warm-up;
then 3 steps in 21 s (15 s for the first, which compiles; 2-5 s after). With today's 8-row blocks,
on the same 2 cores shared with other jobs (load average ~11): 7.3 min in all, steps 47 / 24 /
14 s (not re-measured idle). The model is tiny, so rewards stay near 0: this checks the plumbing,
not learning (tools/lld_experiment.py shows LLD and its cure on a testbed).
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
  # Two tiny blocks: the scan's per-step weight stacking costs more on CPU than it saves (the
  # format warm-up runs ~25 % slower with it); the pod configs keep base.py's scan. A deep model
  # (e.g. a 30-layer GGUF via --config.model.path) wants --config.model.scan_layers=True and
  # --config.model.scan_cache=True: unrolled, every program compiles all its blocks
  # (bench/compile.py, bench/RESULTS.md).
  c.model.scan_layers = False
  c.model.scan_cache = False
  # A random model never closes a <search> tag, so nothing would be searched: fit the action
  # format first (llds_jax/sft.py; ~1 min on 2 cores, redone deterministically on resume).
  c.model.format_warmup_steps = 300
  c.model.format_warmup_lr = 3e-3
  c.data.train = os.path.join(_TESTDATA, "fanoutqa_answerable.parquet")
  c.data.val = os.path.join(_TESTDATA, "fanoutqa_answerable.parquet")
  c.retriever.index = os.path.join(_TESTDATA, "wiki_sample.jsonl")  # a corpus is indexed on load
  c.rollout.prompts = 4
  c.rollout.group_size = 4
  c.rollout.max_turns = 2
  c.rollout.max_turn_tokens = 64  # room for "<think> … </think>\n<search> question </search>"
  c.rollout.max_obs_tokens = 64
  c.rollout.max_prompt_tokens = 512
  c.rollout.max_context = 1024
  c.rollout.cache_dtype = "float32"
  # Row blocks of 8: every block needs a row per data shard, and the mesh puts all devices on
  # data, so this file runs unchanged on 1, 2, 4 and 8 devices (a v5e-8 / v6e-8 VM, or
  # --xla_force_host_platform_device_count=8). Two optimizer steps per rollout batch, so LLDS acts.
  c.rl.minibatch_size = 8
  c.rl.micro_batch_size = 8
  c.rl.logprob_micro_batch_size = 8
  c.rl.logprob_chunk = 64
  c.opt.lr = 1e-3
  c.opt.warmup_steps = 0
  c.ckpt.every = 2
  c.ckpt.async_save = False
  c.log.eval_every = 3
  c.log.eval_limit = 4
  return c
