"""Exact block-max pruning for BM25 top-k: a query reads only the doc ranges that can still win.

Dims: N documents, J doc blocks of `block_docs` consecutive docs, U "blocked" sparse terms (their
sparse df ≥ min_df), D dense-row terms, S blocks scored in one round, k results per query.

Idea (block-max pruning over document ranges, as in Ding & Suel's block-max indexes and Lucene's
impacts, but over fixed doc-id ranges so it vectorizes in numpy): per term and block j keep the
largest impact of the term in j. A query's upper bound for block j is Σ_terms count · max_j; blocks
are scored exactly in decreasing bound order, and the search stops once the next bound is below the
current k-th score. Every doc not scored lies in a block whose bound is below the k-th score, so it
cannot enter the top k (nor tie with it), and the top k equals the exhaustive one, ties included.

Exactness in floating point: the bound of block j adds the per-term maxima in the same order, with
the same float64 operations, as the exact scorer adds a doc's impacts (sparse terms in ascending id,
then dense rows in id order; see BM25Index._dense). Rounding is monotone, so each bound is ≥ the
computed score of every doc in its block; a 1e-12 relative margin is kept on top as insurance.
Scored docs get the exhaustive scorer's exact bits: same numbers, same order of additions.

Terms with sparse df < min_df keep no block table: their few postings are read whole per query and
their per-block maxima are taken on the fly.
"""

import dataclasses
import os

import numpy as np

BLOCK_DOCS = 1024  # docs per block: ~N/1024 bounds per blocked term; tighter bounds vs bound cost
MIN_DF = 256  # terms rarer than max(MIN_DF, J) are read whole: cheaper than a J-row of bounds
FIRST_ROUND = 8  # blocks scored in the first round; each later round scores up to twice as many
_MARGIN = 1e-12  # relative slack on the bounds (the bound is exact already; see module docstring)
_FILES = ("terms_U", "ptr_UxJ1", "max_UxJ", "dense_max_DxJ")


@dataclasses.dataclass
class BlockMax:
  """Per-block impact maxima of an index's common terms (and of its dense rows)."""
  block_docs: int
  min_df: int
  terms_U: np.ndarray  # int32 sorted ids of the blocked sparse terms
  ptr_UxJ1: np.ndarray  # int32: offset in the term's postings of its first doc ≥ j·block_docs
  max_UxJ: np.ndarray  # float32: the term's largest impact in block j (0 where absent)
  dense_max_DxJ: np.ndarray  # float32: each dense row's largest value in block j

  @classmethod
  def compute(cls, index, block_docs: int = BLOCK_DOCS, min_df: int | None = None) -> "BlockMax":
    if block_docs < 1:
      raise ValueError(f"block_docs must be ≥ 1, got {block_docs}")
    n = index.num_docs
    n_blocks = -(-n // block_docs)
    min_df = max(MIN_DF, n_blocks) if min_df is None else int(min_df)
    df_V = np.diff(np.asarray(index.indptr_V1))
    terms_U = np.flatnonzero(df_V >= max(1, min_df)).astype(np.int32)
    edges_J1 = np.arange(n_blocks + 1, dtype=np.int64) * block_docs
    ptr_UxJ1 = np.zeros((len(terms_U), n_blocks + 1), np.int32)
    max_UxJ = np.zeros((len(terms_U), n_blocks), np.float32)
    for u, t in enumerate(terms_U):
      lo, hi = int(index.indptr_V1[t]), int(index.indptr_V1[t + 1])
      ptr_UxJ1[u] = np.searchsorted(index.docs_P[lo:hi], edges_J1)
      max_UxJ[u] = _segment_max(np.asarray(index.weights_P[lo:hi]), ptr_UxJ1[u])
    dense_DxN = np.asarray(index.dense_DxN)
    dense_max_DxJ = (np.maximum.reduceat(dense_DxN, edges_J1[:-1], axis=1) if len(dense_DxN)
                     else np.zeros((0, n_blocks), np.float32))
    return cls(block_docs, min_df, terms_U, ptr_UxJ1, max_UxJ, dense_max_DxJ)

  def save(self, out_dir: str) -> dict:
    """Writes blockmax_*.npy into out_dir; returns the meta.json fields that describe them."""
    for name in _FILES:
      np.save(os.path.join(out_dir, f"blockmax_{name}.npy"), getattr(self, name))
    return {"block_docs": self.block_docs, "block_min_df": self.min_df}

  @classmethod
  def load(cls, index_dir: str, meta: dict, mmap: bool = True) -> "BlockMax | None":
    """The saved tables, or None for an index saved without them (then they are recomputed)."""
    paths = [os.path.join(index_dir, f"blockmax_{name}.npy") for name in _FILES]
    if "block_docs" not in meta or not all(map(os.path.exists, paths)):
      return None
    arrays = [np.load(p, mmap_mode="r" if mmap else None) for p in paths]
    return cls(int(meta["block_docs"]), int(meta["block_min_df"]), *arrays)


def _segment_max(w_P: np.ndarray, ptr_J1: np.ndarray) -> np.ndarray:
  """Max of w over each segment [ptr[j], ptr[j+1]); 0 for empty segments."""
  out_J = np.zeros(len(ptr_J1) - 1, np.float32)
  nonempty = ptr_J1[1:] > ptr_J1[:-1]
  if nonempty.any():
    out_J[nonempty] = np.maximum.reduceat(w_P, ptr_J1[:-1][nonempty])
  return out_J


def _ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
  """Concatenation of arange(s, s + l) over the pairs, vectorized."""
  ends = np.cumsum(lens)
  return np.repeat(starts - (ends - lens), lens) + np.arange(ends[-1] if len(ends) else 0)


def search_one(index, bm: BlockMax, terms: list[tuple[int, int]], k: int):
  """Exact top-k (doc ids, float64 scores) of one query's sorted (term id, count) pairs."""
  n, bd = index.num_docs, bm.block_docs
  n_blocks = bm.max_UxJ.shape[1] if bm.max_UxJ.ndim == 2 else -(-n // bd)
  ub_J = np.zeros(n_blocks)
  sparse, dense = [], []  # in ascending term id: the exact scorer's order of additions
  for t, count in terms:
    if t in index._dense_row:  # pylint: disable=protected-access
      dense.append((index._dense_row[t], count))  # pylint: disable=protected-access
      continue
    lo, hi = int(index.indptr_V1[t]), int(index.indptr_V1[t + 1])
    u = int(np.searchsorted(bm.terms_U, t))
    if u < len(bm.terms_U) and bm.terms_U[u] == t:
      m = bm.max_UxJ[u]
      ub_J += m if count == 1 else m * np.float64(count)
      sparse.append((lo, bm.ptr_UxJ1[u], count, None, None))
    elif hi > lo:
      docs, w = index.docs_P[lo:hi], index.weights_P[lo:hi]
      w = w if count == 1 else w * np.float64(count)
      blk = docs // bd
      starts = np.flatnonzero(np.r_[True, blk[1:] != blk[:-1]])
      ub_J[blk[starts]] += np.maximum.reduceat(w, starts)
      sparse.append((lo, None, count, docs, w))
  for r, count in dense:
    m = bm.dense_max_DxJ[r]
    ub_J += m if count == 1 else m * np.float64(count)
  ub_J += np.abs(ub_J) * _MARGIN

  order_J = np.argsort(-ub_J, kind="stable")
  neg_ub_J = -ub_J[order_J]  # ascending, for searchsorted
  top_ids, top_s = np.zeros(0, np.int64), np.zeros(0)
  theta, done, batch = -np.inf, 0, FIRST_ROUND
  while done < n_blocks and -neg_ub_J[done] >= theta:
    end = min(n_blocks, done + batch, int(np.searchsorted(neg_ub_J, -theta, "right")))
    ids, s = _score_blocks(index, bd, np.sort(order_J[done:end]), sparse, dense)
    top_ids, top_s = _merge(np.concatenate([top_ids, ids]), np.concatenate([top_s, s]), k)
    if len(top_s) == k:
      theta = top_s[-1]
    done, batch = end, batch * 2
  return top_ids, top_s


def _score_blocks(index, bd: int, blocks_S: np.ndarray, sparse, dense):
  """Exact scores of every doc in the (sorted) blocks: doc ids and float64 scores."""
  n = index.num_docs
  slot_J = np.full(-(-n // bd), -1, np.int64)
  slot_J[blocks_S] = np.arange(len(blocks_S))
  starts_S = blocks_S.astype(np.int64) * bd
  lens_S = np.minimum(bd, n - starts_S)
  off_S = np.cumsum(lens_S) - lens_S
  docs_parts, w_parts = [np.zeros(0, np.int64)], [np.zeros(0)]
  for lo, ptr_J1, count, docs, w in sparse:
    if ptr_J1 is not None:  # blocked term: only its postings inside the chosen blocks
      a_S = ptr_J1[blocks_S].astype(np.int64)
      idx = lo + _ranges(a_S, ptr_J1[blocks_S + 1] - a_S)
      docs, w = index.docs_P[idx], index.weights_P[idx]
      w = w if count == 1 else w * np.float64(count)
    else:
      keep = slot_J[docs // bd] >= 0
      docs, w = docs[keep], w[keep]
    docs_parts.append(docs.astype(np.int64))
    w_parts.append(w)
  docs = np.concatenate(docs_parts)
  slot = slot_J[docs // bd]
  local = off_S[slot] + (docs - starts_S[slot])
  total = int(lens_S.sum())
  # (bincount returns int64 for no postings at all: a dense-rows-only query)
  s = np.bincount(local, np.concatenate(w_parts), minlength=total).astype(np.float64, copy=False)
  cand = _ranges(starts_S, lens_S)
  for r, count in dense:
    w = index.dense_DxN[r, cand]
    s += w if count == 1 else w * np.float64(count)
  return cand, s


def _merge(ids: np.ndarray, scores: np.ndarray, k: int):
  """Best k of (ids, scores), best first; ties → lower doc index."""
  if len(scores) > k:
    keep = scores >= np.partition(scores, len(scores) - k)[len(scores) - k]
    ids, scores = ids[keep], scores[keep]
  order = np.lexsort((ids, -scores))[:k]
  return ids[order], scores[order]
