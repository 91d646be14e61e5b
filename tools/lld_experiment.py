"""Lazy likelihood displacement on a CPU-scale testbed: GRPO vs GRPO + LLDS, matched seeds.

  nice -n 15 python tools/lld_experiment.py --outdir=/tmp/lld_hi   # warm-up + 4 arms, 25-45 min
  python tools/lld_experiment.py --outdir=/tmp/lld_smoke --smoke  # plumbing, ~1 min

Stages (each skipped when its output already exists, so arms can be added to a finished run):
1. testbed/ (tools/lld_world.py): a seeded knowledge base of fictional people (one Search-R1
   corpus document each), single- and two-hop questions whose answers are only in the
   documents, a byte-level BPE tokenizer trained on that text (small vocab → tiny embedding,
   short sequences), and the question split: warm-up and RL questions never share a (person,
   attribute) pair.
2. testbed/warm_model/: a random Qwen2-shaped policy after `sft.format_warmup` on ideal
   trajectories of the warm-up questions, saved as a HF dir with the tokenizer.
3. <arm>/: `trainer.train` from that policy with configs/lld_testbed.py and the arm's LLDS
   settings; every arm uses the same seed, so step 1's rollout batch is identical across arms.
4. lld_comparison.png: reward, preserving-response log-likelihood, entropy, grad norm, LLDS
   activity and searches per arm over steps; summary.md: first/last-window means per arm.
Settings and observed numbers: docs/lld-testbed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import lld_testbed  # noqa: E402
from llds_jax import data  # noqa: E402
from lld_report import plot, read_series, summarize  # noqa: E402
from lld_world import QUESTIONS, build_testbed  # noqa: E402

ARMS = {  # name -> rl overrides
    "grpo": dict(llds_lambda=0.0),
    "llds_action": dict(llds_lambda=0.2, llds_gate="action"),
    "llds_response": dict(llds_lambda=0.2, llds_gate="response"),
    "llds_token": dict(llds_lambda=0.2, llds_gate="token"),
}


def model_config(a, eos_id: int) -> dict:
  return dict(architectures=["Qwen2ForCausalLM"], vocab_size=a.vocab, hidden_size=a.hidden,
              intermediate_size=2 * a.hidden, num_hidden_layers=a.layers, num_attention_heads=4,
              num_key_value_heads=2, rope_theta=1e4, tie_word_embeddings=True,
              max_position_embeddings=2048, eos_token_id=eos_id)


def warm_up(out: str, a) -> dict:
  """Random policy → `sft.format_warmup` on the warm-up questions → HF dir `out/warm_model`."""
  import pyarrow.parquet as pq
  from flax import nnx
  from transformers import AutoTokenizer

  from llds_jax import hf_io, search_pool, sft, sharding as shd
  from llds_jax.model import ModelConfig, Transformer
  tok = AutoTokenizer.from_pretrained(os.path.join(out, "tokenizer"))
  if len(tok) > a.vocab:
    raise ValueError(f"tokenizer has {len(tok)} tokens, the model vocab is {a.vocab}")
  c = testbed_config(out, a)  # observations exactly as the RL rollouts will show them
  trajs = []
  worlds = [out] + [os.path.join(out, f"shadow{w}") for w in range(1, a.warm_worlds)]
  for w, d in enumerate(worlds):
    path = os.path.join(d, "warmup.parquet")
    examples = data.load_examples(path)
    queries = [r["extra_info"]["queries"] for r in pq.read_table(path).to_pylist()]
    trajs += sft.build_trajectories(
        tok, search_pool.load_retriever(os.path.join(d, "corpus.jsonl")), examples,
        plan=lambda ex: queries[ex.uid], direct_frac=a.direct_frac, seed=a.seed * 1000 + w,
        topk=a.topk, max_obs_tokens=c.rollout.max_obs_tokens,
        obs_truncation=c.rollout.obs_truncation, think=a.think)
  import jax
  mesh = shd.make_mesh(devices=jax.devices()[:a.warmup_devices or None])
  cfg = ModelConfig.from_hf(model_config(a, tok.eos_token_id), param_dtype="float32",
                            dtype="float32", remat="none")
  model = shd.init_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(a.seed)), mesh)
  t0 = time.perf_counter()
  model, losses = sft.format_warmup(
      model, tok, None, [], steps=a.warmup_steps, lr=a.warmup_lr, batch_size=a.batch,
      seed=a.seed, mesh=mesh, chunk_size=128, trajectories=trajs)
  hf_io.save_pretrained(model, cfg, os.path.join(out, "warm_model"), tokenizer=tok)
  k = max(len(losses) // 10, 1)
  summary = {"warmup/steps": len(losses), "warmup/loss_first": float(losses[:k].mean()),
             "warmup/loss_last": float(losses[-k:].mean()),
             "warmup/seconds": time.perf_counter() - t0}
  with open(os.path.join(out, "warmup.json"), "w") as f:
    json.dump({**summary, "args": vars(a), "losses": losses.tolist()}, f)
  return summary


def testbed_config(testbed: str, a):
  """configs/lld_testbed.py with the `--set key=value` overrides (the warm-up reads its
  observation sizes from it too, so warm-up and RL rollouts format observations alike)."""
  import ast
  c = lld_testbed.get_config(testbed)
  for item in a.set:
    key, sep, text = item.partition("=")
    node, *path = [c] + key.split(".")[:-1]
    for part in path:
      node = node.get(part) if hasattr(node, "get") else None
    if not sep or node is None or key.split(".")[-1] not in node:
      raise ValueError(f"--set {item!r}: expected key=value with key a field of "
                       f"configs/lld_testbed.py (e.g. rollout.max_turns=1)")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text  # a bare string such as rl.llds_gate=token
    node[key.split(".")[-1]] = value
  return c


def arm_config(arm: str, testbed: str, workdir: str, a):
  c = testbed_config(testbed, a)
  c.workdir, c.seed = workdir, a.seed + a.rl_seed_offset  # the world and warm-up keep a.seed
  c.total_steps = a.steps or c.total_steps
  c.opt.lr = a.lr or c.opt.lr
  c.retriever.topk = a.topk
  for k, v in ARMS[arm].items():
    c.rl[k] = v
  if a.smoke:  # every stage, tiny: 16 rows in two minibatches so LLDS acts
    c.rollout.prompts, c.rollout.group_size = 4, 4
    c.rl.minibatch_size = c.rl.micro_batch_size = 8
  return c


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--outdir", default="/tmp/lld")
  p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {list(ARMS)}")
  p.add_argument("--steps", type=int, default=None,
                 help="RL steps per arm (default: configs/lld_testbed.py's total_steps)")
  p.add_argument("--lr", type=float, default=None,
                 help="RL peak learning rate (default: configs/lld_testbed.py's; paper: 1e-6)")
  p.add_argument("--seeds", default="0",
                 help="comma-separated; each seed draws its own world, init and rollouts")
  p.add_argument("--rl_seed_offset", type=int, default=0,
                 help="RL seed = seed + this (prompt order, rollouts); world and warm-up keep the "
                      "seed: with --testbeds, another draw of the RL runs on the same worlds")
  p.add_argument("--testbeds", default="",
                 help="read seed<s>/testbed (world + warm model) from this outdir of an earlier "
                      "run instead of building it under --outdir")
  p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
  p.add_argument("--people", type=int, default=48, help="fictional people = corpus documents")
  p.add_argument("--two_hop_frac", type=float, default=0.0,
                 help="share of people with a two-hop Q")
  p.add_argument("--warm_frac", type=float, default=0.5, help="share of questions for warm-up")
  p.add_argument("--vocab", type=int, default=640)
  p.add_argument("--hidden", type=int, default=64)
  p.add_argument("--layers", type=int, default=3)
  p.add_argument("--warmup_steps", type=int, default=1600)
  p.add_argument("--warmup_lr", type=float, default=5e-3)
  p.add_argument("--batch", type=int, default=16, help="warm-up batch")
  p.add_argument("--warmup_devices", type=int, default=1,
                 help="devices the warm-up runs on (0 = all; 1 = the same numbers on any host)")
  p.add_argument("--direct_frac", type=float, default=0.65, help="warm-up answers without search")
  p.add_argument("--topk", type=int, default=3, help="passages per search")
  p.add_argument("--warm_worlds", type=int, default=8,
                 help="worlds whose facts the warm-up reads (1 = the RL world only)")
  p.add_argument("--attributes", default="city",
                 help=f"single-hop question kinds, a subset of {list(QUESTIONS)}")
  p.add_argument("--think", action=argparse.BooleanOptionalAction, default=False,
                 help="warm-up actions start with a <think> step (--no-think: with their tag)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a field of configs/lld_testbed.py in every arm (repeatable), "
                      "e.g. --set=rollout.max_turns=1; arms' LLDS settings still apply")
  p.add_argument("--smoke", action="store_true", help="tiny sizes, 2 steps: a plumbing check")
  a = p.parse_args(argv)
  if a.smoke:
    a.steps, a.people, a.vocab, a.hidden, a.layers = min(a.steps or 2, 2), 40, 512, 32, 2
    a.warmup_steps, a.batch, a.warm_worlds = 4, 8, min(a.warm_worlds, 2)
  try:
    a.seeds = [int(s) for s in a.seeds.split(",")]
  except ValueError:
    p.error(f"--seeds={a.seeds!r}: comma-separated integers expected")
  a.seed = a.seeds[0]
  for s in a.seeds if a.testbeds else ():
    if not has_warm_model(testbed_dir(a, s)):
      p.error(f"--testbeds={a.testbeds}: no seed{s}/testbed/warm_model there; run that outdir's "
              f"--seeds first")
  bad = set(a.attributes.split(",")) - set(QUESTIONS)
  if bad:
    p.error(f"unknown --attributes {sorted(bad)}; known: {list(QUESTIONS)}")
  unknown = set(a.arms.split(",")) - set(ARMS)
  if unknown:
    p.error(f"unknown arms {sorted(unknown)}; known: {list(ARMS)}")
  try:  # a bad --set fails here, not after the testbed is built or inside a worker process
    testbed_config(a.outdir, a)
  except (ValueError, TypeError) as e:
    p.error(str(e))
  return a


def testbed_dir(a, seed: int) -> str:
  return os.path.join(a.testbeds or a.outdir, f"seed{seed}", "testbed")


def has_warm_model(testbed: str) -> bool:
  return os.path.exists(os.path.join(testbed, "warm_model", "config.json"))


def with_seed(a, seed: int):
  """The arguments of one seed's runs (world, initialization and rollouts all follow `seed`)."""
  return argparse.Namespace(**{**vars(a), "seed": seed})


def prepare(testbed: str, a) -> None:
  """Stages 1-2 for one seed: the testbed files, then the warmed-up policy (each if missing)."""
  if not os.path.exists(os.path.join(testbed, "rl_train.parquet")):
    build_testbed(testbed, a)
  if not has_warm_model(testbed):
    print(f"seed {a.seed} warm-up:", warm_up(testbed, a), flush=True)


def run_arm(arm: str, testbed: str, workdir: str, a) -> None:
  """Stage 3 for one (seed, arm), unless its metrics already cover the arm's steps."""
  from llds_jax import metrics as mlib, restore, trainer
  c = arm_config(arm, testbed, workdir, a)
  if os.path.exists(os.path.join(workdir, "config.json")):  # resuming or reusing: same RL seed
    seed = restore.run_config(workdir).seed
    if seed != c.seed:
      raise ValueError(f"{workdir} holds a run with RL seed {seed}, not {c.seed} (--rl_seed_offset="
                       f"{a.rl_seed_offset}); use a new --outdir with --testbeds={a.outdir}")
  done = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(done) and len(mlib.read_metrics(done)) >= c.total_steps:
    return
  t0 = time.perf_counter()
  recs = trainer.train(c)
  print(f"seed {a.seed} {arm}: {len(recs)} steps in {time.perf_counter() - t0:.0f}s, reward "
        f"{recs[0]['reward/mean']:.2f} -> {recs[-1]['reward/mean']:.2f}", flush=True)


def run_all(chains: list[tuple[tuple, list[tuple]]], jobs: int, pool=None) -> None:
  """Each chain's head task, then its tails; a task is `(fn, args)`. With `jobs` > 1, `jobs` at a
  time in fresh (spawned: JAX is not fork-safe) processes, and a chain's tails are queued when its
  own head is done: a seed's arms need only that seed's warm-up, so no worker idles through the
  last warm-up. `pool`: `multiprocessing.Pool`-like (tests pass a thread pool). A failed task
  stops the run with its error; leaving the pool ends the other workers."""
  tasks = sum(1 + len(tails) for _, tails in chains)
  if pool is None and (jobs <= 1 or tasks <= 1):
    for head, tails in chains:
      for fn, args in (head, *tails):
        fn(*args)
    return
  import multiprocessing
  import queue
  pool = pool or multiprocessing.get_context("spawn").Pool(min(jobs, tasks))
  finished = queue.SimpleQueue()  # (tails, error), put by the pool's result thread

  def start(task, tails):
    pool.apply_async(*task, callback=lambda _: finished.put((tails, None)),
                     error_callback=lambda e: finished.put((tails, e)))

  with pool:
    for head, tails in chains:
      start(head, tails)
    running = len(chains)
    while running:
      tails, error = finished.get()
      if error is not None:
        raise error
      for task in tails:
        start(task, [])
      running += len(tails) - 1


def main(argv=None) -> dict[str, dict[int, str]]:
  """Runs the missing stages for every seed; returns {arm: {seed: workdir}}."""
  a = parse_args(argv)
  t0 = time.perf_counter()
  seeds = {s: (os.path.join(a.outdir, f"seed{s}"), with_seed(a, s)) for s in a.seeds}
  runs = {arm: {s: os.path.join(d, arm) for s, (d, _) in seeds.items()}
          for arm in a.arms.split(",")}
  chains = []  # per seed: its testbed and warm-up, then its arms
  for s, (_, sa) in seeds.items():
    testbed = testbed_dir(a, s)
    chains.append(((prepare, (testbed, sa)),
                   [(run_arm, (arm, testbed, runs[arm][s], sa)) for arm in runs]))
  run_all(chains, a.jobs)
  summary = {arm: {str(s): read_series(wd) for s, wd in by_seed.items()}
             for arm, by_seed in runs.items()}
  with open(os.path.join(a.outdir, "summary.json"), "w") as f:
    json.dump(summary, f)
  plot(summary, os.path.join(a.outdir, "lld_comparison.png"))
  table = summarize(summary)
  with open(os.path.join(a.outdir, "summary.md"), "w") as f:
    f.write(table + f"\n\nwall time of this call: {time.perf_counter() - t0:.0f} s\n")
  print(table)
  return runs


if __name__ == "__main__":
  main()
