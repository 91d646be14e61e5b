"""Compile time on a deep model: seconds per compiled program, first vs steady training step.

  .venv/bin/python bench/compile.py                       # 24 layers, 3 steps, all three parts
  .venv/bin/python bench/compile.py --layers 30 --append  # and add a section to RESULTS.md
  .venv/bin/python bench/compile.py --parts 3             # the update's programs alone (~1 min)

Part 1 runs configs/tiny.py's training loop (rollout + GRPO/LLDS update; no format warm-up, no
validation, checkpoint only at the end) on a random Qwen2-shaped model with `--layers` blocks,
`scan_layers=True` and `scan_cache=True`, for `--steps` steps. Every jit compile is recorded through
`jax.monitoring` (trace, lowering to MLIR, XLA compile) by program name and by the training step it
happened in (anything compiled in step ≥ 2 is a recompile). The goal of issue 17: first step ≤ 3× a
steady step (the median of steps ≥ 2). A random model never closes a <search> tag, so its rollouts
are one turn: part 2 therefore compiles the sampler's programs directly at rollout shapes (prompt
feed, decode, an observation feed at a second view), once with the cache path scanned over layers
and once unrolled, to show what the scan saves per program. Part 3 compiles the update's programs
alone at part 1's shapes (train step, log-prob pass, and the optimizer update on its own).

Wall times depend on the load of the machine; the section written by `--append` records the load
average before and after.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import pathlib
import platform
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from configs import tiny  # noqa: E402
from llds_jax import sampler, trainer  # noqa: E402
from llds_jax.model import ModelConfig, Transformer  # noqa: E402

_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
           "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
           "/jax/core/compile/backend_compile_duration": "compile"}


class CompileLog:
  """Seconds per (phase, program name, stage) from jax.monitoring duration events."""

  def __init__(self):
    self.phase = "setup"
    self.seconds = collections.defaultdict(float)  # (phase, name, stage) -> s
    self.count = collections.Counter()  # (phase, name) -> XLA compiles
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event, duration, **kw):
    stage = _EVENTS.get(event)
    if stage is None:
      return
    name = str(kw.get("fun_name", "?"))
    if name.startswith("jit(") and name.endswith(")"):  # XLA names it jit(f), the tracer f
      name = name[4:-1]
    self.seconds[(self.phase, name, stage)] += duration
    if stage == "compile":
      self.count[(self.phase, name)] += 1

  def total(self, phase, stage="compile") -> float:
    return sum(s for (p, _, st), s in self.seconds.items() if p == phase and st == stage)

  def programs(self, phase):
    """[(name, XLA compiles, trace s, lower s, compile s)], slowest first."""
    names = {n for (p, n, _) in self.seconds if p == phase}
    rows = [(n, self.count[(phase, n)], *(self.seconds[(phase, n, st)]
                                          for st in ("trace", "lower", "compile"))) for n in names]
    rows = [r for r in rows if r[2] + r[3] + r[4] >= 0.05]  # not the many tiny eager ops
    return sorted(rows, key=lambda r: -(r[2] + r[3] + r[4]))


def train_steps(layers: int, steps: int, log: CompileLog, scan: bool = True) -> list[dict]:
  """configs/tiny.py with a deeper random model; the compile log's phase follows the step."""
  c = tiny.get_config()
  c.model.random.num_hidden_layers = layers
  c.model.random.hidden_size = 128
  c.model.random.intermediate_size = 256
  c.model.scan_layers = scan
  c.model.scan_cache = scan
  c.model.format_warmup_steps = 0
  c.total_steps = steps
  c.ckpt.every = 10**6
  c.log.eval_every = 0
  c.log.plots = False
  c.log.tensorboard = False
  c.log.progress = False
  step_of = iter(range(1, steps + 1))
  real_rollout = trainer.rollout

  def rollout(*a, **kw):  # called once per training step: the step's compiles start here
    log.phase = f"step {next(step_of)}"
    return real_rollout(*a, **kw)

  trainer.rollout = rollout
  try:
    with tempfile.TemporaryDirectory() as d:
      c.workdir = d
      return trainer.train(c)
  finally:
    trainer.rollout = real_rollout


def sampler_programs(layers: int, scan: bool, log: CompileLog) -> dict:
  """Compile seconds of feed (prompt, view = cache), decode and an observation feed (view)."""
  cfg = ModelConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_layers=layers,
                    num_heads=4, num_kv_heads=2, head_dim=32, scan_cache=scan)
  graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  rows, slots, segment = 16, 1024, 64
  state = jax.eval_shape(sampler._state_maker(cfg, rows, slots, segment, 3, None, None),
                         jax.ShapeDtypeStruct((2,), np.int32))
  i32 = lambda *s: jax.ShapeDtypeStruct(s, np.int32)  # noqa: E731
  table = jax.ShapeDtypeStruct((3, 16, cfg.vocab_size), np.int8)
  scfg = sampler.SampleConfig(temperature=1.0)
  out = {}
  for name, fn, args, view in (
      ("prompt feed", sampler.feed, (i32(rows, 512), i32(rows), i32(rows), table, scfg), None),
      ("decode", sampler.decode, (table, scfg), None),
      ("observation feed (view 512)", sampler.feed,
       (i32(rows, 96), i32(rows), i32(rows), table, scfg), 512),
      ("decode (view 512)", sampler.decode, (table, scfg), 512)):
    log.phase = f"sampler {name} scan={scan}"
    t0 = time.perf_counter()
    fn.lower(graphdef, params, state, *args, view=view).compile()
    out[name] = time.perf_counter() - t0
  return out


def update_programs(layers: int, log: CompileLog) -> dict:
  """Compile seconds of the update's programs alone at part 1's model and batch shapes."""
  from llds_jax import policy, sharding
  from llds_jax import train_step as ts
  c = tiny.get_config()
  c.model.random.update(num_hidden_layers=layers, hidden_size=128, intermediate_size=256)
  c.model.scan_layers = True
  cfg = policy.model_config(c)
  graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  mesh = sharding.make_mesh({"data": 1})
  up = ts.Updater(graphdef, params, opt=c.opt, step_cfg=ts.step_config(c), mesh=mesh)
  sds = lambda tree, shardings: jax.tree.map(  # noqa: E731
      lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree, shardings)
  state = sds(jax.eval_shape(up.fresh_state, params), up.state_shardings)
  length, resp = 640, 128  # the bench's rows: a 512-token prompt bucket + 128 response tokens

  def batch(rows):
    return {k: jax.ShapeDtypeStruct((rows,) if k == "adv" else (rows, length if k in up.lp_keys
                                                                 else resp),
                                    np.int32 if k in up.lp_keys else np.float32,
                                    sharding=up.batch_shardings[k]) for k in ts.BATCH_KEYS}

  loss = {"loss/total": jax.ShapeDtypeStruct((), np.float32)}
  grads = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, np.float32), state.params)
  apply = jax.jit(lambda s, g, m: ts.apply_grads(s, g, m, tx=up.tx, schedule=up.schedule))
  out = {}
  for name, lower in (
      ("train step (8 rows)", lambda: up.step.lower(state, batch(8))),
      ("log-prob pass (16 rows)", lambda: up.logprobs_program.lower(
          state.params, {k: batch(16)[k] for k in up.lp_keys}, resp)),
      ("optimizer update + skip guard (apply_grads)", lambda: apply.lower(state, grads, loss))):
    log.phase = f"update {name}"
    t0 = time.perf_counter()
    lower().compile()
    out[name] = time.perf_counter() - t0
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--layers", type=int, default=24)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--parts", default="1,2,3", help="which parts to run, e.g. 3 or 1,3")
  ap.add_argument("--unrolled", action="store_true",
                  help="part 1 with scan_layers=scan_cache=False (configs/tiny.py's setting)")
  ap.add_argument("--label", default="", help="a name for this run in RESULTS.md (e.g. before)")
  ap.add_argument("--append", action="store_true", help="append the tables to bench/RESULTS.md")
  args = ap.parse_args()
  load0 = os.getloadavg()
  log = CompileLog()
  parts = {int(p) for p in args.parts.split(",")}
  lines = []
  if 1 in parts:
    t0 = time.perf_counter()
    records = train_steps(args.layers, args.steps, log, scan=not args.unrolled)
    setup_s = time.perf_counter() - t0 - sum(r["time/step_s"] for r in records)
    lines += [f"Part 1: configs/tiny.py training loop, random Qwen2 shape, {args.layers} layers, "
              f"D=128, F=256, V=1000, scan_layers=scan_cache={not args.unrolled}, 16 rows/step, "
              f"{jax.device_count()} {jax.devices()[0].platform} device(s); setup (load, "
              f"index, init; no warm-up) {setup_s:.1f} s, of which XLA compile "
              f"{log.total('setup'):.1f} s.", "",
              "| step | step s | rollout s | update s | trace s | lower s | XLA compile s | "
              "programs compiled |", "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(records, 1):
      phase = f"step {i}"
      names = ", ".join(f"{n}×{k}" if k > 1 else n for n, k, *_ in log.programs(phase) if k)
      lines.append(f"| {i} | {r['time/step_s']:.1f} | {r['time/rollout_s']:.1f} | "
                   f"{r['time/step_s'] - r['time/rollout_s']:.1f} | "
                   f"{log.total(phase, 'trace'):.1f} | {log.total(phase, 'lower'):.1f} | "
                   f"{log.total(phase):.1f} | {names or '—'} |")
    steady = float(np.median([r["time/step_s"] for r in records[1:]])) if len(records) > 1 else 0
    first = records[0]["time/step_s"]
    lines += ["", f"First step {first:.1f} s, steady step (median of steps ≥ 2) {steady:.1f} s: "
              f"**{first / max(steady, 1e-9):.2f}×** (goal ≤ 3×).", "",
              "Programs of step 1 (trace / lower / XLA compile s):", "",
              "| program | compiles | trace s | lower s | compile s |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {k} | {tr:.1f} | {lo:.1f} | {co:.1f} |"
              for n, k, tr, lo, co in log.programs("step 1")]
  if 2 in parts:
    lines += ["", f"Part 2: sampler programs alone, {args.layers} layers (same widths), 16 rows, "
              "1024 cache slots, 512-token prompt block, 96-token observation block; "
              "trace + lower + compile s:", "",
              "| program | cache path scanned | unrolled | ratio |", "|---|---|---|---|"]
    scanned = sampler_programs(args.layers, True, log)
    unrolled = sampler_programs(args.layers, False, log)
    lines += [f"| {n} | {scanned[n]:.1f} | {unrolled[n]:.1f} | {unrolled[n] / scanned[n]:.1f}× |"
              for n in scanned]
  if 3 in parts:
    lines += ["", f"Part 3: the update's programs alone, {args.layers} layers, scan_layers=True; "
              "trace + lower + compile s:", "", "| program | s |", "|---|---|"]
    lines += [f"| {n} | {t:.1f} |" for n, t in update_programs(args.layers, log).items()]
  while lines and not lines[0]:  # a run without part 1 starts with part 2's blank line
    lines.pop(0)
  load1 = os.getloadavg()
  head = (f"## {datetime.date.today()} — compile time on a deep model (`bench/compile.py"
          f"{' --layers %d' % args.layers if args.layers != 24 else ''}"
          f"{' --unrolled' if args.unrolled else ''}`)"
          f"{' — ' + args.label if args.label else ''}")
  machine = (f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other "
             f"developers' jobs (load average {load0[0]:.1f} at the start, {load1[0]:.1f} at the "
             f"end), JAX {jax.__version__}; float32.")
  text = "\n".join([head, "", machine, "", *lines, ""])
  print(text)
  if args.append:
    with open(ROOT / "bench" / "RESULTS.md", "a") as f:
      f.write("\n" + text)


if __name__ == "__main__":
  main()
