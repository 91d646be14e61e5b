"""Builds a BM25 index from a Search-R1 corpus jsonl, or queries one.

  python tools/build_index.py --corpus CORPUS.jsonl --out INDEX_DIR [--variant okapi|lucene] [--k1 K1 --b B]
      [--build_memory_mb MB]
  python tools/build_index.py --index INDEX_DIR --query "height of K2" [--query ...] [--topk 3]

Building streams the corpus (document text goes straight to disk in INDEX_DIR; only the postings
are held in memory), shows a progress bar and prints documents, vocabulary and size on disk.
Querying prints exactly the passage text a model sees between <information> and </information>.
"""

import argparse
import os
import shutil
import sys
import time

from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import base as base_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from llds_jax import corpus, retriever  # pylint: disable=g-import-not-at-top,wrong-import-position


def count_lines(path: str) -> int:
  """Newline count in 16 MiB blocks (a few seconds for wiki-18), for the progress bar's total."""
  n = 0
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
      n += block.count(b"\n")
  return n


def dir_size(path: str) -> int:
  return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def build(args):
  if not os.path.isfile(args.corpus):
    raise SystemExit(f"--corpus {args.corpus}: no such file")
  start = time.perf_counter()
  rows = tqdm(corpus.read_corpus(args.corpus), total=count_lines(args.corpus), unit=" docs",
              mininterval=1.0, disable=args.quiet)
  out = os.path.abspath(args.out)
  # Built beside its destination and renamed into place: a failed (re)build never touches a
  # working index at --out, and leaves nothing there that looks like an index.
  tmp = f"{out}.building-{os.getpid()}"
  try:
    index = retriever.BM25Index.build(rows, variant=args.variant, k1=args.k1, b=args.b,
                                      epsilon=args.epsilon, store_dir=tmp,
                                      memory_mb=args.build_memory_mb)
  except BaseException as e:
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(e, ValueError):  # bad corpus rows: the message names file and line
      raise SystemExit(f"build_index: {e}") from None
    raise
  old = f"{out}.old-{os.getpid()}"
  if os.path.exists(out):
    os.rename(out, old)
  os.rename(tmp, out)
  shutil.rmtree(old, ignore_errors=True)
  meta = index.meta
  print(f"index     {os.path.abspath(args.out)}")
  print(f"variant   {meta['variant']} (k1={meta['k1']}, b={meta['b']}"
        + (f", epsilon={meta['epsilon']})" if meta["variant"] == "okapi" else ")"))
  print(f"documents {meta['num_docs']:,} (avg {meta['avgdl']:.1f} tokens)")
  print(f"vocabulary {meta['num_terms']:,} terms, {meta['num_postings']:,} postings")
  print(f"size      {dir_size(args.out) / 2**20:.1f} MiB on disk")
  print(f"time      {time.perf_counter() - start:.1f} s")


def query(args):
  index = retriever.BM25Index.load(args.index)
  for q, docs in zip(args.query, index.retrieve(args.query, args.topk)):
    print(f"=== query: {q!r}   tokens: {retriever.tokenize(q)}")
    print("    hits: " + ", ".join(f"{d.index} (id {d.id}, {d.score:.3f})" for d in docs))
    print(retriever.format_observation(docs), end="")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--corpus", help="Search-R1 corpus jsonl to index")
  parser.add_argument("--out", help="index directory to write")
  parser.add_argument("--variant", choices=("okapi", "lucene"), default="okapi",
                      help="okapi = rank_bm25.BM25Okapi scores; lucene = Lucene/Pyserini BM25")
  parser.add_argument("--k1", type=float, default=None, help="default 1.5 (okapi) / 0.9 (lucene)")
  parser.add_argument("--b", type=float, default=None, help="default 0.75 (okapi) / 0.4 (lucene)")
  parser.add_argument("--epsilon", type=float, default=0.25, help="okapi idf floor factor")
  parser.add_argument("--build_memory_mb", type=float,
                      default=base_config.get_config().retriever.build_memory_mb,
                      help="build memory limit in MiB (config.retriever.build_memory_mb; default "
                           "%(default)g): batch sizes fit it, and a corpus that cannot fails")
  parser.add_argument("--index", help="index directory to query")
  parser.add_argument("--query", action="append", help="query text (repeatable)")
  parser.add_argument("--topk", type=int, default=3, help="passages per query")
  parser.add_argument("--quiet", action="store_true", help="no progress bar")
  args = parser.parse_args()
  if args.query:
    if not args.index:
      parser.error("--query needs --index")
    query(args)
  elif args.corpus and args.out:
    build(args)
  else:
    parser.error("give --corpus and --out to build, or --index and --query to search")


if __name__ == "__main__":
  main()
