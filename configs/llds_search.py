"""GRPO + LLDS (action gate, λ = 0.2): the paper's method, Table 1/2 settings.

  python -m llds_jax.main --config=configs/llds_search.py --config.workdir=/tmp/llds ...
For Qwen2.5-7B-Instruct add --config.rl.llds_lambda=0.3; for LLDS-MA (3B-Base, Llama) add
--config.rl.mask_answer=True --config.rl.adaptive_beta=code.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import base  # noqa: E402  (config files are loaded by path)


def get_config():
  c = base.get_config()
  c.rl.llds_lambda = 0.2
  c.rl.llds_gate = "action"
  return c
