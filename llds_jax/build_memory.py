"""Bounded index-build memory (`config.retriever.build_memory_mb`): batch sizes from a limit, and
the check that the parts no batch size can shrink fit under it.

Dims: N documents, V vocabulary terms, D dense-row terms (df ≥ N/2).

A build (retriever.BM25Index.build, tools/build_index.py) holds two kinds of memory:
  * per item, growing with the corpus: the vocabulary dict and the per-term arrays (df, idf, the
    encoder's per-term offsets), per document its length and length norm (and the corpus reader's
    duplicate-id dict), the D × N float32 dense rows, and, for a build without a directory to
    spill to, the (term, doc, tf) chunks themselves;
  * batch temporaries: the pending tokens sorted into one (term, doc, tf) chunk every
    `flush_tokens` tokens (postings.PostingsBuilder), and one range of `range_postings` postings
    merged, scored and encoded at a time (retriever.BM25Index._from_builder).
A limit gives the batches at most TEMP_SHARE of it (never more than the unlimited defaults), and
`check` fails the build, naming the field, once the per-item estimate plus the batches pass the
limit: at every chunk of the scan and again when N, V and D are known, before the dense rows are
allocated. The per-byte figures are tracemalloc peaks measured on 20k passages of the
`bench/retriever.py` corpus (flush: 50 B per pending token; scoring + encoding: 163 B per
posting of a range), rounded up.
"""

import ctypes
import ctypes.util
import dataclasses

TEMP_SHARE = 0.25  # of the limit, for one batch's temporaries
BYTES_PER_TOKEN = 64  # a flush: pending int32 ids, int64 keys, the sort, the chunk (measured 50)
BYTES_PER_POSTING = 192  # a range: its slices, merge, impacts, encoder temporaries (measured 163)
# Per document: its length (and a copy), the float64 length norm, and corpus.read_corpus's
# duplicate-id dict (id str + line int + slot: ~120 B; measured: the scan of 2M passages grew
# ~330 MiB with 2 MiB batches).
BYTES_PER_DOC = 160
BYTES_PER_TERM = 320  # dict entry + str + int, df/idf and their temporaries, encoder per-term arrays
BYTES_PER_CHUNK_POSTING = 12  # an in-memory (term, doc, tf) chunk, without a spill directory
BASE_BYTES = 96 << 20  # the interpreter with numpy and the build's modules
MIN_BATCH = 1 << 10  # the smallest flush / range, so a tiny limit still makes progress


@dataclasses.dataclass(frozen=True)
class BuildBudget:
  """Batch sizes and the memory check for one build; `limit_mb=None` keeps the default sizes.

  The defaults are the owning modules' (`postings.FLUSH_TOKENS`, `block_postings.CHUNK`):
  `retriever.build_budget` passes them.
  """
  limit_mb: float | None
  default_flush_tokens: int
  default_range_postings: int

  def __post_init__(self):
    if self.limit_mb is not None and not self.limit_mb > 0:
      raise ValueError(f"retriever.build_memory_mb must be > 0 (or None for no limit), got "
                       f"{self.limit_mb!r}")

  def _temp_bytes(self) -> float:
    return TEMP_SHARE * self.limit_mb * 2**20

  @property
  def flush_tokens(self) -> int:
    if self.limit_mb is None:
      return self.default_flush_tokens
    return max(MIN_BATCH, min(self.default_flush_tokens, int(self._temp_bytes() / BYTES_PER_TOKEN)))

  @property
  def range_postings(self) -> int:
    if self.limit_mb is None:
      return self.default_range_postings
    return max(MIN_BATCH, min(self.default_range_postings,
                              int(self._temp_bytes() / BYTES_PER_POSTING)))

  def estimate_bytes(self, n_docs: int, n_terms: int, n_dense: int = 0, chunk_postings: int = 0,
                     largest_term: int = 0) -> int:
    """Peak estimate: per-item memory plus the larger batch. A sparse term is encoded whole, so a
    range is at least its `largest_term` postings (dense-row terms come in pieces)."""
    per_item = (BASE_BYTES + n_docs * (BYTES_PER_DOC + 4 * n_dense) + n_terms * BYTES_PER_TERM
                + chunk_postings * BYTES_PER_CHUNK_POSTING)
    batch = max(self.flush_tokens * BYTES_PER_TOKEN,
                max(self.range_postings, largest_term) * BYTES_PER_POSTING)
    return per_item + batch

  def check(self, n_docs: int, n_terms: int, n_dense: int = 0, chunk_postings: int = 0,
            largest_term: int = 0):
    """Raises ValueError naming the field when the estimate passes the limit."""
    if self.limit_mb is None:
      return
    need = self.estimate_bytes(n_docs, n_terms, n_dense, chunk_postings, largest_term)
    if need > self.limit_mb * 2**20:
      dense = f" ({n_dense} dense rows)" if n_dense else ""
      largest = f", the largest term's {largest_term:,} postings" if largest_term else ""
      raise ValueError(
          f"retriever.build_memory_mb={self.limit_mb:g} is too small: indexing {n_docs:,} documents "
          f"with {n_terms:,} terms{dense} needs about {need / 2**20:,.1f} MiB (per document "
          f"{BYTES_PER_DOC + 4 * n_dense} B, per term {BYTES_PER_TERM} B, plus batches{largest} "
          "and the interpreter); raise the limit")


_libc = []  # [the C library] once looked up; [None] where there is no malloc_trim


def release_freed_memory():
  """Hands freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere).

  glibc raises its mmap threshold each time a large block is freed, so later batch arrays come
  from the heap, and freed heap stays resident: without this a 2M-passage build at a 512 MiB limit
  grew to ~600 MiB while its live arrays stayed far smaller. Called after every flush and range.
  """
  if not _libc:
    name = ctypes.util.find_library("c")
    try:
      lib = ctypes.CDLL(name) if name else None
      _libc.append(lib if lib is not None and hasattr(lib, "malloc_trim") else None)
    except OSError:
      _libc.append(None)
  if _libc[0] is not None:
    _libc[0].malloc_trim(0)
