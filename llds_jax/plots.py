"""A run's metrics.jsonl as PNGs: one per panel group and an overview.

Used by the trainer at the end of a run (`config.log.plots`, into WORKDIR/plots) and by
`tools/plot.py` for any metrics file.

Panels: reward, losses (total, pg, llds, kl), entropy, gradient norm, LLD (mean log-prob of the
preserving vs non-preserving responses' actions, current and reference), rollout statistics
(searches, turns, tokens, invalid actions, answer rate) and validation EM/F1 per data source when
the run validated. Keys a run did not log are skipped; an empty or malformed file is an error
naming the line. Non-finite values (written as "nan"/"inf" strings) are plotted as gaps.
"""

import math
import os
import re

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
from matplotlib.ticker import MaxNLocator  # noqa: E402

from llds_jax import metrics as mlib  # noqa: E402

# panel file -> (title, [(subplot title, [metric key or regex])]).
PANELS = {
    "reward": ("Reward", [("EM reward (mean over rollouts)", ["reward/mean"]),
                          ("largest within-group std", ["reward/max_group_std"])]),
    "losses": ("Losses", [("total", ["loss/total"]), ("policy gradient", ["loss/pg"]),
                          ("LLDS (λ-scaled): update-phase mean and last minibatch",
                           ["loss/llds", "loss/llds_last"]),
                          ("KL to reference", ["loss/kl"])]),
    "entropy": ("Entropy", [("token entropy", ["entropy"])]),
    "grad_norm": ("Gradient norm", [("global norm (before clipping)", ["grad_norm",
                                                                       "grad_norm_max"]),
                                    ("skipped non-finite updates", ["skipped_nonfinite"])]),
    "lld": ("Likelihood displacement", [
        ("mean action log-prob", ["lld/preserving_logp", "lld/nonpreserving_logp",
                                  "lld/preserving_ref_logp", "lld/nonpreserving_ref_logp"])]),
    "rollout": ("Rollouts", [("searches per trajectory", ["rollout/searches_per_traj"]),
                             ("turns", ["rollout/turns"]),
                             ("tokens per step", ["rollout/tokens", "rollout/generated_tokens",
                                                  "rollout/observation_tokens"]),
                             ("rates", ["rollout/invalid_action_rate", "rollout/answered"])]),
    "validation": ("Validation", [("EM", [r"val/.+/em"]), ("F1", [r"val/.+/f1"])]),
}
MIN_SMOOTH = 10  # sparser series (e.g. validation) are drawn raw: an EMA over them only lags
OVERVIEW = [("reward/mean", "reward"), ("loss/llds", "LLDS loss"), ("entropy", "entropy"),
            ("lld/preserving_logp", "preserving log-prob"),
            ("rollout/searches_per_traj", "searches / traj"), ("grad_norm", "grad norm"),
            ("loss/kl", "KL"), ("val/all/em", "validation EM")]


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of `key`; "nan"/"inf" strings become NaN so the line shows a gap."""
  # A mean log-prob of exactly 0 is the trainer's value for an empty set (e.g. no non-preserving
  # rows when every reward in a group is equal), not a probability-1 policy: draw it as a gap.
  empty_is_zero = key.startswith("lld/") and key.endswith("logp")
  steps, values = [], []
  for r in records:
    if key in r:
      v = r[key]
      ok = isinstance(v, (int, float)) and math.isfinite(v) and not (empty_is_zero and v == 0)
      steps.append(r["step"])
      values.append(float(v) if ok else math.nan)
  return steps, values


def ema(values: list[float], alpha: float) -> list[float]:
  """Debiased exponential moving average (TensorBoard's smoothing); NaNs are skipped."""
  out, acc, weight = [], 0.0, 0.0
  for v in values:
    if not math.isnan(v):
      acc, weight = alpha * acc + (1 - alpha) * v, alpha * weight + (1 - alpha)
    out.append(acc / weight if weight else math.nan)
  return out


def expand(keys: list[str], available: set[str]) -> list[str]:
  """Keys present in the file; a key with regex characters matches all it fullmatches."""
  out = []
  for k in keys:
    if any(ch in k for ch in "+*["):
      out += sorted(a for a in available if re.fullmatch(k, a))
    elif k in available:
      out.append(k)
  return out


def draw(ax, records, keys, smooth: float, title: str):
  for key in keys:
    steps, values = series(records, key)
    marker = "o" if len(steps) < 30 else None
    if smooth > 0 and len(steps) >= MIN_SMOOTH:
      (line,) = ax.plot(steps, values, alpha=0.3, marker=marker, markersize=3)
      ax.plot(steps, ema(values, smooth), color=line.get_color(), label=key)
    else:
      ax.plot(steps, values, marker=marker, markersize=3, label=key)
  ax.set_title(title, fontsize=10)
  ax.set_xlabel("step")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)


def plot(path: str, out: str, *, smooth: float = 0.0) -> list[str]:
  """Writes OUT/<panel>.png for every panel with data and OUT/overview.png; returns the paths."""
  if not 0.0 <= smooth < 1.0:
    raise ValueError(f"--smooth={smooth}: expected 0 <= smooth < 1")
  records = mlib.read_metrics(path)
  if not records:
    raise ValueError(f"{path}: no metric records (empty file)")
  available = set().union(*records) - {"step"}
  os.makedirs(out, exist_ok=True)
  written = []
  run = os.path.basename(os.path.dirname(os.path.abspath(path)))
  for name, (title, subplots) in PANELS.items():
    present = [(t, expand(keys, available)) for t, keys in subplots]
    present = [(t, keys) for t, keys in present if keys]
    if not present:
      continue
    cols = len(present) if len(present) <= 3 else 2
    rows = -(-len(present) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (sub_title, keys) in zip(axes.flat, present):
      draw(ax, records, keys, smooth, sub_title)
    for ax in list(axes.flat)[len(present):]:
      ax.axis("off")
    fig.suptitle(f"{title} — {run}")
    fig.tight_layout()
    written.append(os.path.join(out, f"{name}.png"))
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
  overview = [(k, t) for k, t in OVERVIEW if k in available]
  if not overview:
    raise ValueError(f"{path}: none of the plotted metrics ({', '.join(k for k, _ in OVERVIEW)}) "
                     "is in the file")
  cols = min(4, len(overview))
  rows = -(-len(overview) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
  for ax, (key, title) in zip(axes.flat, overview):
    draw(ax, records, [key], smooth, title)
  for ax in list(axes.flat)[len(overview):]:
    ax.axis("off")
  fig.suptitle(f"{run}: {len(records)} steps (last {records[-1]['step']})")
  fig.tight_layout()
  written.append(os.path.join(out, "overview.png"))
  fig.savefig(written[-1], dpi=100)
  plt.close(fig)
  return written
