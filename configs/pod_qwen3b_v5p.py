"""Qwen2.5-3B-Instruct, GRPO + LLDS (paper setting) on a TPU v5p-64 slice (32 chips).

  python tools/dry_run.py --config=configs/pod_qwen3b_v5p.py     # AOT check on 32 CPU devices
  python -m llds_jax.main --config=configs/pod_qwen3b_v5p.py --config.workdir=... \
      --config.model.path=/ckpts/Qwen2.5-3B-Instruct ...        # see configs/pod_base.py

Mesh fsdp 32 (data 1 × fsdp 32 × tensor 1), micro-batch 32 (one row per chip), log-prob blocks
of 128 rows, full remat over a scan of the layers, bf16 KV cache, rollout weights whole on every
chip (rollout.weight_sharding="tensor", 6.2 GB), sampler cache path unrolled (scan_cache=False).
Per chip, with the resident state beside each program (tools/dry_run.py; docs/scaling.md),
against the 85.5 GB budget (95 GB − 10 %): MEASURED by the CPU compiler, max 42.8 GB
(observation feed); ESTIMATED without the CPU's f32 copies of bf16 arguments, max 42.2 GB
(observation feed): FITS. PREDICTED step ≈ 69 s with the packed update on
the recorded testbed lengths (decode 13, log-probs 14, update 37; padded: 123 s, update 77).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import pod_base  # noqa: E402  (config files are loaded by path)


def get_config():
  return pod_base.pod_config("3b", "v5p", 32, data=1, fsdp=32, tensor=1, micro_batch=32)
