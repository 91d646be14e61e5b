"""Metrics: one JSON object per step in `workdir/metrics.jsonl`, TensorBoard scalars, summaries.

Only process 0 writes. On resume the file is cut back to the restored step, so the stream of a
resumed run is the stream an uninterrupted run would have written.
"""

from __future__ import annotations

import json
import logging
import math
import os

import jax
import numpy as np

from llds_jax import faults, file_io

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
      keep = [line for line, rec in _records_for_resume(self.path)
              if resume_step is not None and rec["step"] <= resume_step]
      with open(self.path, "w") as f:
        f.writelines(keep)
    if tensorboard:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=resume_step)

  def write(self, step: int, metrics: dict) -> dict:
    record = {"step": int(step), **{k: _jsonable(v) for k, v in sorted(metrics.items())}}
    if not self.active:
      return record
    line = json.dumps(record) + "\n"
    with open(self.path, "a") as f:
      if faults.armed("metrics", step):  # test-only: a kill in the middle of the line
        f.write(line[:len(line) // 2])
        f.flush()
        faults.die()
      f.write(line)
    if self.tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)):
          self.tb.add_scalar(k, v, step)
      self.tb.flush()
    return record

  def close(self):
    if self.tb is not None:
      self.tb.close()


def _records_for_resume(path: str) -> list[tuple[str, dict]]:
  """(line, record) of each step record; a torn last line (a kill mid-write) is dropped with a
  warning, any other malformed line raises naming file and line."""
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  out = []
  for line_no, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
      ok = isinstance(rec, dict) and isinstance(rec.get("step"), int)
    except json.JSONDecodeError:
      ok = False
    if ok:
      out.append((line if line.endswith("\n") else line + "\n", rec))
    elif line_no == len(lines):
      logging.warning("%s:%d: torn last line (the run was killed while writing it); truncating "
                      "it: %r", path, line_no, line[:80])
    else:
      raise ValueError(f"{path}:{line_no}: malformed metrics record (not a JSON object with an "
                       f"integer 'step'): {line[:80]!r}; fix or remove that line to resume")
  return out


def read_metrics(path: str) -> list[dict]:
  """The records of a metrics.jsonl (possibly none); a missing file or bad line raises naming it."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  records = []
  for line_no, rec in file_io.iter_jsonl(path):
    if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
      raise ValueError(f"{path}:{line_no}: not a metrics record (needs an integer 'step')")
    records.append(rec)
  return records


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


def repeat_counts(response_ids_BxR: np.ndarray, loss_mask_BxR: np.ndarray) -> tuple[int, int]:
  """(sampled tokens equal to the sampled token before them, sampled tokens after a sampled one)."""
  same = (response_ids_BxR[:, 1:] == response_ids_BxR[:, :-1])
  both = (loss_mask_BxR[:, 1:] > 0) & (loss_mask_BxR[:, :-1] > 0)
  return int((same & both).sum()), int(both.sum())


class LLDMonitor:
  """Warns when the preserving responses' log-likelihood falls `patience` steps in a row.

  That sustained fall is the paper's phase II (PAPER.md §A.5), which precedes collapse while the
  reward still rises; a high repeated-token fraction signals the degenerate outputs of phase III.
  """

  def __init__(self, patience: int = 5, repeat_threshold: float = 0.5):
    self.patience, self.repeat_threshold = patience, repeat_threshold
    self.last, self.falling = None, 0

  def restore(self, records: list[dict]) -> None:
    """Continues from the metric records of the steps already done (on resume)."""
    if records and "lld/falling_steps" in records[-1]:
      self.last = float(records[-1]["lld/preserving_logp"])
      self.falling = int(records[-1]["lld/falling_steps"])

  def update(self, step: int, preserving_logp: float, repeat_frac: float) -> dict:
    if self.last is not None and np.isfinite(preserving_logp) and preserving_logp < self.last:
      self.falling += 1
    elif np.isfinite(preserving_logp):
      self.falling = 0
    self.last = preserving_logp if np.isfinite(preserving_logp) else self.last
    if self.patience and self.falling == self.patience:
      logging.warning("step %d: log-likelihood of preserving (A >= 0) responses fell %d steps in a "
                      "row (now %.4f): lazy likelihood displacement; consider raising "
                      "rl.llds_lambda", step, self.falling, preserving_logp)
    if repeat_frac >= self.repeat_threshold:
      logging.warning("step %d: %.0f%% of sampled tokens repeat the previous token: degenerate "
                      "outputs", step, 100 * repeat_frac)
    return {"lld/falling_steps": self.falling, "rollout/repeat_frac": repeat_frac}
