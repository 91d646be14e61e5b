"""Qwen2.5-3B-Instruct, GRPO + LLDS (paper setting) on a TPU v4-128 slice (64 chips).

  python tools/dry_run.py --config=configs/pod_qwen3b_v4.py     # AOT check on 64 CPU devices
  python -m llds_jax.main --config=configs/pod_qwen3b_v4.py --config.workdir=... \
      --config.model.path=/ckpts/Qwen2.5-3B-Instruct ...        # see configs/pod_base.py

Mesh fsdp 32 × tensor 2 (2 KV heads: the cache splits over tensor 2), micro-batch 32 (one row per
two chips), log-prob blocks of 128 rows, full remat over a scan of the layers, bf16 KV cache,
rollout weights split over tensor only (3.1 GB). Per chip, with the resident state, against the
30.9 GB budget of a 32 GiB chip: MEASURED max 30.2 GB (observation feed), ESTIMATED without the
CPU's f32 upcasts max 17.4 GB (prefill): FITS. PREDICTED step ≈ 143 s. A v4-64 slice (32 chips)
does not fit: its best layout (fsdp 16 × tensor 2) estimates 31.0 GB for prefill.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import pod_base  # noqa: E402  (config files are loaded by path)


def get_config():
  return pod_base.pod_config("3b", "v4", 64, data=1, fsdp=32, tensor=2, micro_batch=32)
