"""Qwen2.5-7B-Instruct, GRPO + LLDS (paper setting) on a TPU v5e-256 slice (256 chips).

  python tools/dry_run.py --config=configs/pod_qwen7b_v5e.py     # AOT check on 256 CPU devices
  python -m llds_jax.main --config=configs/pod_qwen7b_v5e.py --config.workdir=... \
      --config.model.path=/ckpts/Qwen2.5-7B-Instruct ...        # see configs/pod_base.py

Mesh fsdp 64 × tensor 4, micro-batch 64 (one row per four chips), log-prob blocks of 128 rows,
full remat over a scan of the layers, bf16 KV cache (2.2 GB per chip), rollout weights split over
tensor only (3.8 GB). Per chip, with the resident state, against the 14.4 GB budget of a 16 GB
chip: ESTIMATED without the CPU's f32 upcasts of bf16 arguments max 11.7 GB (prefill): FITS by
the estimate; the CPU compile MEASURES 18.8 GB (observation feed). PREDICTED step ≈ 122 s.
A v5e-128 slice does not fit (fsdp 32 × tensor 4: prefill estimated 16.0 GB, decode 14.7 GB).
λ = 0.3 (the paper's 7B-Instruct value).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import pod_base  # noqa: E402  (config files are loaded by path)


def get_config():
  return pod_base.pod_config("7b", "v5e", 256, data=1, fsdp=64, tensor=4, micro_batch=64)
