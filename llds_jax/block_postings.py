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

import collections
import os
import shutil
import threading

import numpy as np

from llds_jax import doc_bitmap

BLOCK = 128
CHUNK = 1 << 20  # encode: postings per chunk of whole terms (~100 MiB of temporaries)
_ESCAPE_CODE = 255
# search: decoded common terms kept per process (LRU). The same common words recur in nearly every
# question, so a batch decodes each of them about once; rare terms are cheap to decode again.
CACHE_BYTES = 256 << 20
CACHE_MIN_DF = 1 << 10
# search: a term in ≥ N/DENSIFY_FRACTION docs is looked up through a per-doc byte map (its impact
# code + 1, 0 = absent), a gather instead of a binary search in its doc ids (a lookup at the 9k
# candidates of a 1M-passage query: ~20 µs against ~300 µs). N bytes per term, LRU of
# DENSE_CACHE_BYTES per process (2 MiB a term at 2M passages: the 79 such words of the 1,787
# FanOutQA questions all fit).
DENSIFY_FRACTION = 16
DENSE_CACHE_BYTES = 256 << 20
# search: a term in ≥ N/RANK_FRACTION docs (and fewer than a byte map's) is looked up through a
# bitmap of its docs with per-word ranks (doc_bitmap.py) instead of a binary search in its doc ids:
# ~2,600 candidates in a 16k–64k-posting term at 2M passages, 55 µs against 82 µs. 3N/16 bytes a
# term, LRU of RANK_CACHE_BYTES per process (375 KiB a term at 2M: the 345 such words of the 1,787
# FanOutQA questions fit).
RANK_FRACTION = 128
RANK_CACHE_BYTES = 128 << 20
RANK_MIN_LOOKUP = 256  # fewer docs: the binary search's 5 numpy calls beat the bitmap's 10
_EXACT = 255  # byte map value: look the impact up exactly (table codes ≥ 254 and escapes)

ARRAYS = ("indptr_V1", "gap_off_V1", "gap_width_V", "gaps_X", "gap_exc_pos_E", "gap_exc_val_E",
          "codes_P", "table_ptr_V1", "table_I", "w_exc_pos_E", "w_exc_val_E", "blk_ptr_V1",
          "blk_first_B", "blk_max_B", "term_max_V")
_DTYPE = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4")}  # on disk: little-endian


def _segment_rank(seg_S: np.ndarray) -> np.ndarray:
  """Position of each element within its run of equal, sorted segment ids."""
  starts = np.flatnonzero(np.r_[True, seg_S[1:] != seg_S[:-1]])
  lens = np.diff(np.r_[starts, len(seg_S)])
  return np.arange(len(seg_S)) - np.repeat(starts, lens)


def _encode_chunk(p_lo: int, t_lo: int, df_T: np.ndarray, docs, w, out: dict):
  """Appends the encoding of terms t_lo, t_lo + 1, … (df_T postings each, global positions from
  p_lo; docs ascending per term) to the lists in `out`."""
  df_T = np.asarray(df_T, np.int64)
  t_hi = t_lo + len(df_T)
  term_P = np.repeat(np.arange(t_lo, t_hi), df_T)
  rank_P = np.arange(len(term_P)) - np.repeat(np.cumsum(df_T) - df_T, df_T)  # position in its term
  pos_P = p_lo + np.arange(len(term_P))
  docs = np.asarray(docs, np.int64)
  w = np.asarray(w, np.float32)
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
  max_T = np.zeros(len(df_T), np.float32)
  if len(w):
    max_T[df_T > 0] = np.maximum.reduceat(w, (np.cumsum(df_T) - df_T)[df_T > 0])
  out["term_max_V"].append(max_T)


_PARTS = ("gaps_X", "gap_exc_pos_E", "gap_exc_val_E", "codes_P", "table_I", "w_exc_pos_E",
          "w_exc_val_E", "blk_first_B", "blk_max_B", "gap_width_V", "gap_off_V1", "term_max_V",
          "table_len_T", "blk_count_T", "df_T")
_PART_DTYPE = {"gaps_X": np.uint8, "gap_exc_pos_E": np.int64, "gap_exc_val_E": np.int32,
               "codes_P": np.uint8, "table_I": np.float32, "w_exc_pos_E": np.int64,
               "w_exc_val_E": np.float32, "blk_first_B": np.int32, "blk_max_B": np.float32,
               "gap_width_V": np.uint8, "gap_off_V1": np.int64, "term_max_V": np.float32,
               "table_len_T": np.int64, "blk_count_T": np.int64, "df_T": np.int64}


class Encoder:
  """Encodes postings term range by term range (ranges in term order, every term exactly once).

  With `out_dir` each range's encoding is appended to files there and `finish` writes the final
  .npy files (memory stays O(range)); else everything stays in memory.
  """

  def __init__(self, out_dir: str | None = None):
    self.out_dir = out_dir
    self._out = {name: [] for name in _PARTS}
    self._out["gap_bytes"], self._postings, self._terms = 0, 0, 0
    self._files = ({name: open(os.path.join(out_dir, f"_enc_{name}.bin"), "wb") for name in _PARTS}
                   if out_dir else None)

  def add(self, t_lo: int, df_T: np.ndarray, docs: np.ndarray, weights: np.ndarray):
    """Terms t_lo, t_lo + 1, … with df_T postings each (doc ids ascending within a term)."""
    if t_lo != self._terms:
      raise ValueError(f"term ranges out of order: got term {t_lo}, expected {self._terms}")
    _encode_chunk(self._postings, t_lo, df_T, docs, weights, self._out)
    self._out["df_T"].append(np.asarray(df_T, np.int64))
    self._postings += int(np.sum(df_T))
    self._terms += len(df_T)
    if self._files:
      for name in _PARTS:
        for part in self._out[name]:
          self._files[name].write(np.ascontiguousarray(part, _PART_DTYPE[name]).tobytes())
        self._out[name] = []

  def _part(self, name: str) -> np.ndarray:
    if self._files is None:
      parts = self._out[name]
      return np.concatenate(parts).astype(_PART_DTYPE[name], copy=False) if parts else np.zeros(
          0, _PART_DTYPE[name])
    self._files[name].close()
    path = os.path.join(self.out_dir, f"_enc_{name}.bin")
    return np.fromfile(path, _PART_DTYPE[name]) if os.path.getsize(path) else np.zeros(
        0, _PART_DTYPE[name])

  def finish(self) -> dict:
    """Arrays named in ARRAYS (memory-mapped from out_dir's .npy files when writing to disk)."""
    out = {}
    per_term = {name: self._part(name) for name in ("gap_width_V", "gap_off_V1", "term_max_V",
                                                    "table_len_T", "blk_count_T", "df_T")}
    out["indptr_V1"] = np.r_[0, np.cumsum(per_term["df_T"])].astype(np.int64)
    out["gap_off_V1"] = np.r_[per_term["gap_off_V1"], self._out["gap_bytes"]].astype(np.int64)
    out["gap_width_V"], out["term_max_V"] = per_term["gap_width_V"], per_term["term_max_V"]
    out["table_ptr_V1"] = np.r_[0, np.cumsum(per_term["table_len_T"])].astype(np.int64)
    out["blk_ptr_V1"] = np.r_[0, np.cumsum(per_term["blk_count_T"])].astype(np.int64)
    big = [n for n in ARRAYS if n not in out]
    if self._files is None:
      return {**out, **{name: self._part(name) for name in big}}
    for name in big:  # raw appended bytes → .npy: a header, then the bytes copied as a stream
      self._files[name].close()  # (plain file I/O: mapped pages would count as resident memory)
      raw = os.path.join(self.out_dir, f"_enc_{name}.bin")
      dtype = np.dtype(_PART_DTYPE[name])
      header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                "shape": (os.path.getsize(raw) // dtype.itemsize,)}
      with open(os.path.join(self.out_dir, f"{name}.npy"), "wb") as dst, open(raw, "rb") as src:
        np.lib.format.write_array_header_1_0(dst, header)
        shutil.copyfileobj(src, dst, 1 << 24)
    for name in out:
      np.save(os.path.join(self.out_dir, f"{name}.npy"), out[name])
    for name in _PARTS:
      self._files[name].close()
      os.remove(os.path.join(self.out_dir, f"_enc_{name}.bin"))
    return {name: np.load(os.path.join(self.out_dir, f"{name}.npy"), mmap_mode="r")
            for name in ARRAYS}


def encode(indptr_V1: np.ndarray, docs_P: np.ndarray, weights_P: np.ndarray) -> dict:
  """Arrays (names in ARRAYS) encoding CSR postings (doc ids ascending per term)."""
  indptr_V1 = np.asarray(indptr_V1, np.int64)
  v = len(indptr_V1) - 1
  encoder = Encoder()
  cuts = np.searchsorted(indptr_V1, np.arange(CHUNK, indptr_V1[-1], CHUNK), "right") - 1
  bounds = np.unique(np.r_[0, cuts, v].clip(0, v))
  for t_lo, t_hi in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
    p_lo, p_hi = indptr_V1[t_lo], indptr_V1[t_hi]
    encoder.add(t_lo, np.diff(indptr_V1[t_lo:t_hi + 1]), docs_P[p_lo:p_hi], weights_P[p_lo:p_hi])
  return encoder.finish()


class BlockPostings:
  """Read access to encoded postings (arrays may be memory-mapped views)."""

  def __init__(self, arrays: dict, num_docs: int | None = None):
    for name in ARRAYS:
      setattr(self, name, np.asarray(arrays[name]))
    self.num_postings = int(self.indptr_V1[-1])
    # Doc ids are < num_docs; without it no term gets a byte map.
    self.num_docs = num_docs
    self._cache, self._cached_bytes = collections.OrderedDict(), 0
    self._maps, self._map_bytes = collections.OrderedDict(), 0
    self._bitmaps, self._bitmap_bytes = collections.OrderedDict(), 0
    self._lock = threading.Lock()  # the cache is shared by threads searching one index

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
  def _patch_range(values: np.ndarray, p0: int, exc_pos_E, exc_val_E):
    """Writes escaped values into `values` (positions p0, p0 + 1, …)."""
    lo, hi = np.searchsorted(exc_pos_E, (p0, p0 + len(values)))
    if hi > lo:
      values[exc_pos_E[lo:hi] - p0] = exc_val_E[lo:hi]

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
    """All of term t's (doc ids int32 ascending, float32 impacts); read-only arrays."""
    p0, p1 = int(self.indptr_V1[t]), int(self.indptr_V1[t + 1])
    if p1 - p0 >= CACHE_MIN_DF:
      with self._lock:
        hit = self._cache.get(t)
        if hit is not None:
          self._cache.move_to_end(t)
          return hit
    d = self._gaps(t).astype(np.int32)
    self._patch_range(d, p0, self.gap_exc_pos_E, self.gap_exc_val_E)
    if len(d):
      d[0] = self.blk_first_B[self.blk_ptr_V1[t]]
    table = self.table_I[int(self.table_ptr_V1[t]):int(self.table_ptr_V1[t + 1])]
    w = table.take(self.codes_P[p0:p1], mode="clip")
    if len(table) == _ESCAPE_CODE:  # only full tables can have escaped impacts
      self._patch_range(w, p0, self.w_exc_pos_E, self.w_exc_val_E)
    docs = np.cumsum(d, dtype=np.int32)  # doc ids < 2^31
    docs.flags.writeable = w.flags.writeable = False  # may be shared through the cache
    if p1 - p0 >= CACHE_MIN_DF and 8 * (p1 - p0) <= CACHE_BYTES:
      with self._lock:
        if t not in self._cache:
          self._cache[t] = (docs, w)
          self._cached_bytes += 8 * (p1 - p0)
        while self._cached_bytes > CACHE_BYTES:
          _, (old_docs, _) = self._cache.popitem(last=False)
          self._cached_bytes -= 8 * len(old_docs)
    return docs, w

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

  def _byte_map(self, t: int):
    """(map_N, table): map_N[d] − 1 is doc d's impact code (0: absent, _EXACT: look up exactly);
    table[map_N[d]] its impact (0 for absent and _EXACT)."""
    with self._lock:
      hit = self._maps.get(t)
      if hit is not None:
        self._maps.move_to_end(t)
        return hit
    docs, _ = self.term(t)
    p0, p1 = int(self.indptr_V1[t]), int(self.indptr_V1[t + 1])
    map_N = np.zeros(self.num_docs, np.uint8)
    map_N[docs] = np.minimum(self.codes_P[p0:p1], _EXACT - 1) + 1
    table = np.zeros(_EXACT + 1, np.float32)
    table_t = self.table_I[int(self.table_ptr_V1[t]):int(self.table_ptr_V1[t + 1])][:_EXACT - 1]
    table[1:1 + len(table_t)] = table_t
    map_N.flags.writeable = table.flags.writeable = False
    with self._lock:
      if t not in self._maps:
        self._maps[t] = (map_N, table)
        self._map_bytes += self.num_docs
      while self._map_bytes > DENSE_CACHE_BYTES:
        self._maps.popitem(last=False)
        self._map_bytes -= self.num_docs
    return map_N, table

  def gathers(self, t: int) -> bool:
    """Whether `lookup(t, ...)` gathers from a byte map or bitmap (no binary search)."""
    df = self.df(t)
    return bool(self.num_docs) and df * RANK_FRACTION >= self.num_docs and (
        df >= CACHE_MIN_DF or df * DENSIFY_FRACTION >= self.num_docs)

  def _bitmap(self, t: int) -> tuple[np.ndarray, np.ndarray]:
    """Term t's doc bitmap and word ranks (doc_bitmap.build), kept in an LRU."""
    with self._lock:
      hit = self._bitmaps.get(t)
      if hit is not None:
        self._bitmaps.move_to_end(t)
        return hit
    bits_W, rank_W = doc_bitmap.build(self.term(t)[0], self.num_docs)
    with self._lock:
      if t not in self._bitmaps:
        self._bitmaps[t] = bits_W, rank_W
        self._bitmap_bytes += bits_W.nbytes + rank_W.nbytes
      while self._bitmap_bytes > RANK_CACHE_BYTES:
        _, (old_bits, old_rank) = self._bitmaps.popitem(last=False)
        self._bitmap_bytes -= old_bits.nbytes + old_rank.nbytes
    return bits_W, rank_W

  def positions(self, t: int, docs_C: np.ndarray) -> np.ndarray:
    """Per doc (any order): its index in term(t)'s postings, −1 where absent (via its bitmap)."""
    return doc_bitmap.positions(*self._bitmap(t), docs_C)

  def lookup(self, t: int, docs_C: np.ndarray) -> np.ndarray:
    """Term t's impacts at docs, any order (float32; an exact 0 where the doc lacks the term); only
    the blocks that may hold one of the docs are decoded."""
    if self.num_docs and self.df(t) * DENSIFY_FRACTION >= self.num_docs:
      map_N, table = self._byte_map(t)
      m_C = map_N.take(docs_C)
      w_C = table.take(m_C)
      exact = np.flatnonzero(m_C == _EXACT)
      if len(exact):  # the term's rarest table values and its escapes
        docs, w = self.term(t)
        w_C[exact] = w[np.searchsorted(docs, docs_C[exact])]
      return w_C
    if len(docs_C) >= RANK_MIN_LOOKUP and self.gathers(t):  # (byte-mapped terms: above)
      pos_C = self.positions(t, docs_C)
      return np.where(pos_C >= 0, self.term(t)[1].take(pos_C), np.float32(0))
    first_B, _ = self.blocks(t)
    if self.df(t) >= CACHE_MIN_DF:  # a common term: decoded once per process, then cached
      need = first_B
    else:
      blk_C = np.searchsorted(first_B, docs_C, "right") - 1
      need = np.unique(blk_C[blk_C >= 0])
    if len(need) * 2 > len(first_B):
      docs, w = self.term(t)
    elif len(need):
      docs, w = self.decode_blocks(t, need)
    else:
      return np.zeros(len(docs_C), np.float32)
    pos_C = np.minimum(np.searchsorted(docs, docs_C), len(docs) - 1)
    return np.where(docs.take(pos_C) == docs_C, w.take(pos_C), np.float32(0))
