"""Qwen2.5-3B-Instruct, GRPO + LLDS (paper setting) on a TPU v5e-128 slice (128 chips).

  python tools/dry_run.py --config=configs/pod_qwen3b_v5e.py     # AOT check on 128 CPU devices
  python -m llds_jax.main --config=configs/pod_qwen3b_v5e.py --config.workdir=... \
      --config.model.path=/ckpts/Qwen2.5-3B-Instruct ...        # see configs/pod_base.py

Mesh fsdp 64 × tensor 2, micro-batch 64 (one row per two chips), log-prob blocks of 128 rows, full
remat over a scan of the layers, bf16 KV cache (2.9 GB per chip), rollout weights split over
tensor only (3.1 GB). Per chip, with the resident state, against the 14.4 GB budget of a 16 GB
chip: ESTIMATED without the CPU's f32 upcasts of bf16 arguments max 11.6 GB (prefill): FITS by
the estimate; the CPU compile MEASURES 20.1 GB (observation feed). PREDICTED step ≈ 97 s. A
v5e-64 slice does not fit (fsdp 32 × tensor 2: prefill estimated 17.4 GB).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import pod_base  # noqa: E402  (config files are loaded by path)


def get_config():
  return pod_base.pod_config("3b", "v5e", 128, data=1, fsdp=64, tensor=2, micro_batch=64)
