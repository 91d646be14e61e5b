"""Test-only crash injection: `LLDS_KILL_AT=phase[:step]` makes the process SIGKILL itself there.

tests/test_kills.py kills a tiny run at each phase below and checks that the resumed metric
stream equals an uninterrupted one. A signal sent from outside lands at a random moment; this hook
lands exactly at the moment under test. Unset (always, outside that test), it costs one dict
lookup per call.

Phases: "warmup" (inside the format warm-up), "rollout" (after the rollout, before the update),
"update" (after the update phase), "validation" (after validation, before the step record),
"metrics" (half of the step's metrics line written), "checkpoint" (orbax committed the step,
not yet sealed). `step` is the training step being done (1-based; ignored for "warmup").
"""

from __future__ import annotations

import os
import signal

ENV = "LLDS_KILL_AT"


def armed(phase: str, step: int | None = None) -> bool:
  """True if this process is told to die at `phase` (of `step`, when the spec names one)."""
  spec = os.environ.get(ENV)
  if not spec:
    return False
  name, _, at = spec.partition(":")
  return name == phase and (not at or step is None or int(at) == step)


def die() -> None:
  os.kill(os.getpid(), signal.SIGKILL)


def point(phase: str, step: int | None = None) -> None:
  """Kills this process here if `LLDS_KILL_AT` names this phase (and step)."""
  if armed(phase, step):
    die()
