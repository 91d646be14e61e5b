"""The Lucene side of `bench/retriever.py --lucene`: runs in the Pyserini interpreter, never in ours.

  $LLDS_LUCENE_PYTHON bench/lucene_worker.py index --input DIR --index OUT [--pretokenized]
  $LLDS_LUCENE_PYTHON bench/lucene_worker.py search --index OUT --queries Q.json --out HITS.json
      [--k 10 --k1 0.9 --b 0.4] [--pretokenized]

It imports only `pyserini.pyclass` (pyjnius + the Anserini fat jar in Pyserini's wheel) and calls
the Java classes that Pyserini's own `python -m pyserini.index.lucene` (io.anserini.index.
IndexCollection) and `LuceneSearcher` (io.anserini.search.SimpleSearcher) wrap, so Pyserini's
heavy optional imports (torch, transformers) are not needed. This file must not import llds_jax or
numpy: the interpreter is a bare venv with pyserini and pyjnius. JAVA_HOME is set by the caller.
"""

import argparse
import json
import resource
import sys


def cpu_s() -> float:
  """CPU seconds of this whole process: the JVM's search and GC threads included."""
  use = resource.getrusage(resource.RUSAGE_SELF)
  return use.ru_utime + use.ru_stime


def index(args):
  from pyserini.pyclass import autoclass  # pylint: disable=g-import-not-at-top
  argv = ["-collection", "JsonCollection", "-generator", "DefaultLuceneDocumentGenerator",
          "-input", args.input, "-index", args.index, "-threads", "1", "-storeRaw"]
  if args.pretokenized:
    argv.append("-pretokenized")  # WhitespaceAnalyzer: our tokens go in unchanged
  autoclass("io.anserini.index.IndexCollection").main(argv)


def search(args):
  """Top-k of every query through Lucene's own IndexSearcher, timed in CPU seconds.

  Not SimpleSearcher.search: Anserini rounds its returned scores to 4 decimals, which would hide
  float32-level differences and reorder ties. The query is Anserini's bag of words (what
  SimpleSearcher builds; a repeated term is one clause boosted by its count), scored by Lucene's
  BM25Similarity; ties go to the lower Lucene doc id = indexing order with one indexing thread.
  """
  from pyserini.pyclass import autoclass, cast, JPaths  # pylint: disable=g-import-not-at-top
  reader = autoclass("org.apache.lucene.index.DirectoryReader").open(
      autoclass("org.apache.lucene.store.FSDirectory").open(JPaths.get(args.index)))
  # The cast picks IndexSearcher(IndexReader) among its overloaded constructors.
  searcher = autoclass("org.apache.lucene.search.IndexSearcher")(
      cast("org.apache.lucene.index.IndexReader", reader))
  searcher.setSimilarity(autoclass("org.apache.lucene.search.similarities.BM25Similarity")(args.k1, args.b))
  if args.pretokenized:  # our tokens, split on spaces only (pyserini's pretokenized searcher)
    analyzer = autoclass("org.apache.lucene.analysis.core.WhitespaceAnalyzer")()
  else:  # Anserini's default: Porter stemming, English stopwords (Search-R1's wiki-18 index)
    analyzer = autoclass("io.anserini.analysis.DefaultEnglishAnalyzer").newDefaultInstance()
  generator = autoclass("io.anserini.search.query.BagOfWordsQueryGenerator")()
  with open(args.queries, encoding="utf-8") as f:
    queries = json.load(f)

  def run(qs):
    return [searcher.search(generator.buildQuery("contents", analyzer, q), args.k) for q in qs]

  run(queries)  # steady state: JIT-compiled, index paged in (ours warms up the same way)
  start = cpu_s()
  tops = run(queries)
  elapsed = cpu_s() - start
  fields = reader.storedFields()
  hits = [[[fields.document(d.doc).get("id"), float(d.score)] for d in top.scoreDocs] for top in tops]
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump({"cpu_s": elapsed, "hits": hits}, f)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="cmd", required=True)
  p = sub.add_parser("index")
  p.add_argument("--input", required=True, help="directory holding one Search-R1 jsonl")
  p.add_argument("--index", required=True)
  p.add_argument("--pretokenized", action="store_true")
  p = sub.add_parser("search")
  p.add_argument("--index", required=True)
  p.add_argument("--queries", required=True, help="json list of query strings")
  p.add_argument("--out", required=True)
  p.add_argument("--k", type=int, default=10)
  p.add_argument("--k1", type=float, default=0.9)
  p.add_argument("--b", type=float, default=0.4)
  p.add_argument("--pretokenized", action="store_true")
  args = parser.parse_args()
  {"index": index, "search": search}[args.cmd](args)
  sys.stdout.flush()


if __name__ == "__main__":
  main()
