"""Fused chunked vs naive log-prob + entropy + gradient: compiled peak memory and wall time.

Dims: B batch rows, T tokens, D embed, V vocab, C chunk.

  .venv/bin/python bench/logprobs.py                      # B=1, T=2048, V=151,936, D=256 and 896
  .venv/bin/python bench/logprobs.py --shapes 2x896,8x896 --no_time   # memory only (compile)

For each B×D in `--shapes` it jits value_and_grad (w.r.t. hidden and unembedding) of
Σ logp + 0.01·Σ entropy, once through `llds_jax.logprobs.token_logprobs` and once through a
naive full-logits `log_softmax`, reads XLA's compiled memory analysis (peak ≈ arguments +
outputs + temporaries − aliased) and times the step. Goal: fused peak ≤ ¼ of naive. Appends a
dated Markdown table to bench/RESULTS.md. About 4 min on 2 CPU cores with the defaults.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from llds_jax import logprobs

MIB = 2**20


def naive_logprobs(hidden_BxTxD, unembed_DxV, targets_BxT):
  """Full B×T×V float32 logits, then log_softmax; the memory baseline."""
  z_BxTxV = jnp.einsum("btd,dv->btv", hidden_BxTxD, unembed_DxV,
                       preferred_element_type=jnp.float32)
  logq_BxTxV = jax.nn.log_softmax(z_BxTxV, axis=-1)
  logp_BxT = jnp.take_along_axis(logq_BxTxV, targets_BxT[:, :, None], axis=-1)[:, :, 0]
  return logp_BxT, -jnp.sum(jnp.exp(logq_BxTxV) * logq_BxTxV, axis=-1)


def make_step(fn, targets_BxT):
  def objective(hidden_BxTxD, unembed_DxV):
    logp_BxT, ent_BxT = fn(hidden_BxTxD, unembed_DxV, targets_BxT)
    return jnp.sum(logp_BxT) + 0.01 * jnp.sum(ent_BxT)

  return jax.jit(jax.value_and_grad(objective, (0, 1)))


def measure(step, hidden, unembed, iters: int) -> dict:
  """Compiled memory (MiB) and median seconds per step (None when iters = 0)."""
  compiled = step.lower(hidden, unembed).compile()
  mem = compiled.memory_analysis()
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
          - mem.alias_size_in_bytes)
  res = dict(temp=mem.temp_size_in_bytes / MIB, peak=peak / MIB, secs=None)
  if not iters:
    return res
  jax.block_until_ready(compiled(hidden, unembed))  # warm-up
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(compiled(hidden, unembed))
    times.append(time.perf_counter() - start)
  return dict(res, secs=statistics.median(times))


def fmt_secs(secs) -> str:
  return "—" if secs is None else f"{secs:.2f}"


def cpu_name() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default="1x256,1x896", help="comma-separated BxD")
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--vocab", type=int, default=151_936)
  parser.add_argument("--chunk", type=int, default=256)
  parser.add_argument("--iters", type=int, default=2)
  parser.add_argument("--no_time", action="store_true", help="compile only: memory, no timing")
  parser.add_argument("--no_append", action="store_true")
  args = parser.parse_args()

  iters = 0 if args.no_time else args.iters
  rows = []
  for shape in args.shapes.split(","):
    b, d = (int(x) for x in shape.split("x"))
    k_h, k_w, k_t = jax.random.split(jax.random.key(0), 3)
    # Abstract inputs are enough to compile; real ones only when timing.
    if iters:
      hidden = jax.random.normal(k_h, (b, args.seq, d), jnp.float32)
      unembed = 0.02 * jax.random.normal(k_w, (d, args.vocab), jnp.float32)
    else:
      hidden = jax.ShapeDtypeStruct((b, args.seq, d), jnp.float32)
      unembed = jax.ShapeDtypeStruct((d, args.vocab), jnp.float32)
    targets = jax.random.randint(k_t, (b, args.seq), 0, args.vocab)
    fused = lambda h, w, y: logprobs.token_logprobs(h, w, y, chunk_size=args.chunk)
    res = {name: measure(make_step(fn, targets), hidden, unembed, iters)
           for name, fn in (("fused", fused), ("naive", naive_logprobs))}
    for name, r in res.items():
      print(f"B={b} D={d} {name}: temp {r['temp']:.0f} MiB, peak {r['peak']:.0f} MiB, "
            f"{fmt_secs(r['secs'])} s/step", flush=True)
    rows.append((b, d, res))

  device = jax.devices()[0]
  timing = (f"median of {iters} steps after warm-up; B and D scaled down to fit a 24 GiB CPU box"
            if iters else "not measured (compiled only, never run)")
  header = (f"\n## {datetime.date.today()} — fused vs naive log-prob + entropy + grad "
            f"(`bench/logprobs.py`)\n\n"
            f"Machine: {cpu_name()}, {os.cpu_count()} CPU cores, "
            f"JAX {jax.__version__} on {device.platform} ({device.device_kind}); float32. "
            f"T = {args.seq}, V = {args.vocab:,}, chunk C = {args.chunk} (Qwen2.5-0.5B has "
            f"D = 896). Peak = XLA compiled memory analysis (arguments + outputs + temporaries − "
            f"aliases) of jit(value_and_grad) w.r.t. hidden and unembedding; time: {timing}.\n\n"
            "| B | D | fused temp MiB | naive temp MiB | fused peak MiB | naive peak MiB "
            "| peak fused/naive | fused s/step | naive s/step |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
  lines = [f"| {b} | {d} | {r['fused']['temp']:.0f} | {r['naive']['temp']:.0f} "
           f"| {r['fused']['peak']:.0f} | {r['naive']['peak']:.0f} "
           f"| {r['fused']['peak'] / r['naive']['peak']:.3f} "
           f"| {fmt_secs(r['fused']['secs'])} | {fmt_secs(r['naive']['secs'])} |\n"
           for b, d, r in rows]
  print(header + "".join(lines))
  if not args.no_append:
    path = pathlib.Path(__file__).with_name("RESULTS.md")
    text = path.read_text() if path.exists() else ""
    with path.open("a") as f:
      if not text:
        f.write("# Benchmark results\n")
      elif not text.endswith("\n"):
        f.write("\n")  # whoever wrote the last section, keep a blank line before ours
      f.write(header + "".join(lines))


if __name__ == "__main__":
  main()
