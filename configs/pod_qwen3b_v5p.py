"""Qwen2.5-3B-Instruct, GRPO + LLDS (paper setting) on a TPU v5p-64 slice (32 chips).

  python tools/dry_run.py --config=configs/pod_qwen3b_v5p.py     # AOT check on 32 CPU devices
  python -m llds_jax.main --config=configs/pod_qwen3b_v5p.py --config.workdir=... \
      --config.model.path=/ckpts/Qwen2.5-3B-Instruct ...        # see configs/pod_base.py

Mesh fsdp 32 (data 1 × fsdp 32 × tensor 1), micro-batch 32 (one row per chip), log-prob blocks
of 128 rows, full remat, bf16 KV cache. MEASURED (tools/dry_run.py, CPU compiler, per chip, with
the resident state beside each program): train step 59.2 GB, log-probs 18.3 GB, prefill 39.0 GB,
decode 48.0 GB of the 85.5 GB budget (95 GB − 10 %): FITS. Micro-batch 64 (89.3 GB) and
data 8 × tensor 4 (77.6 GB train step, 45.8 GB of replicated KV cache) were measured too; see
docs/scaling.md. PREDICTED step ≈ 290 s, of which 174 s is decode's per-token weight all-gather.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import pod_base  # noqa: E402  (config files are loaded by path)


def get_config():
  return pod_base.pod_config("3b", "v5p", 32, data=1, fsdp=32, tensor=1, micro_batch=32)
