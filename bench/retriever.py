"""Retrieval throughput: llds_jax BM25 vs rank_bm25 (and bm25s if installed), identical scores asserted.

  python bench/retriever.py [--synthetic_docs 200000] [--rank_bm25_queries 40]
  python bench/retriever.py --scaling 50000,100000,200000,400000 [--pool]

`--scaling` instead measures tools/build_index.py end to end (jsonl → index directory) on
wiki-18-like passages (a random title + ~100 words of real sentences from the Wikipedia summaries),
reports build time, peak memory, size on disk and batched query rate per size, exhaustive and pruned
(MaxScore, llds_jax/pruning.py) in queries per CPU-second with their top-10 lists asserted equal,
and extrapolates linearly to the 21,015,324 passages of wiki-18. `--pool` adds the wall-clock rate of
search_pool.SearchPool with 1 and 2 worker processes and of 2 threads sharing one index.

Corpora: the 10,033 Wikipedia summaries of tools/fetch_assets.py (queries: the 1,788 FanOutQA
sub-questions) and a synthetic Zipf corpus (queries: 5 words drawn from a random target document).
All systems get the same token lists (llds_jax.retriever.tokenize), k=10, k1=1.5, b=0.75.
rank_bm25 is timed on the first --rank_bm25_queries queries (get_scores + argsort) and its per-query
rate compared; on those queries the top-10 score lists of llds_jax must equal rank_bm25's to 1e-6.
bm25s (method "robertson", single thread) scores are (k1+1)× smaller and floor df > N/2 terms at 0
instead of rank_bm25's epsilon, so only its speed and how often its top-10 lists agree are reported.
Appends a dated table to bench/RESULTS.md.

  python bench/retriever.py --lucene 200000 [--lucene_python /tmp/lucene_venv/bin/python]

`--lucene` compares with Pyserini (Lucene) on the `--scaling` passages: bench/lucene_compare.py.
"""

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
from rank_bm25 import BM25Okapi

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llds_jax import assets, corpus, retriever, search_pool  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lucene_compare  # pylint: disable=g-import-not-at-top,wrong-import-position

try:
  import bm25s  # pylint: disable=g-import-not-at-top
except ImportError:
  bm25s = None

K = 10
_STORE = ("doc_", "passages")  # document store files (format 1, format 2)
WIKI18_PASSAGES = 21_015_324


def timed(fn):
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def cpu_timed(fn):
  """CPU seconds of this process: robust to other jobs on a shared box, unlike wall time."""
  start = time.process_time()
  out = fn()
  return out, time.process_time() - start


def pool_rates(index_dir: str, index, questions) -> dict:
  """Wall-clock q/s of one batch of questions: SearchPool with 1 and 2 processes, 2 threads."""
  out = {}
  want = index.search(questions, K)
  for workers in (1, 2):
    with search_pool.SearchPool(index_dir, workers) as pool:
      pool.search(questions[:64], K)  # start the workers (spawn + load) before timing
      cpu0 = pool.cpu_s
      hits, t = timed(lambda: pool.search(questions, K))  # pylint: disable=cell-var-from-loop
      assert hits == want
      out[f"pool{workers}_qps"] = len(questions) / t
      out[f"pool{workers}_qpcs"] = len(questions) / (pool.cpu_s - cpu0)
  with concurrent.futures.ThreadPoolExecutor(2) as threads:
    half = len(questions) // 2
    (a, b), t = timed(lambda: list(threads.map(lambda qs: index.search(qs, K),
                                               [questions[:half], questions[half:]])))
    assert a + b == want
    out["threads2_qps"] = len(questions) / t
  return out


def fanoutqa_questions() -> list[str]:
  paths = assets.asset_paths(require=("fanoutqa_train", "fanoutqa_test"))
  return [r["question"] for split in ("fanoutqa_train", "fanoutqa_test")
          for r in pq.read_table(paths[split], columns=["question"]).to_pylist()]


def wiki_corpus():
  paths = assets.asset_paths(require=("wiki_corpus",))
  docs = [retriever.tokenize(c) for _, c in corpus.read_corpus(paths["wiki_corpus"])]
  return docs, [retriever.tokenize(q) for q in fanoutqa_questions()]


def synthetic_corpus(n_docs: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  vocab = np.array([f"t{i}" for i in range(100_000)], dtype=object)
  probs = 1.0 / np.arange(1, len(vocab) + 1) ** 1.07
  lens = rng.integers(20, 121, size=n_docs)
  words = rng.choice(len(vocab), size=lens.sum(), p=probs / probs.sum())
  docs = [vocab[w].tolist() for w in np.split(words, np.cumsum(lens)[:-1])]
  targets = rng.integers(0, n_docs, size=2000)
  queries = [list(rng.choice(docs[t], size=5)) for t in targets]
  return docs, queries


def run(name: str, docs, queries, n_rank: int) -> dict:
  print(f"--- {name}: {len(docs):,} docs, {len(queries):,} queries", flush=True)
  row = {"corpus": name, "docs": len(docs), "queries": len(queries)}
  ours, row["ours_index_s"] = timed(lambda: retriever.BM25Index.from_tokenized(docs))
  ours.search(queries[:8], K)  # warm-up (page-in, allocator)
  hits, t = timed(lambda: ours.search(queries, K))
  row["ours_qps"] = len(queries) / t
  _, t = timed(lambda: [ours.search([q], K) for q in queries[:200]])
  row["ours_qps_single"] = 200 / t

  ref, row["rank_index_s"] = timed(lambda: BM25Okapi(docs))

  def rank_top():
    out = []
    for q in queries[:n_rank]:
      scores = ref.get_scores(q)
      out.append(scores[np.argsort(scores)[::-1][:K]])
    return out

  ref_top, t = timed(rank_top)
  row["rank_qps"] = n_rank / t
  for q_top, q_hits in zip(ref_top, hits):
    np.testing.assert_allclose([s for _, s in q_hits], q_top, rtol=1e-6, atol=1e-9)
  row["identical"] = f"yes ({n_rank} queries)"

  if bm25s is not None:
    model = bm25s.BM25(method="robertson", k1=1.5, b=0.75)
    _, row["bm25s_index_s"] = timed(lambda: model.index(docs, show_progress=False))
    (_, s_scores), t = timed(lambda: model.retrieve(queries, k=K, n_threads=1, show_progress=False))
    row["bm25s_qps"] = len(queries) / t
    same = [np.allclose(np.asarray(s) * 2.5, [x for _, x in h], rtol=1e-5) for s, h in zip(s_scores, hits)]
    row["bm25s_same"] = float(np.mean(same))
  print(row, flush=True)
  return row


def machine() -> str:
  cpu = platform.processor() or "cpu"
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  load = os.getloadavg()[0]  # other jobs on a shared box skew all systems' timings alike
  return (f"{cpu}, {os.cpu_count()} cores (load average {load:.1f} at the end), Python "
          f"{platform.python_version()}, numpy {np.__version__}")


def append_results(rows: list[dict], args):
  lines = [f"\n## Retriever throughput — {datetime.date.today().isoformat()}\n",
           f"`python bench/retriever.py --synthetic_docs {args.synthetic_docs} --rank_bm25_queries "
           f"{args.rank_bm25_queries}` on {machine()}; k=10, k1=1.5, b=0.75, single process.\n",
           "| corpus | docs | queries | index s (ours / rank_bm25 / bm25s) | ours q/s (batched) | ours q/s "
           "(one at a time) | rank_bm25 q/s | bm25s q/s | ours ÷ rank_bm25 | ours ÷ bm25s | top-10 = "
           "rank_bm25 | bm25s top-10 agrees |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    b_idx = f"{r['bm25s_index_s']:.1f}" if "bm25s_qps" in r else "–"
    b_qps = f"{r['bm25s_qps']:,.0f}" if "bm25s_qps" in r else "–"
    b_ratio = f"{r['ours_qps'] / r['bm25s_qps']:.2f}×" if "bm25s_qps" in r else "–"
    b_same = f"{100 * r['bm25s_same']:.0f}%" if "bm25s_qps" in r else "–"
    lines.append(
        f"| {r['corpus']} | {r['docs']:,} | {r['queries']:,} | {r['ours_index_s']:.1f} / "
        f"{r['rank_index_s']:.1f} / {b_idx} | {r['ours_qps']:,.0f} | {r['ours_qps_single']:,.0f} | "
        f"{r['rank_qps']:,.1f} | {b_qps} | {r['ours_qps'] / r['rank_qps']:,.0f}× | {b_ratio} | "
        f"{r['identical']} | {b_same} |")
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
  with open(path, "a", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  print(f"appended to {path}")


def write_passages(path: str, n: int, seed: int = 0):
  """n Search-R1 rows: a random summary title + real summary sentences up to ≥ 100 words."""
  rows = list(corpus.read_corpus(assets.asset_paths(require=("wiki_corpus",))["wiki_corpus"]))
  titles = [c.split("\n", 1)[0] for _, c in rows]
  sentences = [s for _, c in rows for s in re.split(r"(?<=\.) ", c.split("\n", 1)[1]) if s]
  rng = np.random.default_rng(seed)
  with open(path, "w", encoding="utf-8") as f:
    for i in range(n):
      words = []
      while len(words) < 100:
        words += sentences[rng.integers(len(sentences))].split()
      contents = f"{titles[rng.integers(len(titles))]}\n{' '.join(words[:100])}"
      f.write(json.dumps({"id": str(i), "contents": contents}) + "\n")


def scaling(sizes: list[int], pool: bool = False):
  questions = wiki_corpus()[1]
  tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "build_index.py")
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for n in sizes:
      corpus, out = os.path.join(tmp, f"c{n}.jsonl"), os.path.join(tmp, f"i{n}")
      write_passages(corpus, n)
      start = time.perf_counter()
      subprocess.run([sys.executable, tool, "--corpus", corpus, "--out", out, "--quiet"], check=True,
                     capture_output=True)
      build_s = time.perf_counter() - start
      rss_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # largest build so far
      files = {f: os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)}
      index = retriever.BM25Index.load(out)
      index.search(questions[:16], K)
      index.search(questions[:16], K, prune=False)
      _, t = timed(lambda: index.search(questions, K))
      exhaustive, cpu_e = cpu_timed(lambda: index.search(questions, K, prune=False))
      pruned, cpu_p = cpu_timed(lambda: index.search(questions, K))
      assert pruned == exhaustive  # exact: same ids, same scores, same tie order
      rows.append({"n": n, "build_s": build_s, "rss_mib": rss_mib, "qps": len(questions) / t,
                   "qpcs_exhaustive": len(questions) / cpu_e, "qpcs_pruned": len(questions) / cpu_p,
                   **(pool_rates(out, index, questions) if pool else {}),
                   "postings": index.meta["num_postings"], "terms": index.meta["num_terms"],
                   "dense": index.meta["num_dense_terms"],
                   "index_mib": sum(v for f, v in files.items() if not f.startswith(_STORE)) / 2**20,
                   "store_mib": sum(v for f, v in files.items() if f.startswith(_STORE)) / 2**20,
                   "corpus_mib": os.path.getsize(corpus) / 2**20})
      print(rows[-1], flush=True)
      os.remove(corpus)
  last, scale = rows[-1], WIKI18_PASSAGES / rows[-1]["n"]
  prev = rows[-2] if len(rows) > 1 else {"n": 0, "rss_mib": 0.0}
  # Memory = interpreter baseline + a per-passage slope (from the two largest sizes).
  rss_gib = (last["rss_mib"] + (last["rss_mib"] - prev["rss_mib"]) / (last["n"] - prev["n"])
             * (WIKI18_PASSAGES - last["n"])) / 1024
  lines = [f"\n## BM25 index scaling — {datetime.date.today().isoformat()}\n",
           f"`python bench/retriever.py --scaling {','.join(map(str, sizes))}{' --pool' if pool else ''}` on {machine()}. "
           "Passages: random summary title + 100 words of real summary sentences (wiki-18 passages "
           "are 100 words); build = tools/build_index.py end to end (okapi); queries: the 1,788 "
           "FanOutQA questions, batched, k=10. q/CPU-s = queries per CPU-second of the searching "
           "process (pruned top-10 lists asserted equal to the exhaustive ones); pool columns are "
           "wall-clock q/s, so they depend on the load (in brackets: q per CPU-s summed over the workers).\n",
           "| passages | build s (s per M passages) | peak RSS MiB | postings | terms | dense-row terms | postings+vocab "
           "MiB | doc store MiB | corpus jsonl MiB | queries/s (wall) | exhaustive q/CPU-s | pruned "
           "q/CPU-s | pruned ÷ exhaustive | pool 1 proc q/s | pool 2 proc q/s | 2 threads q/s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    pools = " | ".join(
        (f"{r[c]:,.0f}" + (f" ({r[c[:5] + '_qpcs']:,.0f})" if c.startswith("pool") else ""))
        if c in r else "–" for c in ("pool1_qps", "pool2_qps", "threads2_qps"))
    lines.append(f"| {r['n']:,} | {r['build_s']:.1f} ({r['build_s'] / r['n'] * 1e6:.0f}) | "
                 f"{r['rss_mib']:,.0f} | {r['postings']:,} | "
                 f"{r['terms']:,} | {r['dense']} | {r['index_mib']:,.0f} | {r['store_mib']:,.0f} | "
                 f"{r['corpus_mib']:,.0f} | {r['qps']:,.0f} | {r['qpcs_exhaustive']:,.0f} | "
                 f"{r['qpcs_pruned']:,.0f} | {r['qpcs_pruned'] / r['qpcs_exhaustive']:.2f}× | "
                 f"{pools} |")
  lines.append(f"| **{WIKI18_PASSAGES:,} (linear extrapolation ×{scale:.1f})** | "
               f"**{last['build_s'] * scale / 60:,.0f} min** | **{rss_gib:,.1f} GiB** | "
               f"{last['postings'] * scale / 1e9:.2f} B | – | – | **{last['index_mib'] * scale / 1024:,.1f} GiB** | "
               f"**{last['store_mib'] * scale / 1024:,.1f} GiB** | {last['corpus_mib'] * scale / 1024:,.1f} GiB | "
               f"**{last['qps'] / scale:,.1f}** | {last['qpcs_exhaustive'] / scale:,.1f} | "
               f"**{last['qpcs_pruned'] / scale:,.1f}** | – | – | – | – |")
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
  with open(path, "a", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--synthetic_docs", type=int, default=200_000)
  parser.add_argument("--rank_bm25_queries", type=int, default=40)
  parser.add_argument("--scaling", default=None, help="comma-separated passage counts")
  parser.add_argument("--pool", action="store_true", help="with --scaling: search pool rates")
  parser.add_argument("--lucene", default=None,
                      help="comma-separated passage counts: ours vs Pyserini (bench/lucene_compare.py)")
  parser.add_argument("--lucene_python", default=None,
                      help="interpreter with Pyserini for --lucene (default: $LLDS_LUCENE_PYTHON)")
  args = parser.parse_args(argv)
  if args.lucene:
    lucene_python = lucene_compare.lucene_python(args.lucene_python)  # fails before any work
    lucene_compare.main([int(n) for n in args.lucene.split(",")], lucene_python, fanoutqa_questions(),
                        write_passages, machine, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                              "RESULTS.md"))
    return
  if args.scaling:
    scaling([int(n) for n in args.scaling.split(",")], pool=args.pool)
    return
  rows = [run("wiki summaries (FanOutQA questions)", *wiki_corpus(), n_rank=args.rank_bm25_queries * 5)]
  rows.append(run(f"synthetic Zipf {args.synthetic_docs // 1000}k", *synthetic_corpus(args.synthetic_docs),
                  n_rank=args.rank_bm25_queries))
  append_results(rows, args)


if __name__ == "__main__":
  main()
