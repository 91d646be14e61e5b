"""Qwen2.5-3B-Instruct, GRPO + LLDS (paper setting) on a TPU v4-64 slice (32 chips).

  python tools/dry_run.py --config=configs/pod_qwen3b_v4.py     # AOT check on 32 CPU devices
  python -m llds_jax.main --config=configs/pod_qwen3b_v4.py --config.workdir=... \
      --config.model.path=/ckpts/Qwen2.5-3B-Instruct ...        # see configs/pod_base.py

DOES NOT FIT (measured, docs/scaling.md). Mesh fsdp 32, micro-batch 32 is the same compile as
pod_qwen3b_v5p.py: train step 59.2 GB, decode 48.0 GB, prefill 39.0 GB per chip against the
30.9 GB budget of a 32 GiB chip (log-probs 18.3 GB fit). fsdp 16 × tensor 2, micro-batch 16 was
measured too: train step 34.8 GB, decode 65.0 GB (the KV cache is sharded by rows only, so a
tensor axis replicates it). It needs the fixes listed in docs/scaling.md (per-layer remat that
the scheduler honours, reduce-scattered gradients, a tensor-sharded cache) or a larger slice.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import pod_base  # noqa: E402  (config files are loaded by path)


def get_config():
  return pod_base.pod_config("3b", "v4", 32, data=1, fsdp=32, tensor=1, micro_batch=32)
