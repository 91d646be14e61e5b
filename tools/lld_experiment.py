"""Lazy likelihood displacement on a CPU-scale testbed: GRPO vs GRPO + LLDS, matched seeds.

  nice -n 15 python tools/lld_experiment.py --outdir=/tmp/lld_hi   # warm-up + 4 arms, 25-45 min
  python tools/lld_experiment.py --outdir=/tmp/lld_smoke --smoke  # plumbing, ~1 min

Stages (each skipped when its output already exists, so arms can be added to a finished run):
1. testbed/: a seeded knowledge base of fictional people (one Search-R1 corpus document each),
   single- and two-hop questions whose answers are only in the documents, a byte-level BPE
   tokenizer trained on that text (small vocab → tiny embedding, short sequences), and the
   question split: warm-up questions and RL questions never share a (person, attribute) pair.
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
import dataclasses
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import lld_testbed  # noqa: E402
from llds_jax import bpe, data  # noqa: E402
from lld_report import plot, read_series, summarize  # noqa: E402

ARMS = {  # name -> rl overrides
    "grpo": dict(llds_lambda=0.0),
    "llds_action": dict(llds_lambda=0.2, llds_gate="action"),
    "llds_response": dict(llds_lambda=0.2, llds_gate="response"),
    "llds_token": dict(llds_lambda=0.2, llds_gate="token"),
}
SYLLABLES = ("zor", "bel", "vant", "kir", "mol", "tan", "rix", "del", "sha", "vor", "lum", "pek",
             "tis", "gar", "nol", "fen", "dra", "qui", "mar", "bo")
CITIES = ("Lima", "Oslo", "Cairo", "Quito", "Dakar", "Hanoi", "Perth", "Riga", "Tunis", "Bern",
          "Accra", "Sofia")
JOBS = ("baker", "pilot", "tailor", "farmer", "nurse", "judge", "miner", "potter", "sailor",
        "chemist", "painter", "glazier")
INSTRUMENTS = ("harp", "violin", "flute", "drums", "cello", "banjo", "oboe", "tuba", "lute",
               "piano")
# attribute -> (question, search query); the answer sits in the person's document only.
QUESTIONS = {
    "city": ("Where was {name} born?", "{name} born"),
    "job": ("What is the job of {name}?", "{name} job"),
    "instrument": ("Which instrument does {name} play?", "{name} instrument"),
    "mentor": ("Who is the mentor of {name}?", "{name} mentor"),
}
TWO_HOP = "Where was the mentor of {name} born?"
# Short stand-ins for Search-R1's 110-word prompt and Qwen's default system prompt: the policy is
# random before the warm-up, so the long instructions carry nothing for it and would be ~75% of
# every row's tokens. Same tags, same chat framing.
PROMPT = ("Answer the question. Search with <search> query </search> to get results in "
          "<information> and </information>. Answer with <answer> and </answer>. "
          "Question: {question}\n")
CHAT_TEMPLATE = (  # ChatML as Qwen2.5 renders it, without the default system turn
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


@dataclasses.dataclass(frozen=True)
class Question:
  text: str
  gold: str
  queries: tuple[str, ...]  # the ideal searches, in order
  key: tuple[str, str]  # (person, attribute): warm-up and RL never share one


FACTS = {"city": "was born in {city}", "job": "works as a {job}",
         "instrument": "plays the {instrument}", "mentor": "has the mentor {mentor}"}


def make_world(seed: int, n_people: int, world: int = 0, attributes: tuple[str, ...] = tuple(FACTS),
               ) -> tuple[list[dict], list[tuple[str, str]]]:
  """People with shared first/last names (BM25 distractors) and their corpus documents.

  The names follow `seed` alone; the facts (city, job, instrument, mentor) follow (seed, world):
  worlds 1, 2, … are the same people with re-drawn facts ("shadow worlds" for the warm-up). A
  document states the `attributes` facts only (the mentor's too when it is asked two-hop).
  """
  rng = np.random.default_rng(seed)
  first = sorted({(a + b).capitalize() for a in SYLLABLES for b in SYLLABLES if a != b})
  last = sorted({(a + b).capitalize() for a in SYLLABLES[::2] for b in SYLLABLES[1::2]})
  first = list(rng.choice(first, 16, replace=False))
  last = list(rng.choice(last, 16, replace=False))
  pairs = rng.choice(len(first) * len(last), n_people, replace=False)
  names = [f"{first[p // len(last)]} {last[p % len(last)]}" for p in pairs]
  rng = rng if world == 0 else np.random.default_rng((seed, world))
  people = []
  for i, name in enumerate(names):
    people.append(dict(name=name, city=str(rng.choice(CITIES)), job=str(rng.choice(JOBS)),
                       instrument=str(rng.choice(INSTRUMENTS)),
                       mentor=names[(i + 1 + rng.integers(n_people - 1)) % n_people]))
  docs = []
  for i, p in enumerate(people):
    facts = [FACTS[k].format(**p) for k in FACTS if k in attributes]
    text = f"{p['name']} " + (", ".join(facts[:-1]) + " and " if len(facts) > 1 else "") + facts[-1]
    docs.append((str(i), f'"{p["name"]}"\n{text}.'))
  return people, docs


def make_questions(people: list[dict], two_hop_frac: float, seed: int,
                   attributes: tuple[str, ...] = tuple(QUESTIONS)) -> list[Question]:
  """Every (person, attribute) single-hop question plus a share of two-hop ones, shuffled."""
  by_name = {p["name"]: p for p in people}
  qs = []
  for p in people:
    for attr in attributes:
      q, query = QUESTIONS[attr]
      qs.append(Question(q.format(name=p["name"]), p[attr], (query.format(name=p["name"]),),
                         (p["name"], attr)))
  rng = np.random.default_rng(seed)
  for p in rng.permutation(people)[:int(two_hop_frac * len(people))]:
    m = by_name[p["mentor"]]
    qs.append(Question(TWO_HOP.format(name=p["name"]), m["city"],
                       (f"{p['name']} mentor", f"{m['name']} born"), (p["name"], "mentor_city")))
  return [qs[i] for i in rng.permutation(len(qs))]


def write_parquet(questions: list[Question], split: str, path: str):
  """Search-R1 parquet rows (DESIGN.md §Data) with the short PROMPT, data_source "lld_testbed"."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  rows = [{"data_source": "lld_testbed", "question": q.text,
           "prompt": [{"role": "user", "content": PROMPT.format(question=q.text)}],
           "ability": "fact-reasoning",
           "reward_model": {"style": "rule", "ground_truth": {"target": [q.gold]}},
           "extra_info": {"split": split, "index": i, "queries": list(q.queries)}}
          for i, q in enumerate(questions)]
  pq.write_table(pa.Table.from_pylist(rows), path)


def write_corpus(docs: list[tuple[str, str]], path: str):
  with open(path, "w") as f:
    for doc_id, contents in docs:
      f.write(json.dumps({"id": doc_id, "contents": contents}) + "\n")


def build_testbed(out: str, a) -> list[Question]:
  """Corpus, tokenizer and parquet files in `out`; returns the warm-up questions.

  With `a.warm_worlds` > 1 the warm-up also gets `shadow{w}/{corpus.jsonl,warmup.parquet}`: all
  questions over world w's facts (the same people, re-drawn facts). A fact then differs between
  worlds, so the warm-up cannot be fitted by memorizing (person, attribute) -> value, only by
  reading the observation; and it has searched for every person, RL ones included, without ever
  seeing world 0's answers to the RL questions.
  """
  from llds_jax import observations, retriever, sft
  attributes = tuple(a.attributes.split(","))
  facts = attributes + (("mentor", "city") if a.two_hop_frac else ())
  people, docs = make_world(a.seed, a.people, 0, facts)
  qs = make_questions(people, a.two_hop_frac, a.seed, attributes)
  n_warm = int(a.warm_frac * len(qs))
  warm, rl_qs = qs[:n_warm], qs[n_warm:]
  os.makedirs(out, exist_ok=True)
  write_corpus(docs, os.path.join(out, "corpus.jsonl"))
  for w in range(1, a.warm_worlds):
    shadow = os.path.join(out, f"shadow{w}")
    os.makedirs(shadow, exist_ok=True)
    people_w, docs_w = make_world(a.seed, a.people, w, facts)
    write_corpus(docs_w, os.path.join(shadow, "corpus.jsonl"))
    # Every question, RL ones included (so the warm-up has searched for every person), with
    # world w's answers and hops: world 0's answers to the RL questions are never shown.
    write_parquet(make_questions(people_w, a.two_hop_frac, a.seed, attributes), "warmup",
                  os.path.join(shadow, "warmup.parquet"))
  texts = [d for _, d in docs] + [observations.information_block(retriever.format_observation([d]))
                                  for _, d in docs]
  texts += [PROMPT.format(question=q.text) for q in qs] + [CHAT_TEMPLATE] * 20
  # Every name part, city, job and instrument often enough to become one token each: a copied
  # name or fact is then a few tokens, as words are for a real tokenizer.
  words = {w for p in people for w in p["name"].split()} | set(CITIES) | set(JOBS)
  texts += [" ".join(sorted(words | set(INSTRUMENTS)))] * 50
  texts += [sft.SEARCH_THINK.format(query=x) for q in qs for x in q.queries]
  texts += [sft.ANSWER_THINK.format(answer=q.gold) for q in qs] + [sft.DIRECT_THINK] * 20
  texts += [sft.SEARCH_PLAIN.format(query=x) for q in qs for x in q.queries]
  texts += [sft.ANSWER_PLAIN.format(answer=q.gold) for q in qs]
  bpe.train_bpe(texts, a.vocab, CHAT_TEMPLATE).save_pretrained(os.path.join(out, "tokenizer"))
  write_parquet(warm, "warmup", os.path.join(out, "warmup.parquet"))
  write_parquet(rl_qs, "train", os.path.join(out, "rl_train.parquet"))
  return warm


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
  c.workdir, c.seed = workdir, a.seed
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


def with_seed(a, seed: int):
  """The arguments of one seed's runs (world, initialization and rollouts all follow `seed`)."""
  return argparse.Namespace(**{**vars(a), "seed": seed})


def prepare(testbed: str, a) -> None:
  """Stages 1-2 for one seed: the testbed files, then the warmed-up policy (each if missing)."""
  if not os.path.exists(os.path.join(testbed, "rl_train.parquet")):
    build_testbed(testbed, a)
  if not os.path.exists(os.path.join(testbed, "warm_model", "config.json")):
    print(f"seed {a.seed} warm-up:", warm_up(testbed, a), flush=True)


def run_arm(arm: str, testbed: str, workdir: str, a) -> None:
  """Stage 3 for one (seed, arm), unless its metrics already cover the arm's steps."""
  from llds_jax import metrics as mlib, trainer
  c = arm_config(arm, testbed, workdir, a)
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
  for s, (d, sa) in seeds.items():
    testbed = os.path.join(d, "testbed")
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
