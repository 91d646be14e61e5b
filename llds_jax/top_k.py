"""Exact top-k selection for the exhaustive search paths (retriever.BM25Index.search).

Dims: C queries, N documents, k results per query. Ties go to the lower document index.
"""

import numpy as np


def of_hits(ids: np.ndarray, scores: np.ndarray, n_docs: int, k: int):
  """Top-k of one row given its hit docs' scores; other docs score 0; ties → lower doc index."""
  nonzero = scores != 0
  ids, scores = ids[nonzero], scores[nonzero]
  if np.count_nonzero(scores > 0) < k:  # zero-score docs, lowest index first, reach the top k
    cand = np.arange(min(n_docs, k + len(ids)))
    zero_ids = cand[~np.isin(cand, ids)][:k]
    ids, scores = np.concatenate([ids, zero_ids]), np.concatenate([scores, np.zeros(len(zero_ids))])
  if len(scores) > k:  # partial sort: only candidates at or above the k-th score are ordered
    keep = scores >= np.partition(scores, len(scores) - k)[len(scores) - k]
    ids, scores = ids[keep], scores[keep]
  order = np.lexsort((ids, -scores))[:k]
  return ids[order], scores[order]


def dense_rows(s_CxN: np.ndarray, k: int):
  """Row-wise top-k of dense scores, best first; ties → lower doc index.

  A strided subsample's k-th largest value t is ≤ the row's k-th largest, so every top-k entry is
  among the entries ≥ t: one compare pass plus a small sort instead of a full partial sort.
  """
  c, n = s_CxN.shape
  stride = max(1, int(n / (4 * np.sqrt(k * n))))
  sub_Cxm = s_CxN[:, ::stride]
  m = sub_Cxm.shape[1]
  t_C = np.partition(sub_Cxm, m - k, axis=1)[:, m - k]
  rows, cols = np.divmod(np.flatnonzero(s_CxN >= t_C[:, None]), n)
  vals = s_CxN[rows, cols]
  order = np.lexsort((cols, -vals, rows))
  first_C = np.searchsorted(rows[order], np.arange(c))
  take_Cxk = order[first_C[:, None] + np.arange(k)]
  return cols[take_Cxk], vals[take_Cxk]
