"""Qwen2.5-7B-Instruct, GRPO + LLDS (paper setting) on a TPU v5p-128 slice (64 chips).

  python tools/dry_run.py --config=configs/pod_qwen7b_v5p.py     # AOT check on 64 CPU devices
  python -m llds_jax.main --config=configs/pod_qwen7b_v5p.py --config.workdir=... \
      --config.model.path=/ckpts/Qwen2.5-7B-Instruct ...        # see configs/pod_base.py

Mesh fsdp 64 (data 1 × fsdp 64 × tensor 1), micro-batch 64 (one row per chip), log-prob blocks
of 128 rows, full remat over a scan of the layers, bf16 KV cache, rollout weights whole on every
chip (15.2 GB). Per chip, with the resident state beside each program, against the 85.5 GB
budget: MEASURED max 73.8 GB (observation feed), ESTIMATED without the CPU's f32 upcasts max
54.8 GB (prefill): FITS. PREDICTED step ≈ 83 s with the packed update on the recorded testbed
lengths (padded: 144 s); fsdp 16 × tensor 4 also fits (max 44.0 GB measured) but predicts 187 s
padded (tensor all-reduces). λ = 0.3 (the paper's 7B-Instruct value).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import pod_base  # noqa: E402  (config files are loaded by path)


def get_config():
  return pod_base.pod_config("7b", "v5p", 64, data=1, fsdp=64, tensor=1, micro_batch=64)
