"""Stop strings as a per-token automaton table over the vocabulary (host, NumPy; built once).

Dims (llds_jax/__init__.py): Q stop strings, M automaton states (bytes of the longest stop
string), V vocab; W bytes of the longest token (this module's own).

Stop strings are matched exactly on bytes, incrementally, without decoding text: for every stop
string a KMP automaton over bytes is run, on the host and once, through every token's byte string
from every automaton state, giving a table `[Q, M, V]` of the next state (or -1: the stop string
was completed inside this token). The sampler then needs one gather per row and stop string per
step. A tag split over several tokens and a token that carries the tag plus more text (`">\\n\\n"`)
are both exact. Special tokens count as empty text (as Search-R1's `skip_special_tokens=True`
decode).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import numpy as np


def _byte_decoder() -> dict[str, int]:
  """Inverse of GPT-2's `bytes_to_unicode`: the printable character standing for each byte."""
  keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
  chars, extra = {}, 0
  for b in range(256):
    if b in keep:
      chars[chr(b)] = b
    else:
      chars[chr(256 + extra)] = b
      extra += 1
  return chars


def token_bytes(tokenizer, vocab_size: int | None = None) -> list[bytes]:
  """Bytes each token id adds to the decoded text (special tokens: none), padded to `vocab_size`.

  Handles byte-level BPE (GPT-2/Qwen/Llama-3) and SentencePiece (`▁`, `<0xNN>` byte fallback).
  """
  n = len(tokenizer)
  pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
  added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
  special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items()
                                               if t.special}
  dec = _byte_decoder()
  byte_level = all(c in dec for i, p in enumerate(pieces) if i not in added and p for c in p)
  out = []
  for i, piece in enumerate(pieces):
    if i in special or piece is None:
      out.append(b"")
    elif i in added:
      out.append(added[i].encode())
    elif byte_level:
      out.append(bytes(dec[c] for c in piece))
    elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
      out.append(bytes([int(piece[3:5], 16)]))
    else:
      out.append(piece.replace("\u2581", " ").encode())
  vocab_size = n if vocab_size is None else vocab_size
  return (out + [b""] * (vocab_size - n))[:vocab_size]


def _kmp_dfa(pattern: bytes) -> np.ndarray:
  """[m+1, 256] automaton: state j = the last j bytes are pattern[:j]; m is final (absorbing)."""
  m = len(pattern)
  dfa = np.zeros((m + 1, 256), np.int32)
  dfa[0, pattern[0]] = 1
  fallback = 0
  for j in range(1, m):
    dfa[j] = dfa[fallback]
    dfa[j, pattern[j]] = j + 1
    fallback = dfa[fallback, pattern[j]]
  dfa[m] = m
  return dfa


def stop_table(tok_bytes: Sequence[bytes], stop_strings: Sequence[str]) -> np.ndarray:
  """int8 [Q, M, V]: state after token v from state q of stop string s; -1 = completed."""
  patterns = [s.encode() for s in stop_strings]
  if any(not p for p in patterns):
    raise ValueError("empty stop string")
  M = max((len(p) for p in patterns), default=1)
  if M > 127:
    raise ValueError(f"stop strings longer than 127 bytes are not supported: {stop_strings}")
  lens_V = np.array([len(b) for b in tok_bytes], np.int64)
  # Tokens sorted by length, longest first: at byte i only a prefix of them is still running.
  order_V = np.argsort(-lens_V, kind="stable")
  width = int(lens_V.max(initial=1))
  buf_VxW = np.zeros((len(tok_bytes), width), np.uint8)
  for row, v in enumerate(order_V):
    buf_VxW[row, :lens_V[v]] = np.frombuffer(tok_bytes[v], np.uint8)
  running = [int((lens_V > i).sum()) for i in range(width)]
  table = np.zeros((len(patterns), M, len(tok_bytes)), np.int8)
  for s, pattern in enumerate(patterns):
    dfa, m = _kmp_dfa(pattern), len(pattern)
    for q in range(m):
      state_V = np.full(len(tok_bytes), q, np.int32)
      for i, n in enumerate(running):
        state_V[:n] = dfa[state_V[:n], buf_VxW[:n, i]]
      table[s, q, order_V] = np.where(state_V == m, -1, state_V)
  return table


def cached_token_bytes(tokenizer, vocab_size: int) -> tuple[bytes, ...]:
  """`token_bytes`, computed once per tokenizer object and size (added tokens change the size)."""
  return _token_bytes_cached(tokenizer, len(tokenizer), vocab_size)


@functools.lru_cache(maxsize=8)
def _token_bytes_cached(tokenizer, _, vocab_size):
  return tuple(token_bytes(tokenizer, vocab_size))


def cached_stop_table(tokenizer, stop_strings: tuple[str, ...], vocab_size: int) -> np.ndarray:
  """`stop_table` for a tokenizer, built once per (tokenizer, stop strings, vocab)."""
  return _stop_table_cached(cached_token_bytes(tokenizer, vocab_size), tuple(stop_strings))


@functools.lru_cache(maxsize=8)
def _stop_table_cached(tok_bytes, stop_strings):
  return stop_table(tok_bytes, stop_strings)
