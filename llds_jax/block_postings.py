"""Compressed term-major postings: byte-width doc-id deltas with exceptions, 1-byte impact codes.

Dims: V terms, P postings, B blocks of BLOCK postings (a term's last block may be shorter),
E escaped values, I impact-table entries.

A term's postings keep the global positions indptr_V1[t]:indptr_V1[t + 1] of the uncompressed CSR
(doc ids ascending), so escaped values are addressed by position. Per posting:
  * doc id: the delta to the term's previous doc in the term's width w ∈ {1, 2, 4} bytes (the one
    with the fewest bytes, escapes included); a delta ≥ 2^(8w) − 1 is written as 2^(8w) − 1 and
    kept exactly in gap_exc_pos_E/gap_exc_val_E (patched frame of reference, PFOR-style).
  * impact: one byte indexing the term's table of its ≤ 255 most frequent float32 impacts; code 255
    escapes to w_exc_pos_E/w_exc_val_E. Impacts are the exact float32 numbers of the old format.
Per block: its first doc (a skip pointer: decoding may start at any block, the stored delta there
is replaced by this absolute id) and its largest impact (the block-max bound).

Decoding is a slice view, a table gather and a cumsum per term, vectorized; a lookup at a few docs
decodes only the blocks that may contain them.
"""

import numpy as np

BLOCK = 128
CHUNK = 1 << 22  # encode: postings per chunk of whole terms, bounding the temporaries
_ESCAPE_CODE = 255

ARRAYS = ("indptr_V1", "gap_off_V1", "gap_width_V", "gaps_X", "gap_exc_pos_E", "gap_exc_val_E",
          "codes_P", "table_ptr_V1", "table_I", "w_exc_pos_E", "w_exc_val_E", "blk_ptr_V1",
          "blk_first_B", "blk_max_B", "term_max_V")
_DTYPE = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4")}  # on disk: little-endian


def _segment_rank(seg_S: np.ndarray) -> np.ndarray:
  """Position of each element within its run of equal, sorted segment ids."""
  starts = np.flatnonzero(np.r_[True, seg_S[1:] != seg_S[:-1]])
  lens = np.diff(np.r_[starts, len(seg_S)])
  return np.arange(len(seg_S)) - np.repeat(starts, lens)


def _encode_chunk(t_lo: int, t_hi: int, indptr_V1, docs_P, weights_P, out: dict):
  """Appends the encoding of terms t_lo..t_hi−1 to the lists in `out`."""
  p_lo, p_hi = int(indptr_V1[t_lo]), int(indptr_V1[t_hi])
  df_T = np.diff(indptr_V1[t_lo:t_hi + 1]).astype(np.int64)
  term_P = np.repeat(np.arange(t_lo, t_hi), df_T)
  pos_P = np.arange(p_lo, p_hi)
  rank_P = pos_P - np.repeat(indptr_V1[t_lo:t_hi], df_T)  # position within its term
  docs = np.asarray(docs_P[p_lo:p_hi], np.int64)
  w = np.asarray(weights_P[p_lo:p_hi], np.float32)
  gap_P = np.where(rank_P == 0, 0, docs - np.r_[0, docs[:-1]])
  # Doc-id deltas: per term the width with the fewest bytes counting 12 bytes per escape.
  costs = []
  for width in (1, 2, 4):
    esc = np.bincount(term_P - t_lo, gap_P >= (1 << (8 * width)) - 1, minlength=t_hi - t_lo)
    costs.append(df_T * width + 12 * esc)
  width_T = np.array([1, 2, 4])[np.argmin(np.stack(costs), axis=0)]
  limit_P = np.repeat((1 << (8 * width_T)) - 1, df_T)
  esc_P = gap_P >= limit_P
  out["gap_exc_pos_E"].append(pos_P[esc_P])
  out["gap_exc_val_E"].append(gap_P[esc_P].astype(np.int32))
  stored_P = np.minimum(gap_P, limit_P)
  # Term deltas lie back to back (unaligned views are fine for numpy), bytes scattered per width.
  off_T = out["gap_bytes"] + np.r_[0, np.cumsum(df_T * width_T)[:-1]]
  width_P = np.repeat(width_T, df_T)
  byte_P = np.repeat(off_T - out["gap_bytes"], df_T) + rank_P * width_P
  raw = np.empty(int((df_T * width_T).sum()), np.uint8)
  for width in (1, 2, 4):
    sel = width_P == width
    raw[(byte_P[sel][:, None] + np.arange(width)).ravel()] = (
        stored_P[sel].astype(_DTYPE[width]).view(np.uint8))
  out["gaps_X"].append(raw)
  out["gap_off_V1"].append(off_T)
  out["gap_bytes"] += len(raw)
  out["gap_width_V"].append(width_T.astype(np.uint8))
  # Impacts: per term its most frequent distinct values, 255 at most, get codes by frequency.
  key_P = (term_P << 32) | w.view(np.uint32).astype(np.int64)
  ukey, inverse, count = np.unique(key_P, return_inverse=True, return_counts=True)
  uterm = ukey >> 32
  order = np.lexsort((-count, uterm))  # by term, most frequent first
  code_U = np.empty(len(ukey), np.int64)
  code_U[order] = _segment_rank(uterm[order])
  kept = order[code_U[order] < _ESCAPE_CODE]  # table entries, by term then code
  out["table_I"].append((ukey[kept] & 0xFFFFFFFF).astype(np.uint32).view(np.float32))
  out["table_len_T"].append(np.bincount(uterm[kept] - t_lo, minlength=t_hi - t_lo))
  codes = np.minimum(code_U[inverse], _ESCAPE_CODE)
  out["codes_P"].append(codes.astype(np.uint8))
  out["w_exc_pos_E"].append(pos_P[codes == _ESCAPE_CODE])
  out["w_exc_val_E"].append(w[codes == _ESCAPE_CODE])
  # Blocks of BLOCK postings within each term.
  starts = rank_P % BLOCK == 0
  out["blk_first_B"].append(docs[starts].astype(np.int32))
  out["blk_max_B"].append(np.maximum.reduceat(w, np.flatnonzero(starts)) if len(w) else
                          np.zeros(0, np.float32))
  out["blk_count_T"].append(-(-df_T // BLOCK))


def encode(indptr_V1: np.ndarray, docs_P: np.ndarray, weights_P: np.ndarray) -> dict:
  """Arrays (names in ARRAYS) of the compressed form of CSR postings (doc ids ascending per term)."""
  indptr_V1 = np.asarray(indptr_V1, np.int64)
  v = len(indptr_V1) - 1
  out = {name: [] for name in ("gaps_X", "gap_exc_pos_E", "gap_exc_val_E", "codes_P", "table_I",
                               "table_len_T", "w_exc_pos_E", "w_exc_val_E", "blk_first_B",
                               "blk_max_B", "blk_count_T", "gap_width_V", "gap_off_V1")}
  out["gap_bytes"] = 0
  cuts = np.searchsorted(indptr_V1, np.arange(CHUNK, indptr_V1[-1], CHUNK), "right") - 1
  bounds = np.unique(np.r_[0, cuts, v].clip(0, v))
  for t_lo, t_hi in zip(bounds[:-1], bounds[1:]):
    _encode_chunk(int(t_lo), int(t_hi), indptr_V1, docs_P, weights_P, out)
  cat = lambda name, dtype: (np.concatenate(out[name]).astype(dtype, copy=False) if out[name]
                             else np.zeros(0, dtype))
  blk_max_B = cat("blk_max_B", np.float32)
  blk_ptr_V1 = np.r_[0, np.cumsum(cat("blk_count_T", np.int64))]
  term_max_V = np.zeros(v, np.float32)
  has = blk_ptr_V1[1:] > blk_ptr_V1[:-1]
  if has.any():
    term_max_V[has] = np.maximum.reduceat(blk_max_B, blk_ptr_V1[:-1][has])
  return {"indptr_V1": indptr_V1, "gap_off_V1": np.r_[cat("gap_off_V1", np.int64), out["gap_bytes"]],
          "gap_width_V": cat("gap_width_V", np.uint8), "gaps_X": cat("gaps_X", np.uint8),
          "gap_exc_pos_E": cat("gap_exc_pos_E", np.int64),
          "gap_exc_val_E": cat("gap_exc_val_E", np.int32), "codes_P": cat("codes_P", np.uint8),
          "table_ptr_V1": np.r_[0, np.cumsum(cat("table_len_T", np.int64))],
          "table_I": cat("table_I", np.float32), "w_exc_pos_E": cat("w_exc_pos_E", np.int64),
          "w_exc_val_E": cat("w_exc_val_E", np.float32), "blk_ptr_V1": blk_ptr_V1,
          "blk_first_B": cat("blk_first_B", np.int32), "blk_max_B": blk_max_B,
          "term_max_V": term_max_V}


class BlockPostings:
  """Read access to encoded postings (arrays may be memory-mapped views)."""

  def __init__(self, arrays: dict):
    for name in ARRAYS:
      setattr(self, name, np.asarray(arrays[name]))
    self.num_postings = int(self.indptr_V1[-1])

  def arrays(self) -> dict:
    return {name: getattr(self, name) for name in ARRAYS}

  def df(self, t: int) -> int:
    return int(self.indptr_V1[t + 1] - self.indptr_V1[t])

  def _gaps(self, t: int) -> np.ndarray:
    """Term t's stored deltas (a view, width-typed)."""
    width = int(self.gap_width_V[t])
    lo = int(self.gap_off_V1[t])
    return self.gaps_X[lo:lo + width * self.df(t)].view(_DTYPE[width])

  @staticmethod
  def _patch(values: np.ndarray, pos: np.ndarray, exc_pos_E, exc_val_E):
    """Writes escaped values into `values` (at sorted global positions `pos`)."""
    lo, hi = np.searchsorted(exc_pos_E, (pos[0], pos[-1] + 1)) if len(pos) else (0, 0)
    if hi > lo:
      at = np.searchsorted(pos, exc_pos_E[lo:hi])
      hit = at < len(pos)
      hit[hit] = pos[at[hit]] == exc_pos_E[lo:hi][hit]
      values[at[hit]] = exc_val_E[lo:hi][hit]

  def _impacts(self, t: int, codes: np.ndarray, pos: np.ndarray) -> np.ndarray:
    table = self.table_I[int(self.table_ptr_V1[t]):int(self.table_ptr_V1[t + 1])]
    w = table.take(codes, mode="clip")
    if len(table) == _ESCAPE_CODE:  # only full tables can have escaped impacts
      self._patch(w, pos, self.w_exc_pos_E, self.w_exc_val_E)
    return w

  def term(self, t: int) -> tuple[np.ndarray, np.ndarray]:
    """All of term t's (doc ids int64 ascending, float32 impacts)."""
    p0, p1 = int(self.indptr_V1[t]), int(self.indptr_V1[t + 1])
    pos = np.arange(p0, p1)
    d = self._gaps(t).astype(np.int64)
    self._patch(d, pos, self.gap_exc_pos_E, self.gap_exc_val_E)
    if len(d):
      d[0] = self.blk_first_B[self.blk_ptr_V1[t]]
    return np.cumsum(d), self._impacts(t, self.codes_P[p0:p1], pos)

  def blocks(self, t: int) -> tuple[np.ndarray, np.ndarray]:
    """Term t's per-block (first doc, max impact): skip pointers and block-max bounds."""
    b0, b1 = int(self.blk_ptr_V1[t]), int(self.blk_ptr_V1[t + 1])
    return self.blk_first_B[b0:b1], self.blk_max_B[b0:b1]

  def decode_blocks(self, t: int, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(doc ids, impacts) of term t's blocks `blocks` (sorted, unique, term-local indices)."""
    p0, df = int(self.indptr_V1[t]), self.df(t)
    n_R = np.minimum(df - blocks * BLOCK, BLOCK)
    start_R = blocks * BLOCK
    rank = np.repeat(start_R - np.r_[0, np.cumsum(n_R)[:-1]], n_R) + np.arange(n_R.sum())
    pos = p0 + rank
    d = self._gaps(t)[rank].astype(np.int64)
    self._patch(d, pos, self.gap_exc_pos_E, self.gap_exc_val_E)
    first = np.r_[0, np.cumsum(n_R)[:-1]]
    d[first] = self.blk_first_B[self.blk_ptr_V1[t] + blocks]
    c = np.cumsum(d)
    docs = c - np.repeat(c[first] - d[first], n_R)  # a cumsum restarted at every block
    return docs, self._impacts(t, self.codes_P[pos], pos)

  def lookup(self, t: int, docs_C: np.ndarray) -> np.ndarray:
    """Term t's impacts at sorted docs (float32; an exact 0 where the doc lacks the term); only the
    blocks that may hold one of the docs are decoded."""
    first_B, _ = self.blocks(t)
    blk_C = np.searchsorted(first_B, docs_C, "right") - 1
    need = np.unique(blk_C[blk_C >= 0])
    if len(need) * 2 > len(first_B):
      docs, w = self.term(t)
    elif len(need):
      docs, w = self.decode_blocks(t, need)
    else:
      return np.zeros(len(docs_C), np.float32)
    pos_C = np.minimum(np.searchsorted(docs, docs_C), len(docs) - 1)
    return np.where(docs[pos_C] == docs_C, w[pos_C], np.float32(0))
