"""The LLD testbed's report: per-step series, the mean ± min/max figure and the arc table.

tools/lld_experiment.py runs the arms, reads each arm's metrics.jsonl once (`read_series`) into
summary.json's dict, and draws the figure and the table from that dict, so a finished run can be
re-plotted or re-tabulated from summary.json alone.
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COLORS = {"grpo": "tab:blue", "llds_action": "tab:red", "llds_response": "tab:green",
          "llds_token": "tab:purple"}


def smooth(y: np.ndarray, k: int) -> np.ndarray:
  """Trailing moving average (the first points average what exists)."""
  c = np.cumsum(np.insert(y, 0, 0.0))
  n = np.minimum(np.arange(1, len(y) + 1), k)
  return (c[1:] - c[np.arange(1, len(y) + 1) - n]) / n


PANELS = (("reward", "reward (EM)"),
          ("preserving_logp", "log-lik. of preserving (Â≥0) responses\n(token mean, π_old)"),
          ("entropy", "token entropy"), ("grad_norm_max", "grad norm (max over minibatches)"),
          ("llds_active_frac", "LLDS gate active fraction"),
          ("searches", "valid searches / trajectory"))  # SERIES names
# summary.json series (DESIGN.md contract first, then extras) -> metrics.jsonl key
SERIES = {"reward": "reward/mean", "preserving_logp": "lld/preserving_logp", "entropy": "entropy",
          "grad_norm": "grad_norm", "grad_norm_max": "grad_norm_max",
          "searches": "rollout/searches_per_traj", "answered": "rollout/answered",
          "llds_active_frac": "llds/active_frac"}


def read_series(workdir: str) -> dict[str, list[float]]:
  """The SERIES of one arm's run, one float per training step."""
  from llds_jax import metrics as mlib
  recs = mlib.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  return {name: [float(r.get(key, np.nan)) for r in recs] for name, key in SERIES.items()}


def plot(summary: dict[str, dict[str, dict[str, list[float]]]], path: str, window: int = 5):
  """One panel per series, one colour per arm, from `summary` ({arm: {seed: read_series(…)}}):
  the mean over seeds of the `window`-step moving average, with a band from the lowest to the
  highest seed (one seed: its raw series, faint)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), constrained_layout=True)
  for arm, by_seed in summary.items():
    color = COLORS.get(arm)
    runs = list(by_seed.values())
    n = min(len(series["reward"]) for series in runs)
    steps = np.arange(1, n + 1)
    for ax, (name, title) in zip(axes.flat, PANELS):
      y_SxT = np.array([series[name][:n] for series in runs], np.float64)
      sm_SxT = np.stack([smooth(y, window) for y in y_SxT])
      if len(runs) == 1:
        ax.plot(steps, y_SxT[0], color=color, alpha=0.25, lw=0.8)
      else:
        ax.fill_between(steps, sm_SxT.min(0), sm_SxT.max(0), color=color, alpha=0.2, lw=0)
      ax.plot(steps, sm_SxT.mean(0), color=color, lw=1.6,
              label=f"{arm} ({len(runs)} seed{'s' * (len(runs) > 1)})")
      ax.set_title(title, fontsize=9)
      ax.set_xlabel("step", fontsize=8)
      if name.startswith("grad_norm"):
        ax.set_yscale("log")
  axes.flat[0].legend(fontsize=8)
  fig.savefig(path, dpi=80)
  plt.close(fig)


def arc(series: dict[str, list[float]], k: int = 10) -> dict[str, float]:
  """The paper's arc in numbers (PAPER.md §A.5), from one run's per-step series.

  k-step means of reward: `start` (steps 1..k, the warm policy's level), `peak` (the best window),
  `trough` (the worst window after the peak) and `final` (the last k steps); `rise` = peak −
  start; `collapsed` when some window after the peak falls below a third of the peak (a collapse
  within the run, even if the policy later recovers part of the way). `logp_*`: the preserving
  log-likelihood's k-step mean at the start, at the reward peak, at the trough and at the end;
  `entropy_max` and the step of the largest grad norm. Window steps are their last step.
  """
  def windows(y):
    y = np.asarray(y, np.float64)
    return np.convolve(y, np.ones(k) / k, mode="valid") if len(y) >= k else y[None].mean(1)
  r = windows(series["reward"])
  lp = windows(series["preserving_logp"])
  at = int(np.argmax(r))
  low = at + int(np.argmin(r[at:]))
  g = np.asarray(series["grad_norm_max"], np.float64)
  out = dict(start=r[0], peak=r[at], peak_step=at + k, trough=r[low], trough_step=low + k,
             final=r[-1], rise=r[at] - r[0], collapsed=float(r[low] < r[at] / 3),
             logp_start=lp[0], logp_at_peak=lp[at], logp_at_trough=lp[low], logp_final=lp[-1],
             entropy_start=float(np.mean(series["entropy"][:k])),
             entropy_max=float(np.max(series["entropy"])),
             grad_norm_max=float(np.nanmax(g)), grad_norm_max_step=int(np.nanargmax(g)) + 1)
  return {key: round(float(v), 4) for key, v in out.items()}


def summarize(summary: dict, k: int = 10) -> str:
  """Markdown: the `arc` numbers per arm and seed, then the mean over seeds per arm."""
  cols = ("start", "peak", "peak_step", "trough", "trough_step", "final", "rise", "collapsed",
          "logp_start", "logp_at_peak", "logp_at_trough", "logp_final", "entropy_max",
          "grad_norm_max", "grad_norm_max_step")
  lines = [f"Reward and preserving log-lik. as {k}-step means (`arc` in tools/lld_report.py)",
           "", "| arm | seed | steps | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 3)]
  for arm, by_seed in summary.items():
    rows = {seed: arc(series, k) for seed, series in by_seed.items()}
    for seed, row in rows.items():
      steps = len(by_seed[seed]["reward"])
      lines.append(f"| {arm} | {seed} | {steps} | " + " | ".join(f"{row[c]:.4g}" for c in cols)
                   + " |")
    if len(rows) > 1:
      mean = {c: np.mean([row[c] for row in rows.values()]) for c in cols}
      lines.append(f"| {arm} | mean | | " + " | ".join(f"{mean[c]:.4g}" for c in cols) + " |")
      curve = arc(mean_series(by_seed), k)  # the figure's line: seeds peak at different steps
      lines.append(f"| {arm} | mean curve | | " + " | ".join(f"{curve[c]:.4g}" for c in cols)
                   + " |")
  if {"grpo", "llds_action"} <= set(summary):
    lines += ["", *criteria(summary["grpo"], summary["llds_action"], k)]
  return "\n".join(lines)


def mean_series(by_seed: dict) -> dict[str, list[float]]:
  """Per-step means over seeds of the series `arc` reads (cut to the shortest run)."""
  n = min(len(series["reward"]) for series in by_seed.values())
  keys = ("reward", "preserving_logp", "entropy", "grad_norm_max")
  return {key: np.mean([series[key][:n] for series in by_seed.values()], 0).tolist()
          for key in keys}


def criteria(grpo: dict, llds: dict, k: int = 10) -> list[str]:
  """Issue 15's reward criteria, met or not, per seed and on the mean over seeds."""
  g = {seed: arc(series, k) for seed, series in grpo.items()}
  m = {seed: arc(series, k) for seed, series in llds.items()}
  mean = lambda rows, key: float(np.mean([row[key] for row in rows.values()]))  # noqa: E731
  collapsed = lambda rows: int(sum(row["collapsed"] for row in rows.values()))  # noqa: E731
  mark = lambda ok: "met" if ok else "NOT met"  # noqa: E731
  per_seed = lambda test: ", ".join(f"{s}: {mark(test(s))}" for s in g if s in m)  # noqa: E731
  return [
      f"Criteria ({k}-step means; per seed, then mean over seeds):",
      f"- GRPO rises ≥ 0.15: {per_seed(lambda s: g[s]['rise'] >= 0.15)}; mean "
      f"{mean(g, 'rise'):.3f}",
      f"- GRPO collapses (a window < ⅓ of its peak): {collapsed(g)} of {len(g)} seeds",
      f"- LLDS rises ≥ GRPO: {per_seed(lambda s: m[s]['rise'] >= g[s]['rise'])}; mean "
      f"{mean(m, 'rise'):.3f} vs {mean(g, 'rise'):.3f}: {mark(mean(m, 'rise') >= mean(g, 'rise'))}",
      f"- LLDS final ≥ GRPO peak: {per_seed(lambda s: m[s]['final'] >= g[s]['peak'])}; mean "
      f"{mean(m, 'final'):.3f} vs {mean(g, 'peak'):.3f}: "
      f"{mark(mean(m, 'final') >= mean(g, 'peak'))}",
      f"- LLDS does not collapse: {collapsed(m)} of {len(m)} seeds collapse"]
