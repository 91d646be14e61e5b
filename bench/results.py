"""Shared by the bench scripts: median wall time, and a row appended to a table of RESULTS.md."""

import os
import statistics
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def append_row(title: str, columns: list[str], row: str, path: str = RESULTS) -> None:
  """Adds `row` at the end of the table under `## title`, creating the section if needed."""
  heading = f"## {title}"
  text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
  if heading not in text:
    text = (text.rstrip("\n") + f"\n\n{heading}\n\n| " + " | ".join(columns) + " |\n"
            + "|---" * len(columns) + "|\n")
  start = text.index(heading) + len(heading) + 2  # skip the blank line after the heading
  end = text.find("\n\n", start)  # a table ends at the first blank line
  end = len(text.rstrip("\n")) if end < 0 else end
  text = text[:end].rstrip("\n") + "\n" + row + text[end:]
  with open(path, "w") as f:
    f.write(text if text.endswith("\n") else text + "\n")


def median_time(fn, repeats: int) -> float:
  """Median seconds of `fn()` over `repeats` calls after one warm-up (compile) call."""
  fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)
