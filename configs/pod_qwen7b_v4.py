"""Qwen2.5-7B-Instruct, GRPO + LLDS (paper setting) on a TPU v4-128 slice (64 chips).

  python tools/dry_run.py --config=configs/pod_qwen7b_v4.py     # AOT check on 64 CPU devices
  python -m llds_jax.main --config=configs/pod_qwen7b_v4.py --config.workdir=... \
      --config.model.path=/ckpts/Qwen2.5-7B-Instruct ...        # see configs/pod_base.py

Mesh fsdp 16 × tensor 4, micro-batch 16 (one row per row shard), log-prob blocks of 128 rows, full
remat over a scan of the layers, bf16 KV cache (8.9 GB per chip: rows over fsdp 16, KV heads over
tensor 4), rollout weights split over tensor only (3.8 GB). Per chip, with the resident state,
against the 30.9 GB budget: ESTIMATED without the CPU's f32 upcasts of bf16 arguments max
27.2 GB (prefill): FITS by the estimate; the CPU compile MEASURES 44.0 GB (observation feed),
so this is the config to check first on hardware. PREDICTED step ≈ 353 s. λ = 0.3.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import pod_base  # noqa: E402  (config files are loaded by path)


def get_config():
  return pod_base.pod_config("7b", "v4", 64, data=1, fsdp=16, tensor=4, micro_batch=16)
