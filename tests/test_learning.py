"""RL makes the policy better: GRPO through the real trainer raises reward (DESIGN.md contract).

The task is the LLD testbed's world (tools/lld_experiment.py) at its smallest: one fact per person
(the birth city), one passage per search, and a format warm-up whose ideal trajectories answer
directly (a guess: the facts differ between the warm-up's worlds) 75% of the time and search the
person first 25% of the time. The warmed-up policy therefore reads a retrieved fact well but
rarely searches, and rewards start low; the only way up is to learn, from rewards alone, to search
first. The choice is the first sampled token of the response (`<search` or `<answer`, no
`<think>` step), so the test fails when the advantage's sign is flipped (GRPO then teaches
guessing) or when the loss mask is shifted one token to the right (the choice is never trained).
"""

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import lld_experiment as lx  # noqa: E402
from llds_jax import trainer  # noqa: E402

ARGS = ["--people=48", "--attributes=city", "--two_hop_frac=0", "--direct_frac=0.65",
        "--no-think", "--topk=1", "--warm_worlds=8", "--vocab=640", "--hidden=64", "--layers=3",
        "--warmup_steps=800", "--batch=16", "--warmup_lr=5e-3", "--warmup_devices=1"]


def learning_config(testbed: str, workdir: str, a):
  """GRPO (λ = 0) on the RL questions: 8 prompts × 4, one search turn, 2 updates per step."""
  c = lx.arm_config("grpo", testbed, workdir, a)
  c.total_steps = 15
  c.rollout.prompts, c.rollout.group_size = 8, 4
  c.rollout.max_turns, c.rollout.max_turn_tokens, c.rollout.max_obs_tokens = 1, 16, 48
  c.rollout.max_context = 160  # > prompt bucket (64) + worst response (2·16 + 48): one cache size
  c.rl.minibatch_size, c.rl.micro_batch_size = 16, 8
  c.opt.lr, c.opt.warmup_steps = 1e-3, 0
  c.log.plots = False
  return c


def test_grpo_raises_reward(tmp_path):
  a = lx.parse_args([f"--outdir={tmp_path}"] + ARGS)
  testbed = str(tmp_path / "testbed")
  lx.prepare(testbed, a)
  recs = trainer.train(learning_config(testbed, str(tmp_path / "grpo"), a))
  reward = np.array([r["reward/mean"] for r in recs])
  searches = np.array([r["rollout/searches_per_traj"] for r in recs])
  print("reward", reward.round(3).tolist(), "searches", searches.round(2).tolist())
  # Step 1 is the warm policy's own rollout (π_old before any update).
  assert reward[0] <= 0.4 and searches[0] <= 0.5, (reward[0], searches[0])
  assert reward[-3:].mean() >= 0.7, reward
  assert searches[-3:].mean() >= 0.9, searches
