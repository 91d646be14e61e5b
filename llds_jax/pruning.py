"""Exact MaxScore pruning for BM25 top-k: a query reads its common terms only at candidate docs.

Dims: V vocabulary terms, N documents, C candidate docs of one query, k results per query.

Idea (MaxScore, Turtle & Flood 1995; the essential/non-essential split of Lucene's
MaxScoreBulkScorer), vectorized per query in numpy. Every term has an upper bound
ub = count · (its largest impact). With θ ≤ the k-th best score, any set of terms whose bounds sum
below θ is "non-essential": a doc holding only those terms scores < θ, so it can neither enter the
top k nor tie with it. The set is filled greedily with the terms of most postings per unit of bound
(common words first). Candidates are the docs of the essential (rare) terms; the common terms
(dense rows included) are looked up at the candidates, largest bound first, dropping each candidate
whose partial sum plus the bounds still to come (per-block maxima) is below θ.

θ (pass 1): the exact k-th best score of any set of docs is ≤ the true k-th best; the set is the
REFINE·k docs of the highest-bound sparse terms with the best partial sums over those terms. Partial
sums are ≤ full scores, so the candidates' k-th best partial sum may raise θ again.

The survivors, a superset of the top k, get the exhaustive scorer's exact bits: the same impacts
added in the same order (sparse terms in ascending id, then dense rows in id order, see
BM25Index._dense) with the same float64 operations, a missing term adding an exact 0. Bound sums
and θ may differ from exact arithmetic by float64 rounding (~1e-16 relative); every comparison
with θ keeps a 1e-9 relative margin on the safe side.

`search_one` returns None where pruning cannot pay off or prove anything: a dense-row term is
essential, ≥ N/FALLBACK_FRACTION candidates, fewer than k hits, or negative impacts (okapi's idf
floor when the mean idf is negative). The caller then scores all N docs.
"""

import numpy as np

from llds_jax.block_postings import CACHE_MIN_DF as CACHED_DF

# ≥ N/2 candidates: the exhaustive dense path is cheaper than lookups. (At N/8, 19 of the 1,787
# FanOutQA questions at 2M passages gave up after the essential merge, the costly part, for a
# dense pass of 22 ms each; going on from there costs ~4 ms.)
FALLBACK_FRACTION = 2
MIN_WORK = 1 << 20  # exhaustive work (postings + N per dense row) below which pruning costs more
MIN_WORK_SPARSE = 1 << 17  # … unless the candidate path would need a dense O(N) pass anyway
# … or the index has ≥ LARGE_DOCS docs: there the exhaustive paths' sort of all postings or O(N)
# pass cost more than pruning from MIN_WORK_LARGE on (at 2M passages 32 FanOutQA questions of
# 51k–247k postings took 10.6 ms each on those paths, 2.2 ms pruned).
MIN_WORK_LARGE = 1 << 15
LARGE_DOCS = 1 << 19
REFINE = 8  # pass 1 scores exactly the REFINE·k docs with the best partial sums
PASS1_POSTINGS = 1 << 12  # pass 1 reads the highest-bound sparse terms up to this many postings
# (2^12, was 2^14: at 2M passages +2–6% in runs too noisy to say more; the refined θ after the
# essential merge does most of the tightening.)
_MARGIN = 1e-9
BLOCK_MAX = True  # per-candidate block-max bounds for the non-essential terms (else global bounds)
DENSE_RANGE = 128  # docs per range of a dense row's range-max bounds


def exhaustive_work(index, terms) -> int:
  """Numbers the exhaustive scorer adds for a query: its sparse postings plus N per dense row.

  Pruning costs ~30 numpy calls per query whatever N, so it pays only for large `index`es and
  common-word queries (measured in bench/retriever.py --scaling: 0.3× at 5k passages, 1× at 200k,
  1.5–1.7× at 1M).
  """
  return sum(index.num_docs if t in index._dense_row else _df(index, t)  # pylint: disable=protected-access
             for t, _ in terms)


def worth_pruning(index, terms, dense_fraction: int) -> bool:
  """Whether `search_one` should answer a query: from MIN_WORK numbers of exhaustive work, and
  from MIN_WORK_SPARSE where that work is ≥ N/dense_fraction postings, past which the candidate
  path (BM25Index._candidates_top_k) gives up for a dense O(N) pass anyway (at 1M passages that
  pass took 186 of the 1,787 FanOutQA questions), and on a large index from MIN_WORK_LARGE."""
  work = exhaustive_work(index, terms)
  return (work >= MIN_WORK or (work >= MIN_WORK_SPARSE and work * dense_fraction >= index.num_docs)
          or (work >= MIN_WORK_LARGE and index.num_docs >= LARGE_DOCS))


def _times(w: np.ndarray, count: int) -> np.ndarray:
  # Repeated query terms count once per repeat; the same operation as the exhaustive scorer's.
  return w if count == 1 else w * np.float64(count)


def score_docs(index, docs_C: np.ndarray, sparse, dense, memo=None) -> np.ndarray:
  """Exact float64 scores at docs: sparse (term, count) lookups, then dense (row, count)."""
  s_C = np.zeros(len(docs_C))
  for t, count in sparse:
    s_C += _times(_lookup(index, t, docs_C, memo), count)
  for r, count in dense:
    s_C += _times(index.dense_DxN[r].take(docs_C), count)
  return s_C


def _lookup(index, t: int, docs_C: np.ndarray, memo=None) -> np.ndarray:
  """Term t's impacts at docs (float32; an exact 0 where the doc lacks the term). A term
  this query has decoded whole (`memo`: term → (docs, impacts)) is searched there: a rarer term's
  own lookup would decode its blocks again, ~15 numpy calls, and a query looks each term up 3
  times (θ, refined θ, survivors)."""
  if memo is None or t not in memo or index.postings.gathers(t):
    return index.postings.lookup(t, docs_C)  # (a byte map or bitmap beats the binary search)
  docs, w = memo[t]
  if not len(docs):
    return np.zeros(len(docs_C), np.float32)
  pos_C = np.minimum(docs.searchsorted(docs_C), len(docs) - 1)
  return np.where(docs.take(pos_C) == docs_C, w.take(pos_C), np.float32(0))


def _block_bounds(index, key, docs_C: np.ndarray) -> np.ndarray:
  """Per doc, an upper bound on one term's impact: the max of the block that could hold the doc."""
  kind, t = key
  if kind == "s":
    first_B, max_B = index.postings.blocks(t)
    b_C = np.searchsorted(first_B, docs_C, "right") - 1
    return np.where(b_C >= 0, max_B[np.maximum(b_C, 0)], np.float32(0)).astype(np.float64)
  return index.dense_range_max(t)[docs_C // DENSE_RANGE].astype(np.float64)


def _df(index, t: int) -> int:
  return int(index.indptr_V1[t + 1] - index.indptr_V1[t])


def _merged_postings(index, terms, memo=None):
  """Union of the terms' postings with the sum of their count-scaled impacts per doc, as one or
  two runs of ascending docs (no caller needs one order); each term's decoded postings are kept
  in `memo`.

  When the largest term has a doc bitmap, only the other terms are merged by the sort, most of the
  merge's time; their sums are added into the largest term's postings at the docs they share (found
  through the bitmap), and their other docs follow as a second run. These per-doc sums may add in
  another order than the exhaustive scorer, so they only steer pruning, within its 1e-9 margin;
  exact scores come from score_docs.
  """
  docs, ws = [], []
  for t, count in terms:
    d, w = index.postings.term(t) if memo is None or t not in memo else memo[t]
    if memo is not None:
      memo[t] = d, w
    docs.append(d)
    ws.append(_times(w, count))
  big = max(range(len(docs)), key=lambda i: len(docs[i]))
  if len(docs) == 1 or len(docs[big]) < CACHED_DF or not index.postings.gathers(terms[big][0]):
    return _sorted_union(docs, ws)
  docs_big, w_big = docs.pop(big), ws.pop(big).astype(np.float64)  # (a copy: cached arrays stay)
  docs_rest, w_rest = _sorted_union(docs, ws)
  pos = index.postings.positions(terms[big][0], docs_rest)
  shared = pos >= 0
  w_big[pos[shared]] += w_rest[shared]  # (docs_rest is unique, so are the positions)
  np.logical_not(shared, out=shared)
  return np.concatenate([docs_big, docs_rest[shared]]), np.concatenate([w_big, w_rest[shared]])


def _sorted_union(docs, ws):
  """Sorted union of sorted doc runs with the per-doc sums of their weights (float64)."""
  if len(docs) == 1:
    return docs[0], ws[0].astype(np.float64)
  docs, ws = np.concatenate(docs), np.concatenate(ws, dtype=np.float64)
  order = np.argsort(docs, kind="stable")  # sorted runs: timsort merges them
  docs, ws = docs.take(order), ws.take(order)
  new = np.empty(len(docs), bool)
  new[:1] = True
  np.not_equal(docs[1:], docs[:-1], out=new[1:])
  # Per-doc sums in posting order: np.bincount adds like np.add.reduceat, at half its cost when
  # nearly every doc is its own segment. Segment ids count from 1, so slot 0 stays empty.
  return docs[new], np.bincount(new.cumsum(), ws)[1:]


def best_positions(v_C: np.ndarray, j: int) -> np.ndarray:
  """Sorted positions holding the j largest values (all positions if there are at most j); at
  most 4·j positions, a superset of the best j when values tie or the sample is flat.

  A strided subsample's r-th largest value t is at most the whole array's r-th largest, so the
  values ≥ t are about r·stride positions that include the best j: one compare pass instead of an
  argpartition of all values (measured at 27k values: 41 µs against 531 µs). A skewed sample that
  picks fewer than j falls back to the argpartition. Which docs are picked only changes how tight
  θ is, never the result.
  """
  n = len(v_C)
  if n <= j:
    return np.arange(n)
  stride = max(1, n // (16 * j))
  sub = v_C[::stride]
  r = min(len(sub), j // stride + 8)
  pick = np.flatnonzero(v_C >= np.partition(sub, len(sub) - r)[len(sub) - r])
  if len(pick) < j:
    return np.sort(np.argpartition(v_C, n - j)[-j:])
  if len(pick) > 4 * j:  # a flat sample: cut to the exact best j of the picked ones
    pick = np.sort(pick[np.argpartition(v_C[pick], len(pick) - j)[-j:]])
  return pick


def _kth_score(index, docs_C: np.ndarray, sparse, dense, memo, k: int) -> float:
  """The k-th best exact score among `docs_C`: a θ no true top-k score falls below."""
  return top_k(docs_C, score_docs(index, docs_C, sparse, dense, memo), k)[1][-1]


def top_k(ids_C: np.ndarray, s_C: np.ndarray, k: int):
  """Best k of (ids, scores), best first; ties → lower doc index."""
  if len(s_C) > k:
    keep = s_C >= np.partition(s_C, len(s_C) - k)[len(s_C) - k]
    ids_C, s_C = ids_C[keep], s_C[keep]
  order = np.lexsort((ids_C, -s_C))[:k]
  return ids_C[order].astype(np.int64), s_C[order]


def search_one(index, max_V: np.ndarray, terms: list[tuple[int, int]], k: int):
  """Exact top-k (doc ids, float64 scores) of one query's sorted (term id, count) pairs, or None
  when pruning cannot pay off (then the caller scores all N docs)."""
  dense_row = index._dense_row  # pylint: disable=protected-access
  sparse = [(t, c) for t, c in terms if t not in dense_row]
  dense = [(dense_row[t], c) for t, c in terms if t in dense_row]
  ub = {("s", t): float(max_V[t]) * c for t, c in sparse}
  ub.update({("d", r): float(index.dense_max_D[r]) * c for r, c in dense})
  by_ub = sorted(ub, key=ub.get, reverse=True)
  counts, dense_counts = dict(sparse), dict(dense)
  if not sparse or min(ub.values()) < 0:  # negative impacts (okapi's floor): no useful bound
    return None
  # Pass 1: a lower bound θ on the k-th best score from the docs of the highest-bound sparse terms
  # (≥ k postings, and more while they total ≤ PASS1_POSTINGS): those terms' partial sums (no
  # lookups) pick the REFINE·k most promising docs, whose exact k-th best score is θ. A θ close to
  # the true k-th score leaves more terms non-essential, so fewer candidates.
  first, n_first = [], 0
  for kind, t in by_ub:
    if kind == "s" and (n_first < k or n_first + _df(index, t) <= PASS1_POSTINGS):
      first.append((t, counts[t]))
      n_first += _df(index, t)
  memo = {}  # term → its decoded postings, for this query's lookups
  docs, part = _merged_postings(index, first, memo)
  if len(docs) < k or len(docs) * FALLBACK_FRACTION >= index.num_docs:
    return None
  best = best_positions(part, REFINE * k)
  theta = _kth_score(index, docs[best], sparse, dense, memo, k)
  # Pass 2: any set of terms whose bounds sum below θ may be non-essential, not only the smallest
  # bounds (with repeats and tf saturation, "the" often has the largest bound of a question). The
  # set is filled greedily by postings per unit of bound, so the essential terms, whose postings
  # are all read, are the rarest that θ allows.
  work = {key: index.num_docs if key[0] == "d" else _df(index, key[1]) for key in ub}
  essential, rest = [], []
  total = 0.0
  for key in sorted(ub, key=lambda key: work[key] / max(ub[key], 1e-30), reverse=True):
    if (total + ub[key]) * (1 + _MARGIN) < theta:
      total += ub[key]
      rest.append(key)
    else:
      essential.append(key)
  rest.sort(key=ub.get)  # the loop below adds them largest bound first
  if not essential:
    return None  # cannot happen with θ ≤ a real score; kept as a guard
  if not theta > 0 or any(kind == "d" for kind, _ in essential):
    return None  # nothing proven (fewer than k hits), or a dense-row term is essential
  cand, part_C = _merged_postings(index, [(t, counts[t]) for _, t in essential], memo)
  if len(cand) * FALLBACK_FRACTION >= index.num_docs:
    return None
  if len(cand) > REFINE * k:  # the best essential partial sums: their exact k-th best raises θ
    best = best_positions(part_C, REFINE * k)
    theta = max(theta, _kth_score(index, cand[best], sparse, dense, memo, k))
  # MaxScore: add the non-essential terms, largest bound first, dropping every candidate whose
  # partial sum plus the bounds still to come is below θ. A rarer sparse term's bound is per
  # candidate: the block-max of the one block of its postings that could hold the candidate (≤ its
  # global bound, 0 before its first doc), read without decoding any block, so candidates dropped
  # before its lookup spare decoding its blocks. The other terms keep their global bound: a dense
  # row's lookup is a gather and a common term's is a gather (byte map) or a binary search in its
  # cached doc ids, each about as costly as the block bounds themselves (at 1M-2M passages those
  # cost 12% of the CPU time and pruned almost nothing: on passages of near-equal length nearly
  # every 128-posting block of a common term holds an impact close to the term's maximum).
  theta_lo = theta / (1 + _MARGIN)  # keep x where x·(1 + margin) ≥ θ
  keep = part_C >= theta_lo - total
  cand, part_C = cand[keep], part_C[keep]
  keys = list(reversed(rest))
  bound = {}  # position in keys → per-candidate bound, aligned with cand here
  rest_ub, rest_C = sum(ub[key] for key in keys), None  # bounds to come: global, per candidate
  if BLOCK_MAX:
    for i, (kind, t) in enumerate(keys):
      if kind == "s" and _df(index, t) < CACHED_DF:
        bound[i] = _block_bounds(index, (kind, t), cand) * counts[t]
        rest_ub -= ub[(kind, t)]
        rest_C = bound[i] if rest_C is None else rest_C + bound[i]
  sel = np.arange(len(cand))
  for i, (kind, t) in enumerate(keys):
    floor = theta_lo - rest_ub
    keep = part_C >= floor if rest_C is None else part_C + rest_C >= floor
    if not keep.all():  # (one index array for the four filters)
      at = np.flatnonzero(keep)
      cand, part_C, sel = cand.take(at), part_C.take(at), sel.take(at)
      rest_C = None if rest_C is None else rest_C.take(at)
    if kind == "s":
      part_C = part_C + _times(_lookup(index, t, cand, memo), counts[t])
    else:
      part_C = part_C + _times(index.dense_DxN[t].take(cand), dense_counts[t])
    if i in bound:
      rest_C = rest_C - bound[i].take(sel)
    else:
      rest_ub -= ub[(kind, t)]
  # The survivors (a superset of the top k) get their exact scores, in the exhaustive order.
  return top_k(cand, score_docs(index, cand, sparse, dense, memo), k)
