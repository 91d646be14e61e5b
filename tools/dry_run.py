"""AOT dry run of a pod config: compile the trainer's programs on simulated CPU devices.

  python tools/dry_run.py --config=configs/pod_qwen3b_v5p.py [--devices N] [--json out.json]

Nothing is downloaded and no weight is materialized: the architecture comes from
`config.model.path`/config.json when that file exists, else from `config.model.random`, and every
array is a `jax.ShapeDtypeStruct` that carries the sharding the trainer gives it. Four programs
are lowered and compiled on `sharding.make_mesh(config.mesh)` over N simulated devices (N = the
mesh size, or --devices): the update step (`train_step.Updater`, one minibatch with its
micro-batch scan, GRPO + LLDS + KL + entropy, AdamW, donated state), the log-prob pass (old and
reference log-probs of the whole rollout batch), and the sampler's prefill (`sampler.feed`, the
first turn's prompt block) and decode loop (`sampler.decode`, at the last turn's full view).
With `rl.pack` the update step and log-prob pass are the packed ones (`packed_step.py`), on the
sequences one rollout batch drawn from `--lengths` packs into.

For each program it prints XLA's per-device memory analysis, XLA's cost analysis (a while body
counted once), and from the optimized HLO the trip-count-weighted matmul FLOPs and collectives
(llds_jax/roofline.py); then a step-time and memory-fit prediction for `config.hardware.chip`.
Measured-by-XLA numbers are for the CPU compiler: a TPU compile fuses and schedules differently.
Every `--config.a.b=v` override works as in llds_jax/main.py. docs/scaling.md has the results.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import sys
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Pod config (get_config() file).",
                                          lock_config=True)
_DEVICES = flags.DEFINE_integer("devices", None, "Simulated devices (default: the mesh size, "
                                "or config.hardware.devices when an axis is -1).")
_JSON = flags.DEFINE_string("json", None, "Write every measured and predicted number here.")
_PROGRAMS = flags.DEFINE_list("programs", "train_step,logprobs,prefill,observe,decode",
                              "Programs to compile.")
_PROMPT = flags.DEFINE_integer("prompt_tokens", 384, "Longest prompt of a rollout batch (tokens, "
                               "before bucketing); Search-R1 prompts with the Qwen chat template "
                               "are ~200-300 tokens.")
_DUMP = flags.DEFINE_string("dump_hlo", None, "Directory for each program's optimized HLO text "
                            "and XLA memory-usage report (per-buffer breakdown of its peak).")
_LENGTHS = flags.DEFINE_string("lengths", os.path.join(ROOT, "bench", "packing_lengths.json"),
                               "With rl.pack: recorded rollout lengths that size the packed "
                               "programs, stretched to P and R (packing.recorded_rows).")
_CHIP = flags.DEFINE_string("chip", None, "Chip kind for the prediction (default: "
                            "config.hardware.chip).")


def device_count(c, devices: int | None = None) -> int:
  """The devices the config's mesh needs (an axis of -1 takes config.hardware.devices)."""
  if devices:
    return int(devices)
  sizes = [int(v) for v in c.mesh.values()]
  if -1 in sizes:
    hw = c.get("hardware")
    if not hw or not hw.get("devices"):
      raise ValueError(f"config.mesh={dict(c.mesh)} has a -1 axis: pass --devices or set "
                       "config.hardware.devices")
    return int(hw.devices)
  return math.prod(sizes)


def simulate_devices(n: int) -> None:
  """Point JAX at n simulated CPU devices; only effective before jax is imported."""
  if "jax" in sys.modules:
    raise RuntimeError("simulate_devices must run before jax is imported")
  kept = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = f"{kept} --xla_force_host_platform_device_count={n}".strip()
  os.environ["JAX_PLATFORMS"] = "cpu"


if __name__ == "__main__":  # the device count depends on the config, so parse flags first
  flags.mark_flags_as_required(["config"])
  flags.FLAGS(sys.argv)
  simulate_devices(device_count(flags.FLAGS.config, flags.FLAGS.devices))

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from llds_jax import batch_layout, packed_step, packing, policy, roofline, rollout  # noqa: E402
from llds_jax import sampler as smp, sharding as shd  # noqa: E402
from llds_jax.model import ModelConfig, Transformer  # noqa: E402
from llds_jax.rollout import STOP_STRINGS  # noqa: E402
from llds_jax.train_step import BATCH_KEYS, Updater, step_config  # noqa: E402

PROGRAMS = ("train_step", "logprobs", "prefill", "observe", "decode")


def model_config(c) -> ModelConfig:
  """Architecture from `model.path`/config.json if it exists, else `model.random` (offline)."""
  found = c.model.path and os.path.isfile(os.path.join(c.model.path, "config.json"))
  return policy.model_config(c, path=c.model.path if found else "")


def shapes(c, prompt_tokens: int, mesh) -> dict:
  """Rollout and update shapes the trainer would produce for the config's worst case.

  Uses rollout.py's sizing rules (cache capacity `cap`, per-turn attention views) and
  batch_layout's widths: P and R are each bucketed, and R is cut back so an update row is at most
  `max_context` tokens (`batch_layout.response_width`).
  """
  r = c.rollout
  rollout_cfg = rollout.rollout_config(c)
  P = smp.bucket(prompt_tokens)
  worst = rollout.worst_case_tokens(rollout_cfg)
  cap = rollout.cache_capacity(rollout_cfg, prompt_tokens)
  longest = min(worst, cap - prompt_tokens)  # the cache holds prompt + response of a row
  R = batch_layout.response_width(P, smp.bucket(longest), longest, r.max_context)
  views, total = [], P
  for _ in range(r.max_turns + 1):  # every turn runs to its token limit
    need = total + r.max_turn_tokens
    views.append(rollout.turn_view(cap, need))
    total = need + r.max_obs_tokens
  rows = r.prompts * r.group_size
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  return dict(P=P, R=R, L=P + R, cap=cap, views=views, rows=rows,
              sampler_rows=-(-rows // shards) * shards, obs_block=smp.bucket(r.max_obs_tokens + 1))


def _sds(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def device_bytes(tree) -> float:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
  total = 0
  for x in jax.tree.leaves(tree):
    shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    itemsize = 8 if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x.dtype.itemsize
    total += math.prod(shard) * itemsize
  return float(total)


def build(c, mesh, prompt_tokens: int = 384, lengths: str | None = None) -> dict:
  """The abstract inputs of every program, sharded as the trainer shards them; with `rl.pack`,
  the packed programs' sized by a batch drawn from the `lengths` recording."""
  cfg = model_config(c)
  graphdef, abs_params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  up = Updater(graphdef, abs_params, opt=c.opt, step_cfg=step_config(c), mesh=mesh)
  params = _sds(abs_params, up.param_shardings)
  state = _sds(jax.eval_shape(up.fresh_state, abs_params), up.state_shardings)
  s = shapes(c, prompt_tokens, mesh)
  L, R, mb = s["L"], s["R"], c.rl.minibatch_size

  def batch(rows):
    dims = {"adv": (rows,)} | {k: (rows, L) for k in ("input_ids", "attn_mask", "positions")}
    return {k: jax.ShapeDtypeStruct(dims.get(k, (rows, R)),
                                    jnp.int32 if k in ("input_ids", "attn_mask", "positions")
                                    else jnp.float32, sharding=up.batch_shardings[k])
            for k in BATCH_KEYS}

  B = s["sampler_rows"]
  rows_of = lambda shape, dt: jax.ShapeDtypeStruct(  # noqa: E731
      shape, dt, sharding=shd.batch_sharding(mesh, len(shape)))
  abs_samp = jax.eval_shape(lambda: smp.init_state(
      cfg, B, s["cap"], c.rollout.max_turn_tokens, len(STOP_STRINGS),
      cache_dtype=c.rollout.cache_dtype or None))
  samp = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                      abs_samp, smp.state_shardings(abs_samp, mesh))
  eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, tuple) else (cfg.eos_token_id or 0,)
  sample_cfg = smp.SampleConfig(c.rollout.temperature, c.rollout.top_p, c.rollout.top_k, tuple(eos))
  table = jax.ShapeDtypeStruct((len(STOP_STRINGS), max(map(len, STOP_STRINGS)), cfg.vocab_size),
                               jnp.int8, sharding=shd.replicated(mesh))
  packed = None
  if up.step_cfg.pack_len:
    with open(lengths or _LENGTHS.default) as f:
      rows = packing.recorded_rows(json.load(f), s["rows"], s["P"], s["R"])
    lay = packed_step.phase_layout(rows, up.step_cfg, mesh.shape["data"] * mesh.shape["fsdp"],
                                   minibatch=mb, ppo_epochs=c.rl.ppo_epochs)
    packed = packed_step.abstract_inputs(up, lay)
    s["packed"] = dict(logprob_seqs=lay["logprob"]["input_ids"].shape, block=lay["block"],
                       micro=lay["steps"][0]["input_ids"].shape,
                       non_pad=packing.non_pad_fraction(rows["attn_mask"]),
                       tokens=int(rows["attn_mask"].sum()))
  return dict(cfg=cfg, graphdef=graphdef, updater=up, params=params, state=state, shapes=s,
              packed=packed,
              sampler_params=policy.rollout_weights(c, abs_params, mesh),
              minibatch=batch(mb), rollout_batch=batch(s["rows"]), sampler_state=samp,
              sample_cfg=sample_cfg, table=table, prompt=rows_of((B, s["P"]), jnp.int32),
              obs=rows_of((B, s["obs_block"]), jnp.int32),
              len_B=rows_of((B,), jnp.int32))


def lower(name: str, b: dict):
  """The jax `Lowered` of one program, called exactly as the trainer / rollout call it."""
  up, s = b["updater"], b["shapes"]
  pk = b["packed"]
  if name == "train_step" and pk:
    return up.packed.step.lower(b["state"], pk["minibatch"])
  if name == "logprobs" and pk:
    return up.packed.logprobs.lower(b["params"], pk["seqs"], pk["gather"], pk["block"])
  if name == "train_step":
    return up.step.lower(b["state"], b["minibatch"])
  if name == "logprobs":
    rb = b["rollout_batch"]
    return up.logprobs_program.lower(b["params"], {k: rb[k] for k in up.lp_keys}, s["R"])
  if name == "prefill":
    return smp.feed.lower(b["graphdef"], b["sampler_params"], b["sampler_state"], b["prompt"],
                          b["len_B"], b["len_B"], b["table"], b["sample_cfg"], s["views"][0])
  if name == "observe":  # the largest later feed: an observation block at the last turn's view
    return smp.feed.lower(b["graphdef"], b["sampler_params"], b["sampler_state"], b["obs"],
                          b["len_B"], b["len_B"], b["table"], b["sample_cfg"], s["views"][-1])
  if name == "decode":
    return smp.decode.lower(b["graphdef"], b["sampler_params"], b["sampler_state"], b["table"],
                            b["sample_cfg"], s["views"][-1])
  raise ValueError(f"--programs: unknown program {name!r}; expected one of {PROGRAMS}")


def analyze(compiled, num_devices: int, memory_report: str, dump: str | None = None) -> dict:
  """Per-device memory and cost from XLA, and trip-weighted HLO statistics.

  From XLA's memory-usage report of the compile (`compile_with_report`), `cpu_upcast` is the part
  of the temp that holds only f32 copies of bf16 arguments (roofline.cpu_upcast_bytes) and
  `peak_native` the peak without it: an ESTIMATE of the peak on a chip that multiplies bf16
  natively.
  """
  text = compiled.as_text()
  if dump:
    with open(dump, "w") as f:
      f.write(text)
  mem = compiled.memory_analysis()
  m = {k: float(getattr(mem, f"{k}_size_in_bytes")) for k in
       ("argument", "output", "alias", "temp", "generated_code")}
  m["peak"] = m["argument"] + m["output"] - m["alias"] + m["temp"]
  m["cpu_upcast"] = min(roofline.cpu_upcast_bytes(memory_report, text), m["temp"])
  m["peak_native"] = m["peak"] - m["cpu_upcast"]
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  hlo = roofline.hlo_stats(text, num_devices)
  return dict(memory=m, xla_flops=float(cost.get("flops", 0.0)),
              xla_bytes_accessed=float(cost.get("bytes accessed", 0.0)), **hlo)


def compile_with_report(lowered):
  """(compiled, XLA's memory-usage report text) — the report is only written by a dump."""
  with tempfile.TemporaryDirectory(prefix="dry_run_xla_") as tmp:
    compiled = lowered.compile(compiler_options={"xla_dump_to": tmp})
    reports = glob.glob(os.path.join(tmp, "*memory-usage-report.txt"))
    if not reports:
      raise RuntimeError(f"XLA wrote no memory-usage report under {tmp}")
    # The compile of the program itself is the largest report (helper jits may dump too).
    with open(max(reports, key=os.path.getsize)) as f:
      return compiled, f.read()


def run(c, *, devices=None, programs=PROGRAMS, prompt_tokens: int = 384, chip: str | None = None,
        log=print, dump_hlo: str | None = None, lengths: str | None = None) -> dict:
  """Compile `programs` for config `c` on `devices` (default: all); measured + predicted dict."""
  devices = list(jax.devices() if devices is None else devices)
  mesh = shd.make_mesh(dict(c.mesh), devices[:device_count(c, len(devices))])
  b = build(c, mesh, prompt_tokens, lengths)
  out = dict(mesh=dict(mesh.shape), devices=mesh.size, shapes=b["shapes"], programs={},
             model=dict(params=sum(math.prod(x.shape) for x in jax.tree.leaves(b["params"])),
                        **{k: getattr(b["cfg"], k) for k in ("num_layers", "hidden_size",
                                                             "num_heads", "num_kv_heads")}))
  for name in programs:
    t0 = time.perf_counter()
    lowered = lower(name, b)
    t1 = time.perf_counter()
    compiled, mem_report = compile_with_report(lowered)
    t2 = time.perf_counter()
    if dump_hlo:
      with open(os.path.join(dump_hlo, f"{name}.memory-usage-report.txt"), "w") as f:
        f.write(mem_report)
    out["programs"][name] = dict(lower_s=t1 - t0, compile_s=t2 - t1,
                                 **analyze(compiled, mesh.size, mem_report, dump_hlo and
                                           os.path.join(dump_hlo, f"{name}.hlo.txt")))
    log(f"compiled {name} in {t2 - t0:.1f} s")
  out["resident"] = dict(train_state=device_bytes(b["state"]),
                         params=device_bytes(b["params"]),
                         ref_params=device_bytes(b["params"]) if c.rl.kl_coef else 0.0,
                         sampler_params=device_bytes(b["sampler_params"]),
                         rollout_batch=device_bytes(b["rollout_batch"]),
                         sampler_state=device_bytes(b["sampler_state"]))
  chip = chip or (c.get("hardware") or {}).get("chip")
  if chip:  # memory fit for whatever was compiled; the step time needs every program
    budget = roofline.CHIPS[chip].hbm_bytes * (1 - roofline.Assumptions().headroom)
    native = memory_peaks(out, "peak_native")
    out["memory_fit"] = dict(chip=chip, budget_bytes=budget, **{
        k: dict(peak_bytes=p, fits=p <= budget, native_bytes=native[k],
                native_fits=native[k] <= budget) for k, p in memory_peaks(out).items()})
  if chip and all(p in out["programs"] for p in PROGRAMS):
    out["prediction"] = predict(c, b, out, roofline.CHIPS[chip])
  return out


def memory_peaks(out, key: str = "peak") -> dict:
  """Per-device bytes while each compiled program runs: its own peak plus what stays resident.

  `key` picks the program's measured "peak" or its "peak_native" estimate (`analyze`).
  The train state and the reference weights live for the whole run. The rollout's copy of the
  weights (policy.rollout_weights; its size per device follows `config.rollout.weight_sharding`)
  and the sampler state are the sampler's arguments, so they are in its programs' peaks, and the
  trainer drops both before the update. The rollout batch lives through the update phase.
  A program's arguments are already in its peak, so the log-prob pass (whose argument is the
  policy's or the reference's weights) counts one copy of the weights less.
  """
  progs, res = out["programs"], out["resident"]
  beside = {
      "train_step": res["ref_params"] + res["rollout_batch"],
      "logprobs": res["train_state"] + res["ref_params"] - res["params"] + res["rollout_batch"],
      "prefill": res["train_state"] + res["ref_params"],
      "observe": res["train_state"] + res["ref_params"],
      "decode": res["train_state"] + res["ref_params"]}
  return {k: progs[k]["memory"][key] + v for k, v in beside.items() if k in progs}


def predict(c, b, out, chip) -> dict:
  """Roofline prediction of one training step from the measured programs (see roofline.py)."""
  cfg, s, progs, res = b["cfg"], b["shapes"], out["programs"], out["resident"]
  tensor = out["mesh"]["tensor"]
  rows_dev = s["sampler_rows"] / (out["devices"] / tensor)
  compute_b = jnp.dtype(cfg.dtype).itemsize
  # Each device streams the (gathered) weights of its tensor slice once per decoded token, and the
  # K/V of every slot of the turn's view (attention reads the whole view, masked).
  weight_b = out["model"]["params"] * compute_b / tensor
  kv_b = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(
      c.rollout.cache_dtype or cfg.dtype).itemsize
  decode = dict(dot_flops=progs["decode"]["dot_flops"], link_bytes=progs["decode"]["link_bytes"],
                hbm_bytes_per_token=[weight_b + rows_dev * v * kv_b for v in s["views"]])
  # The prompt feed once, then one observation feed per search turn (measured at its last view,
  # where attention is widest: an upper bound for the earlier turns).
  pf, ob, searches = progs["prefill"], progs["observe"], c.rollout.max_turns
  fed = s["P"] + searches * s["obs_block"]
  prefill = dict(dot_flops=(pf["dot_flops"] + searches * ob["dot_flops"]) / fed,
                 link_bytes=(pf["link_bytes"] + searches * ob["link_bytes"]) / (1 + searches),
                 weight_bytes=weight_b)
  turns = c.rollout.max_turns + 1
  counts = dict(decode_steps=[c.rollout.max_turn_tokens] * turns,
                fed_tokens=fed, feed_calls=1 + searches,
                logprob_passes=2 if c.rl.kl_coef else 1,
                update_steps=c.rl.ppo_epochs * s["rows"] // c.rl.minibatch_size)
  pred = roofline.predict_step(chip, decode=decode, prefill=prefill, logprobs=progs["logprobs"],
                               update=progs["train_step"], counts=counts,
                               resident_bytes=res["train_state"] + res["ref_params"],
                               peaks=memory_peaks(out, "peak_native"))
  pred.update(chip=chip.name, counts=counts)
  return pred


def _gb(x: float) -> str:
  return f"{x / 1e9:8.2f}"


def report(out: dict) -> str:
  """Readable tables: measured per program, then the prediction."""
  s = out["shapes"]
  lines = [f"mesh {out['mesh']} ({out['devices']} devices) · {out['model']['params'] / 1e9:.2f}B "
           f"params · rollout rows {s['rows']} (sampler {s['sampler_rows']}) · P+R = {s['P']}+"
           f"{s['R']} = {s['L']} · cache {s['cap']} slots · turn views {s['views']}"
           + (f" · packed {s['packed']}" if "packed" in s else ""),
           "", "MEASURED by XLA (CPU compiler, per device; GB = 1e9 bytes; FLOPs per call)",
           f"{'program':<11}{'args':>9}{'out':>9}{'alias':>9}{'temp':>9}{'peak':>9}"
           f"{'upcast':>9}{'xlaTFLOP':>10}{'hloTFLOP':>10}{'xlaGBacc':>10}{'compile_s':>10}"]
  for name, p in out["programs"].items():
    m = p["memory"]
    lines.append(f"{name:<11}{_gb(m['argument'])} {_gb(m['output'])} {_gb(m['alias'])} "
                 f"{_gb(m['temp'])} {_gb(m['peak'])} {_gb(m['cpu_upcast'])} "
                 f"{p['xla_flops'] / 1e12:9.3f} "
                 f"{p['dot_flops'] / 1e12:9.3f} {p['xla_bytes_accessed'] / 1e9:9.2f} "
                 f"{p['compile_s']:9.1f}")
  lines += ["", "collectives (trip-weighted count / GB moved per device over links, ring):"]
  for name, p in out["programs"].items():
    cells = [f"{k} {v['weighted_count']:.0f}/{v['link_bytes'] / 1e9:.2f}"
             for k, v in p["collectives"].items() if v["count"]]
    lines.append(f"  {name:<11}" + (" · ".join(cells) or "none"))
    for lb, kind, typ, src in p["top_collectives"][:3]:
      lines.append(f"      {lb / 1e9:9.2f} GB  {kind} {typ}  ← {src[-90:]}")
  if "prediction" in out:
    pr = out["prediction"]
    lines += ["", f"PREDICTED on {pr['chip']} (vendor peaks × assumptions "
              f"{pr['assumptions']}):"]
    for k in ("decode", "prefill", "logprobs", "update"):
      lines.append(f"  {k:<9} " + " ".join(f"{a}={v:.1f}" for a, v in pr[k].items()))
    lines.append(f"  step ≈ {pr['step_s']:.1f} s")
  if "memory_fit" in out:
    fit, res = out["memory_fit"], out["resident"]
    lines += ["", f"MEMORY on {fit['chip']} (program peak + resident beside it; budget "
              f"{_gb(fit['budget_bytes']).strip()} GB = HBM − 10 %). measured = the CPU compile; "
              "native = ESTIMATE without its f32 upcasts of bf16 arguments (`upcast` above):",
              "  resident " + " · ".join(f"{k} {_gb(v).strip()}" for k, v in res.items())]
    verdict = lambda ok: "fits" if ok else "DOES NOT FIT"  # noqa: E731
    for k in PROGRAMS:
      if k in fit:
        lines.append(f"  {k:<11} measured {_gb(fit[k]['peak_bytes'])} GB {verdict(fit[k]['fits'])}"
                     f" · native {_gb(fit[k]['native_bytes'])} GB "
                     f"{verdict(fit[k]['native_fits'])}")
  return "\n".join(lines)


def main(argv):
  del argv
  c = _CONFIG.value
  if _DUMP.value:
    os.makedirs(_DUMP.value, exist_ok=True)
  out = run(c, programs=_PROGRAMS.value, prompt_tokens=_PROMPT.value, chip=_CHIP.value,
            dump_hlo=_DUMP.value, lengths=_LENGTHS.value)
  out["config"] = json.loads(c.to_json_best_effort())
  print(report(out))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
  app.run(main, flags_parser=lambda argv: argv)  # already parsed above
