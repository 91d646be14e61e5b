"""Per-host search pool: one turn's queries split across worker processes over one mapped index.

Every worker opens the same saved index with `BM25Index.load(dir)` (memory-mapped), so the host's
page cache holds one copy of the postings whatever the number of workers; only the vocabulary dict
is per process. Workers are spawned, not forked: the trainer process runs JAX's threads, and a fork
would copy them half-way through. Processes rather than threads because a query is many small numpy
calls whose Python overhead holds the GIL (bench/retriever.py --pool measures both).

The pool offers the index's query interface (`search`, `retrieve`, `retrieve_text`), so the rollout
uses it unchanged. A turn's queries are cut into one contiguous chunk per worker, in order, so the
results are exactly the single-process ones.
"""

import concurrent.futures
import multiprocessing
import os
import time
from collections.abc import Sequence

from llds_jax import corpus, retriever

_INDEX = None  # the worker's own BM25Index


def _open(index_dir: str):
  global _INDEX  # pylint: disable=global-statement
  _INDEX = retriever.BM25Index.load(index_dir)


def _call(method: str, queries, k: int):
  start = time.process_time()
  out = getattr(_INDEX, method)(queries, k)
  return out, time.process_time() - start


class SearchPool:
  """`workers` processes searching a saved index directory; same results as `BM25Index.load(dir)`."""

  def __init__(self, index_dir: str, workers: int):
    if workers < 1:
      raise ValueError(f"retriever.workers must be ≥ 1, got {workers}")
    if not os.path.isdir(index_dir):
      raise ValueError(f"a search pool needs a saved index directory (tools/build_index.py), got "
                       f"{index_dir!r}")
    self.index = retriever.BM25Index.load(index_dir)  # checks the index once, loud, in this process
    self.workers = workers
    self.cpu_s = 0.0  # CPU seconds the workers spent searching (q/CPU-s under a loaded host)
    self._pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_open,
        initargs=(index_dir,))

  def _map(self, method: str, queries: Sequence, k: int) -> list:
    if isinstance(queries, str):
      raise TypeError("expected a list of queries, got a single str")
    queries = list(queries)
    n = min(self.workers, len(queries))
    if n == 0:
      return []
    bounds = [len(queries) * i // n for i in range(n + 1)]
    futures = [self._pool.submit(_call, method, queries[lo:hi], k)
               for lo, hi in zip(bounds, bounds[1:])]
    results = [f.result() for f in futures]
    self.cpu_s += sum(cpu for _, cpu in results)
    return [hit for out, _ in results for hit in out]

  def search(self, queries, k: int = 3) -> list[list[tuple[int, float]]]:
    return self._map("search", queries, k)

  def retrieve(self, queries, k: int = 3) -> list[list[retriever.Doc]]:
    return self._map("retrieve", queries, k)

  def retrieve_text(self, queries: Sequence[str], k: int = 3) -> list[str]:
    return self._map("retrieve_text", queries, k)

  def close(self):
    self._pool.shutdown(wait=True, cancel_futures=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def load_retriever(path: str, workers: int = 1,
                   build_memory_mb: float | None = None) -> retriever.BM25Index | SearchPool:
  """The retriever a run searches: a saved index directory, or a corpus jsonl indexed in memory
  (small corpora only; `build_memory_mb`: config.retriever.build_memory_mb, a corpus that cannot
  be indexed under it fails); with `workers` > 1, a pool of that many processes over the saved
  index."""
  if workers > 1:
    return SearchPool(path, workers)
  if path.endswith(".jsonl"):
    return retriever.BM25Index.build(corpus.read_corpus(path), memory_mb=build_memory_mb)
  return retriever.BM25Index.load(path)
