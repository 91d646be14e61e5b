"""The synthetic world of the LLD testbed (tools/lld_experiment.py, docs/lld-testbed.md).

Fictional people whose names share parts (so BM25 returns namesakes as distractors), one
Search-R1 corpus document each, questions whose answers are only in those documents, the
testbed's byte-level BPE tokenizer, and the question split: warm-up questions and RL questions
never share a (person, attribute) pair.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llds_jax import bpe  # noqa: E402

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
