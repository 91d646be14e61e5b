"""Inverted-index construction: tokenized documents → term-major CSR postings (term, doc, tf).

Dims: V vocabulary terms, P postings (distinct (term, doc) pairs). Scoring lives in retriever.py;
this module only counts, so it is independent of the BM25 variant.
"""

import array
import os
from collections.abc import Callable, Sequence

import numpy as np

FLUSH_TOKENS = 1 << 22  # build: pending tokens folded into (term, doc, tf) triplets in chunks


class PostingsBuilder:
  """Accumulates tokenized docs into term-major postings (doc ids ascending within a term).

  Every FLUSH_TOKENS tokens the pending docs become one (term, doc, tf) chunk, sorted term-major;
  with `spill_dir` chunks live on disk until `finish` places them, so peak memory is about the
  final arrays (≈ 8 bytes per posting) rather than several copies of them.
  """

  def __init__(self, spill_dir: str | None = None):
    self.vocab: dict[str, int] = {}
    self.doc_lens = array.array("i")
    self._terms, self._first_doc, self._chunks = array.array("i"), 0, []
    self._df, self._spill_dir = np.zeros(0, np.int64), spill_dir

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
    if len(self._terms) >= FLUSH_TOKENS:
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
    self._chunks.append(chunk_3xP)
    self._terms, self._first_doc = array.array("i"), len(self.doc_lens)

  def finish(self, is_dense_V: Callable[[np.ndarray, int], np.ndarray]):
    """Places all chunks: CSR (indptr, docs, tf) for sparse terms, another for `is_dense_V` terms."""
    self._flush()
    df_V, n = self._df, len(self.doc_lens)
    dense_V = is_dense_V(df_V, n)
    dense_terms = np.flatnonzero(dense_V)
    out = {}
    for name, sel_V in (("sparse", ~dense_V), ("dense", dense_V)):
      indptr = np.concatenate([[0], np.cumsum(np.where(sel_V, df_V, 0))])
      out[name] = [indptr, np.empty(indptr[-1], np.int32), np.empty(indptr[-1], np.int32)]
    cursor_V = np.where(dense_V, out["dense"][0][:-1], out["sparse"][0][:-1])  # next free slot
    for chunk_3xP in self._chunks:
      if isinstance(chunk_3xP, str):
        path, chunk_3xP = chunk_3xP, np.load(chunk_3xP)
        os.remove(path)
      t_P, d_P, f_P = chunk_3xP
      counts_V = np.bincount(t_P, minlength=len(df_V))
      rank_P = np.arange(len(t_P)) - (np.cumsum(counts_V) - counts_V)[t_P]  # position in its run
      pos_P = cursor_V[t_P] + rank_P
      cursor_V += counts_V
      for name, sel_P in (("sparse", ~dense_V[t_P]), ("dense", dense_V[t_P])):
        out[name][1][pos_P[sel_P]] = d_P[sel_P]
        out[name][2][pos_P[sel_P]] = f_P[sel_P]
    doc_lens = np.frombuffer(self.doc_lens, np.int32).copy()
    return df_V, doc_lens, out["sparse"], dense_terms, out["dense"]
