"""What a compiled program costs (read from its HLO) and how long a step would take on a chip.

Two halves, kept apart on purpose because only the first is a measurement:

1. `hlo_stats(text)` reads the optimized HLO of a compiled program (`compiled.as_text()`): matmul
   FLOPs (every `dot`) and collectives (all-gather, reduce-scatter, all-reduce, all-to-all,
   collective-permute) with their byte sizes and group sizes. Each instruction is weighted by how
   often it runs: the product of the `known_trip_count`s of the while loops around it. XLA's own
   `cost_analysis()` counts a while body once, so for the train step (a scan over micro-batches
   and another over log-prob chunks) its FLOPs are too low; a while loop without a known trip
   count (the sampler's decode loop) is counted once here too, i.e. per decoded token.
2. `CHIPS` and `predict_step`: vendor peak numbers and a roofline with stated efficiencies. Every
   number that comes out of (2) is a prediction, not a measurement.

Dims: n devices in a collective's replica group.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

# ---------------------------------------------------------------------------------------------
# 1. Measured: statistics of an optimized HLO module.

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "s4": 0.5, "u4": 0.5, "f8e4m3fn": 1, "f8e5m2": 1, "token": 0}
_SHAPE = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([0-9,]*)\]")
_COMP_HEAD = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_CALLEE = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)"
                     r"=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def shape_bytes(type_str: str) -> float:
  """Bytes of an HLO type, tuples summed: `f32[2,3]{1,0}` → 24, `(s32[], bf16[4])` → 12."""
  total = 0.0
  for dtype, dims in _SHAPE.findall(type_str):
    if dtype not in _DTYPE_BYTES:
      continue
    total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _dims(type_str: str) -> list[int]:
  m = _SHAPE.search(type_str)
  return [int(d) for d in m.group(2).split(",") if d] if m else []


def _split_type(rest: str) -> tuple[str, str, str]:
  """`TYPE op(args), attrs` → (TYPE, op, `args), attrs`); tuple types contain spaces."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        break
    type_str, rest = rest[:i + 1], rest[i + 1:].lstrip()
  else:
    type_str, _, rest = rest.partition(" ")
  op, _, tail = rest.partition("(")
  return type_str, op.strip(), tail


def _group_size(attrs: str, num_devices: int | None) -> int:
  """Devices per replica group: `replica_groups=[G,S]<=[N]` (iota) or `{{0,1},{2,3}}`."""
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]", attrs)
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=\{\{([^}]*)\}", attrs)
  if m:
    return len([x for x in m.group(1).split(",") if x.strip()])
  return num_devices or 1  # `replica_groups={}`: all devices


def link_bytes(kind: str, operand: float, result: float, n: int) -> float:
  """Bytes one device sends over its links for one collective, bandwidth-optimal ring schedule."""
  if n <= 1:
    return 0.0
  frac = (n - 1) / n
  if kind == "all-gather":
    return result * frac
  if kind in ("reduce-scatter", "all-to-all"):
    return operand * frac
  if kind == "all-reduce":
    return 2 * operand * frac  # reduce-scatter then all-gather
  return operand  # collective-permute: one send per device


def hlo_stats(text: str, num_devices: int | None = None) -> dict:
  """Trip-count-weighted matmul FLOPs and collectives of one optimized HLO module (per device)."""
  comps: dict[str, list[tuple[str, str, str, str]]] = {}
  order: list[str] = []
  entry, current = None, None
  for line in text.splitlines():
    head = _COMP_HEAD.match(line)
    if head:
      current = head.group(2)
      comps[current], entry = [], current if head.group(1) else entry
      order.append(current)
      continue
    if current is None:
      continue
    if line.strip() == "}":
      current = None
      continue
    m = _INSTR.match(line)
    if m:
      comps[current].append((m.group(1), *_split_type(m.group(2))))
  if entry is None:
    raise ValueError("hlo_stats: no ENTRY computation in the HLO text")

  # HLO text prints callees before callers, so one pass from the entry backwards propagates how
  # many times each computation runs.
  mult: dict[str, float] = defaultdict(float)
  mult[entry] = 1.0
  unknown_loops = 0
  for name in reversed(order):
    for _, _, op, tail in comps[name]:
      callees = _CALLEE.findall(tail)
      for branches in _BRANCHES.findall(tail):
        callees += [("branch", b.strip().lstrip("%")) for b in branches.split(",") if b.strip()]
      trip = 1.0
      if op == "while":
        t = _TRIP.search(tail)
        trip = float(t.group(1)) if t else 1.0
        unknown_loops += t is None
      for role, callee in callees:
        if callee in comps:
          mult[callee] += mult[name] * (trip if role in ("body", "condition") else 1.0)

  types = {iname: t for instrs in comps.values() for iname, t, _, _ in instrs}
  dot_flops = 0.0
  coll = {k: dict(count=0, weighted_count=0.0, operand_bytes=0.0, result_bytes=0.0,
                  link_bytes=0.0, max_group=0) for k in COLLECTIVES}
  top = []  # (weighted link bytes, kind, result type, source op) of each collective
  for name, instrs in comps.items():
    w = mult.get(name, 0.0)
    if not w:
      continue
    for _, type_str, op, tail in instrs:
      args = tail.split(")", 1)[0]
      operands = re.findall(r"%([\w.\-]+)", args)
      if op == "dot":
        lhs = _dims(types.get(operands[0], "")) if operands else []
        cdims = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", tail)
        k = math.prod(lhs[int(i)] for i in cdims.group(1).split(",") if i) if cdims and lhs else 1
        dot_flops += w * 2.0 * math.prod(_dims(type_str)) * k
        continue
      kind = op[:-6] if op.endswith("-start") else op
      if kind not in coll:
        continue
      result = shape_bytes(type_str)
      operand = sum(shape_bytes(types.get(o, "")) for o in operands)
      if op.endswith("-start"):  # async pair: the start's result tuple holds operand and result
        result = max(result - operand, operand) if kind == "all-gather" else operand
      n = _group_size(tail, num_devices)
      c = coll[kind]
      c["count"] += 1
      c["weighted_count"] += w
      c["operand_bytes"] += w * operand
      c["result_bytes"] += w * result
      c["link_bytes"] += w * link_bytes(kind, operand, result, n)
      c["max_group"] = max(c["max_group"], n)
      src = re.search(r'op_name="([^"]*)"', tail)
      top.append((w * link_bytes(kind, operand, result, n), kind, type_str.split("{")[0],
                  src.group(1) if src else "?"))
  top.sort(reverse=True)
  return dict(dot_flops=dot_flops, collectives=coll, unknown_trip_loops=unknown_loops,
              link_bytes=sum(c["link_bytes"] for c in coll.values()), top_collectives=top[:8])


_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
_REPORT_ROW = re.compile(r"^\s*[\d.]+\w+\(\s*\d+%\);\s*([\d.]+)(\w+);\s*\d+;\s*\d+;\s*(.+)$")
_REPORT_SHAPE = re.compile(r"(?:\d+×)?(\w+)\[([0-9,]*)\]")


def cpu_upcast_bytes(memory_report: str, hlo: str) -> float:
  """Bytes of allocations that hold nothing but float32 copies of bfloat16 entry arguments.

  XLA's CPU backend has no bf16 matmul: it converts bf16 operands to f32, and it hoists the
  converts of loop-invariant operands (the sampler's weights, each layer's K/V cache) out of
  the decode loop, so whole f32 copies of the weights and the cache show up in its temp (3B
  decode: 22 GB of cache copies and 12 GB of weight copies beside an 11.5 GB cache). A chip that
  multiplies bf16 natively (TPU, GPU) makes none of them. An allocation is counted when every
  value in it is f32 and its dims are a permutation of a bf16 argument's (per-device) dims;
  `memory_report` is XLA's `*memory-usage-report.txt` of the same compile.
  """
  entry = re.search(r"^ENTRY [^(]*\((.*)\)\s*->", hlo, re.M)
  if entry is None:
    raise ValueError("cpu_upcast_bytes: no ENTRY computation in the HLO text")
  bf16 = {tuple(sorted(_dims(f"bf16[{d}]"))) for d in re.findall(r"bf16\[([0-9,]*)\]",
                                                                 entry.group(1))}
  total = 0.0
  for line in memory_report.splitlines():
    row = _REPORT_ROW.match(line)
    if not row:
      continue
    shapes = _REPORT_SHAPE.findall(row.group(3))
    if shapes and all(dt == "f32" and tuple(sorted(int(x) for x in dims.split(",") if x)) in bf16
                      for dt, dims in shapes):
      total += float(row.group(1)) * _UNITS[row.group(2)]
  return total


# ---------------------------------------------------------------------------------------------
# 2. Predicted: vendor peak numbers and a roofline.

@dataclasses.dataclass(frozen=True)
class Chip:
  """Vendor peak numbers of one device (a TPU chip = one JAX device on v4/v5p megacore too)."""

  name: str
  peak_flops: float  # dense bf16 FLOP/s
  hbm_bytes: float
  hbm_bw: float  # bytes/s
  ici_bidir_bw: float  # bytes/s, all links of one chip, both directions
  links: int  # ICI ports (TPU) or 2 for a GPU behind an NVSwitch
  source: str

  @property
  def ring_bw(self) -> float:
    """Per-device bandwidth of a collective over one mesh axis: a bidirectional ring uses two
    links, each one way (a conservative choice: a collective over several torus axes gets more)."""
    return self.ici_bidir_bw / self.links


# VENDOR PEAK NUMBERS, not measurements. TPU rows: Google Cloud TPU system architecture pages
# ("TPU v4", "TPU v5e", "TPU v5p", "TPU v6e" at cloud.google.com/tpu/docs). The v4 page gives no
# per-chip ICI figure; its row uses the TPU v4 paper (Jouppi et al., ISCA 2023): 6 links of
# 50 GB/s per direction. H100 row: NVIDIA H100 Tensor Core GPU datasheet (SXM5: 989 TFLOP/s dense
# BF16, 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s).
CHIPS = {c.name: c for c in (
    Chip("v4", 275e12, 32 * 2**30, 1200e9, 600e9, 6, "Cloud TPU v4 page; TPU v4 paper (ICI)"),
    Chip("v5e", 197e12, 16e9, 819e9, 400e9, 4, "Cloud TPU v5e page"),
    Chip("v5p", 459e12, 95e9, 2765e9, 1200e9, 6, "Cloud TPU v5p page"),
    Chip("v6e", 918e12, 32e9, 1640e9, 800e9, 4, "Cloud TPU v6e page"),
    Chip("H100", 989e12, 80e9, 3350e9, 900e9, 2, "NVIDIA H100 datasheet (SXM5)"),
)}


@dataclasses.dataclass(frozen=True)
class Assumptions:
  """Efficiencies the prediction assumes (none of them measured on the target chip)."""

  mfu: float = 0.4  # achieved / peak FLOP/s of the update and log-prob passes
  prefill_mfu: float = 0.5  # of the sampler's prefill (no backward, large blocks)
  hbm_eff: float = 0.8  # achieved / peak HBM bandwidth in decode
  ici_eff: float = 0.7  # achieved / peak ICI bandwidth
  headroom: float = 0.1  # fraction of HBM kept free (fragmentation, runtime buffers)


def predict_step(chip: Chip, *, decode: dict, prefill: dict, logprobs: dict, update: dict,
                 counts: dict, resident_bytes: float, peaks: dict,
                 a: Assumptions = Assumptions()) -> dict:
  """Predicted seconds per training step by phase, and whether memory fits (all per device).

  `decode`/`prefill`/`logprobs`/`update` hold one program's measured `dot_flops` and `link_bytes`
  (decode: per token; prefill: per fed token) plus, for decode, the HBM bytes streamed per token
  (`hbm_bytes_per_token`, a list per turn). `counts`: decode tokens per turn (`decode_steps`),
  fed tokens (`fed_tokens`), feed calls, log-prob passes and optimizer steps per training step.
  `peaks`: program → peak bytes while it runs (its own buffers plus every other resident buffer).
  """
  comm = lambda b: b / (chip.ring_bw * a.ici_eff)  # noqa: E731
  out = {}
  mem_s = sum(steps * hbm / (chip.hbm_bw * a.hbm_eff)
              for steps, hbm in zip(counts["decode_steps"], decode["hbm_bytes_per_token"]))
  flop_s = sum(counts["decode_steps"]) * decode["dot_flops"] / chip.peak_flops
  out["decode"] = dict(memory_s=mem_s, compute_lower_bound_s=flop_s,
                       collective_s=sum(counts["decode_steps"]) * comm(decode["link_bytes"]))
  out["decode"]["total_s"] = max(mem_s, flop_s) + out["decode"]["collective_s"]
  pf = counts["fed_tokens"] * prefill["dot_flops"] / (chip.peak_flops * a.prefill_mfu)
  pf_mem = counts["feed_calls"] * prefill["weight_bytes"] / (chip.hbm_bw * a.hbm_eff)
  out["prefill"] = dict(compute_s=max(pf, pf_mem),
                        collective_s=counts["feed_calls"] * comm(prefill["link_bytes"]))
  for name, prog, calls in (("logprobs", logprobs, counts["logprob_passes"]),
                            ("update", update, counts["update_steps"])):
    out[name] = dict(compute_s=calls * prog["dot_flops"] / (chip.peak_flops * a.mfu),
                     collective_s=calls * comm(prog["link_bytes"]))
  for v in out.values():
    v.setdefault("total_s", v.get("compute_s", 0.0) + v["collective_s"])
  out["step_s"] = sum(v["total_s"] for v in out.values())
  budget = chip.hbm_bytes * (1 - a.headroom)
  out["memory"] = {k: dict(peak_bytes=p, fits=p <= budget) for k, p in peaks.items()}
  out["memory"]["resident_bytes"] = resident_bytes
  out["memory"]["budget_bytes"] = budget
  out["assumptions"] = dataclasses.asdict(a)
  return out
