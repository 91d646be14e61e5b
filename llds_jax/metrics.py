"""Metrics: one JSON object per step in `workdir/metrics.jsonl`, TensorBoard scalars, summaries.

Only process 0 writes. On resume the file is cut back to the restored step, so the stream of a
resumed run is the stream an uninterrupted run would have written.
"""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np

REQUIRED_KEYS = ("step", "reward/mean", "loss/total", "loss/pg", "loss/llds", "loss/kl", "entropy",
                 "grad_norm", "skipped_nonfinite", "lld/preserving_logp",
                 "rollout/searches_per_traj", "rollout/tokens", "time/step_s")


def _jsonable(v):
  v = np.asarray(v)
  if v.dtype.kind in "iub":
    return int(v)
  f = float(v)
  return f if math.isfinite(f) else str(f)  # JSON has no NaN/inf; keep them visible as strings


class MetricWriter:
  """Appends step records to metrics.jsonl (and TensorBoard); truncates past `resume_step`."""

  def __init__(self, workdir: str, *, tensorboard: bool = True, resume_step: int | None = None):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    if os.path.exists(self.path):
      keep = []
      with open(self.path) as f:
        for line in f:
          if line.strip() and resume_step is not None and json.loads(line)["step"] <= resume_step:
            keep.append(line)
      with open(self.path, "w") as f:
        f.writelines(keep)
    if tensorboard:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=resume_step)

  def write(self, step: int, metrics: dict) -> dict:
    record = {"step": int(step), **{k: _jsonable(v) for k, v in sorted(metrics.items())}}
    if not self.active:
      return record
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self.tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)):
          self.tb.add_scalar(k, v, step)
      self.tb.flush()
    return record

  def close(self):
    if self.tb is not None:
      self.tb.close()


def read_metrics(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def summarize_minibatches(per_step: list[dict]) -> dict:
  """Mean over the update phase's optimizer steps, plus first/last of the LLDS term and norms.

  The first minibatch's LLDS is ~0 by construction (old == current policy), so the mean alone
  would hide when LLDS starts acting.
  """
  host = jax.device_get(per_step)
  out = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
  out["skipped_nonfinite"] = int(sum(int(m["skipped_nonfinite"]) for m in host))
  out["loss/llds_first"] = float(host[0]["loss/llds"])
  out["loss/llds_last"] = float(host[-1]["loss/llds"])
  out["grad_norm_max"] = float(max(m["grad_norm"] for m in host))
  out["update/optimizer_steps"] = len(host)
  return out
