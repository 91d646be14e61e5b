"""Inverted-index construction: tokenized documents → term-major postings (term, doc, tf) by ranges.

Dims: V vocabulary terms, P postings (distinct (term, doc) pairs). Scoring lives in retriever.py;
this module only counts, so it is independent of the BM25 variant.
"""

import array
import os
from collections.abc import Sequence

import numpy as np

from llds_jax import build_memory

FLUSH_TOKENS = 1 << 22  # build: pending tokens folded into (term, doc, tf) triplets in chunks


class PostingsBuilder:
  """Accumulates tokenized docs into term-major postings (doc ids ascending within a term).

  Every FLUSH_TOKENS tokens the pending docs become one (term, doc, tf) chunk, sorted term-major;
  with `spill_dir` chunks live on disk, and `term_ranges` merges them a range of terms at a time,
  so no array of all postings is ever held in memory.
  """

  def __init__(self, spill_dir: str | None = None, budget=None):
    """`budget` (build_memory.BuildBudget) sets the flush size and is checked at every flush."""
    self.vocab: dict[str, int] = {}
    self.doc_lens = array.array("i")
    self._terms, self._first_doc, self._chunks = array.array("i"), 0, []
    self._df, self._spill_dir = np.zeros(0, np.int64), spill_dir
    self.budget = budget
    self._flush_tokens = FLUSH_TOKENS if budget is None else budget.flush_tokens
    self.chunk_postings = 0  # postings of the chunks held in memory (no spill_dir)

  def add(self, tokens: Sequence[str]):
    before = len(self._terms)
    try:  # fast path: every token already known (C-level lookups)
      self._terms.extend(map(self.vocab.__getitem__, tokens))
    except KeyError:
      del self._terms[before:]
      for t in tokens:
        self.vocab.setdefault(t, len(self.vocab))
      self._terms.extend(map(self.vocab.__getitem__, tokens))
    self.doc_lens.append(len(tokens))
    if len(self._terms) >= self._flush_tokens:
      self._flush()

  def _flush(self):
    lens = np.frombuffer(self.doc_lens, np.int32)[self._first_doc:]
    docs = np.repeat(np.arange(self._first_doc, len(self.doc_lens), dtype=np.int64), lens)
    key, tf = np.unique((np.frombuffer(self._terms, np.int32).astype(np.int64) << 32) | docs,
                        return_counts=True)
    chunk_3xP = np.stack([key >> 32, key & 0xFFFFFFFF, tf]).astype(np.int32)
    counts = np.bincount(chunk_3xP[0], minlength=len(self.vocab))
    self._df = np.concatenate([self._df, np.zeros(len(counts) - len(self._df), np.int64)]) + counts
    if self._spill_dir is not None:
      path = os.path.join(self._spill_dir, f"_build_chunk{len(self._chunks)}.npy")
      np.save(path, chunk_3xP)
      chunk_3xP = path
    else:
      self.chunk_postings += chunk_3xP.shape[1]
    self._chunks.append(chunk_3xP)
    self._terms, self._first_doc = array.array("i"), len(self.doc_lens)
    if self.budget is not None:  # fail as soon as the corpus outgrows the limit, not at the end
      self.budget.check(len(self.doc_lens), len(self.vocab), chunk_postings=self.chunk_postings)
      if self.budget.limit_mb is not None:
        build_memory.release_freed_memory()

  def finish(self) -> tuple[np.ndarray, np.ndarray]:
    """Flushes pending docs; returns (df_V, doc_lens_N). Postings then come from `term_ranges`."""
    self._flush()
    return self._df, np.frombuffer(self.doc_lens, np.int32).copy()

  def term_ranges(self, max_postings: int, splittable: np.ndarray | None = None):
    """Yields (t_lo, t_hi, df_T, docs, tf, first): the postings of terms t_lo..t_hi−1, term-major
    with doc ids ascending, about `max_postings` at a time (a larger term comes alone).

    A k-way merge of the term-sorted chunks: each range takes its slice of every chunk (spilled
    chunks are read by slices), so memory stays O(max_postings) whatever the corpus size. A lone
    term with more postings than `splittable[t]` allows (the dense-row terms, whose postings only
    fill their row) comes in pieces of whole chunks' slices, doc ids still ascending from piece to
    piece: df_T is then the piece's count, and `first` is False for every piece after the first.
    """
    df_V = self._df
    cum = np.cumsum(df_V)
    cuts = np.searchsorted(cum, np.arange(max_postings, cum[-1] if len(cum) else 0, max_postings))
    bounds = np.unique(np.r_[0, cuts + 1, len(df_V)].clip(0, len(df_V)))
    # Each chunk's slice of every range, from one sequential read of its term row. Spilled chunks
    # are then read slice by slice with plain file reads, not memory-mapped: mapped pages would
    # count in the build's resident memory.
    chunks = []
    for c in self._chunks:
      if isinstance(c, str):
        header = np.load(c, mmap_mode="r")
        offset, n = header.offset, header.shape[1]
        del header
        terms = np.fromfile(c, np.int32, count=n, offset=offset)
        chunks.append((c, offset, n, np.searchsorted(terms, bounds)))
        del terms
      else:
        chunks.append((c, 0, c.shape[1], np.searchsorted(c[0], bounds)))
    for i, (t_lo, t_hi) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
      slices = [(c, offset, n, int(pos[i]), int(pos[i + 1])) for c, offset, n, pos in chunks
                if pos[i + 1] > pos[i]]
      groups = [slices]
      if (t_hi - t_lo == 1 and df_V[t_lo] > max_postings and splittable is not None
          and splittable[t_lo]):
        groups, size = [[]], 0
        for sl in slices:
          if groups[-1] and size + sl[4] - sl[3] > max_postings:
            groups.append([])
            size = 0
          groups[-1].append(sl)
          size += sl[4] - sl[3]
      for j, group in enumerate(groups):
        parts = []
        for c, offset, n, lo, hi in group:
          if isinstance(c, str):
            parts.append(np.stack([np.fromfile(c, np.int32, count=hi - lo,
                                               offset=offset + 4 * (r * n + lo)) for r in range(3)]))
          else:
            parts.append(c[:, lo:hi])
        t_P, d_P, f_P = np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), np.int32)
        del parts
        order = np.argsort(t_P, kind="stable")  # chunks are in doc order: docs stay ascending
        df_T = df_V[t_lo:t_hi] if len(groups) == 1 else np.array([len(t_P)])
        yield t_lo, t_hi, df_T, d_P[order], f_P[order], j == 0

  def cleanup(self):
    """Removes spilled chunks."""
    for c in self._chunks:
      if isinstance(c, str) and os.path.exists(c):
        os.remove(c)
    self._chunks = []
