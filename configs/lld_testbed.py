"""One arm of the CPU-scale LLD testbed (docs/lld-testbed.md); the argument is the testbed dir.

  python tools/lld_experiment.py --outdir=/tmp/lld   # builds the testbed, runs every arm
  python -m llds_jax.main --config=configs/lld_testbed.py:/tmp/lld/testbed \\
      --config.workdir=/tmp/lld/grpo --config.rl.llds_lambda=0   # one arm by hand

The testbed dir holds what `tools/lld_experiment.py` writes: a synthetic corpus of fictional
people, the RL question parquet, and the format-warmed-up policy (HF dir with its tokenizer).
The official loss settings (clip 0.2, low-var KL 0.001, entropy 0.001, grad clip 1.0, λ = 0.2
with the action gate) are kept; the scale knobs (batch, lengths, lr) are shrunk or raised so
that an arm of 60 steps runs in a few minutes on 2 CPU cores.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import base  # noqa: E402  (config files are loaded by path)


def get_config(testbed: str = "/tmp/lld/testbed"):
  c = base.get_config()
  c.total_steps = 60
  c.model.path = os.path.join(testbed, "warm_model")  # written by the warm-up
  c.model.tokenizer = ""  # the model dir carries the testbed tokenizer
  c.model.dtype = "float32"
  c.model.remat = "none"
  c.data.train = os.path.join(testbed, "rl_train.parquet")
  c.retriever.index = os.path.join(testbed, "corpus.jsonl")  # indexed on load (~300 docs)
  c.rollout.prompts = 8
  c.rollout.group_size = 5  # official n_agent
  c.rollout.max_turns = 2  # two searches cover the two-hop questions
  c.rollout.max_turn_tokens = 40  # an ideal action is ~20 tokens
  c.rollout.max_obs_tokens = 128  # three ~30-token documents
  c.rollout.max_prompt_tokens = 256
  # Below shortest prompt (~50) + worst-case response (3·40 + 2·128), so the rollout's KV-cache
  # size (the min of the two) is the same every step and the sampler compiles once; an ideal
  # two-hop episode is ~330 tokens.
  c.rollout.max_context = 384
  c.rollout.top_p = 1.0  # the paper's value; 0.95 would hide the low-probability tail
  c.rollout.cache_dtype = "float32"
  c.rl.minibatch_size = 10  # 4 optimizer steps per rollout batch: LLDS acts on 3 of them
  c.rl.micro_batch_size = 10  # two whole groups, so every micro-batch has preserving rows
  c.rl.logprob_micro_batch_size = 0  # 40 rows: one call
  c.rl.logprob_chunk = 128
  c.opt.lr = 1e-3  # raised from 1e-6: vanilla GRPO collapses by step ~20 (5e-4: ~step 60 dip)
  c.opt.warmup_steps = 5
  c.ckpt.every = 1000  # only the final step is saved
  c.ckpt.keep = 1
  c.ckpt.async_save = False
  c.log.eval_every = 0
  c.log.tensorboard = False
  c.log.progress = False
  return c
