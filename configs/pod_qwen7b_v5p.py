"""Qwen2.5-7B-Instruct, GRPO + LLDS (paper setting) on a TPU v5p-128 slice (64 chips).

  python tools/dry_run.py --config=configs/pod_qwen7b_v5p.py     # AOT check on 64 CPU devices
  python -m llds_jax.main --config=configs/pod_qwen7b_v5p.py --config.workdir=... \
      --config.model.path=/ckpts/Qwen2.5-7B-Instruct ...        # see configs/pod_base.py

Mesh fsdp 16 × tensor 4, micro-batch 16 (one row per row shard), log-prob blocks of 128 rows,
full remat, bf16 KV cache. MEASURED (tools/dry_run.py, CPU compiler, per chip, with the resident
state beside each program): train step 35.9 GB, log-probs 12.8 GB, prefill 28.7 GB, decode
35.8 GB of the 85.5 GB budget: FITS. PREDICTED step ≈ 274 s. λ = 0.3 (the paper's 7B-Instruct
value).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import pod_base  # noqa: E402  (config files are loaded by path)


def get_config():
  return pod_base.pod_config("7b", "v5p", 64, data=1, fsdp=16, tensor=4, micro_batch=16)
