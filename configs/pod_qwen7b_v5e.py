"""Qwen2.5-7B-Instruct, GRPO + LLDS (paper setting) on a TPU v5e-128 slice (128 chips).

  python tools/dry_run.py --config=configs/pod_qwen7b_v5e.py     # AOT check on 128 CPU devices
  python -m llds_jax.main --config=configs/pod_qwen7b_v5e.py --config.workdir=... \
      --config.model.path=/ckpts/Qwen2.5-7B-Instruct ...        # see configs/pod_base.py

NOT RUN (a 128-device 7B compile did not fit this session's time) and expected NOT TO FIT: the
same mesh on 64 chips measures 35.6 GB of KV cache and 35.9 GB of train step per chip
(pod_qwen7b_v5p.py), and 16 GB chips leave 14.4 GB. λ = 0.3 (the paper's 7B-Instruct value).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import pod_base  # noqa: E402  (config files are loaded by path)


def get_config():
  return pod_base.pod_config("7b", "v5e", 128, data=1, fsdp=32, tensor=4, micro_batch=32)
