"""Qwen2.5-7B-Instruct, GRPO + LLDS (paper setting) on a TPU v4-128 slice (64 chips).

  python tools/dry_run.py --config=configs/pod_qwen7b_v4.py     # AOT check on 64 CPU devices
  python -m llds_jax.main --config=configs/pod_qwen7b_v4.py --config.workdir=... \
      --config.model.path=/ckpts/Qwen2.5-7B-Instruct ...        # see configs/pod_base.py

DOES NOT FIT (measured, docs/scaling.md). Mesh fsdp 16 × tensor 4, micro-batch 16 is the same
compile as pod_qwen7b_v5p.py: train step 35.9 GB and decode 35.8 GB per chip against the
30.9 GB budget of a 32 GiB chip (prefill 28.7 GB and log-probs 12.8 GB fit); the KV cache is
8.9 GB per chip (rows over fsdp 16, KV heads over tensor 4). λ = 0.3 (the paper's
7B-Instruct value).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import pod_base  # noqa: E402  (config files are loaded by path)


def get_config():
  return pod_base.pod_config("7b", "v4", 64, data=1, fsdp=16, tensor=4, micro_batch=16)
