"""Sorted doc-id lists as bitmaps with per-word ranks: where a doc sits in the list, in O(1).

Dims: N documents, W = N/64 + 1 words, C docs looked up.

A binary search of C docs in a list of P doc ids costs ~log2(P) dependent steps per doc (16 ns per
doc at P = 36k); a bitmap answers with two word gathers and a popcount: the doc's bit says whether
it is in the list, and the set bits before it (the word's rank plus a popcount of its lower bits)
give its position. 3N/16 bytes per list (N/8 of bits, N/16 of int32 ranks), whatever P.
"""

import numpy as np

_BIT_64 = np.left_shift(np.uint64(1), np.arange(64, dtype=np.uint64))  # bit i of a word
_BELOW_64 = _BIT_64 - np.uint64(1)  # bits 0..i−1


def build(docs_P: np.ndarray, num_docs: int) -> tuple[np.ndarray, np.ndarray]:
  """(bits_W uint64, rank_W int32) of sorted, unique doc ids < num_docs: rank_W[w] = set bits before
  word w."""
  bits_W = np.zeros(num_docs // 64 + 1, np.uint64)
  if len(docs_P):
    word_P = np.asarray(docs_P) >> 6
    starts = np.flatnonzero(np.r_[True, word_P[1:] != word_P[:-1]])  # first doc of each word
    bits_W[word_P[starts]] = np.bitwise_or.reduceat(_BIT_64.take(docs_P & 63), starts)
  count_W = np.bitwise_count(bits_W).astype(np.int32)
  return bits_W, np.cumsum(count_W, dtype=np.int32) - count_W


def positions(bits_W: np.ndarray, rank_W: np.ndarray, docs_C: np.ndarray) -> np.ndarray:
  """Per doc (any order): its index in the list the bitmap was built from, −1 where absent."""
  word_C = docs_C >> 6
  bits_C = bits_W.take(word_C)
  low_C = docs_C & 63
  pos_C = rank_W.take(word_C) + np.bitwise_count(bits_C & _BELOW_64.take(low_C))
  return np.where((bits_C & _BIT_64.take(low_C)) != 0, pos_C, -1)
