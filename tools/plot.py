"""Plots a run's metrics.jsonl: one PNG per panel group and an overview.

  python tools/plot.py /tmp/llds_tiny/metrics.jsonl --out /tmp/llds_tiny/plots [--smooth 0.9]

Panels (llds_jax/plots.py): reward, losses (total, pg, llds, kl), entropy, gradient norm, LLD
(mean log-prob of the preserving vs non-preserving responses' actions, current and reference),
rollout statistics and validation EM/F1 per data source when the run validated. Keys a run did not
log are skipped; an empty or malformed file is an error naming the line. Non-finite values are
plotted as gaps. The trainer already writes these into WORKDIR/plots at the end of a run.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llds_jax.plots import plot  # noqa: E402  (tools run from a checkout)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("metrics", help="a run's metrics.jsonl")
  p.add_argument("--out", default=None, help="PNG directory (default: plots/ beside the file)")
  p.add_argument("--smooth", type=float, default=0.0,
                 help="EMA weight of the smoothed line over the raw one (0 = raw only)")
  args = p.parse_args(argv)
  out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.metrics)), "plots")
  try:
    written = plot(args.metrics, out, smooth=args.smooth)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"plot: {e}") from None
  print("\n".join(f"wrote {w}" for w in written))


if __name__ == "__main__":
  main()
