"""Vanilla Search-R1 GRPO baseline (λ = 0): the run that collapses in the paper (Fig. 7).

  python -m llds_jax.main --config=configs/grpo_search.py --config.workdir=/tmp/grpo ...
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import base  # noqa: E402  (config files are loaded by path)


def get_config():
  c = base.get_config()
  c.rl.llds_lambda = 0.0
  return c
