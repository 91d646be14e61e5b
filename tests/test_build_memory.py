"""Bounded index-build memory (llds_jax/build_memory.py, config.retriever.build_memory_mb)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from configs import base
from llds_jax import build_memory, corpus, postings, retriever

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "tests", "testdata", "wiki_sample.jsonl")


def _files(path) -> dict:
  out = {}
  for name in sorted(os.listdir(path)):
    with open(os.path.join(path, name), "rb") as f:
      out[name] = f.read()
  return out


def test_tiny_batches_build_a_byte_identical_index(tmp_path, monkeypatch):
  # Only the batches are under test: the per-item estimate is zeroed, and a 0.1 MiB limit makes
  # flushes of ~400 tokens and ranges of ~130 postings, below the df of the dense-row terms, which
  # then come in pieces.
  for name in ("BASE_BYTES", "BYTES_PER_DOC", "BYTES_PER_TERM"):
    monkeypatch.setattr(build_memory, name, 0)
  monkeypatch.setattr(build_memory, "MIN_BATCH", 16)
  rows = list(corpus.read_corpus(SAMPLE))
  free = retriever.BM25Index.build(iter(rows), store_dir=str(tmp_path / "free"))
  tiny = retriever.BM25Index.build(iter(rows), store_dir=str(tmp_path / "tiny"), memory_mb=0.1)
  budget = retriever.build_budget(0.1)
  tokens = sum(len(retriever.tokenize(c)) for _, c in rows)
  assert budget.flush_tokens * 20 < tokens  # many spilled chunks …
  assert budget.range_postings * 20 < tiny.meta["num_postings"]  # … and many encoded ranges
  dense_df = [sum(int(d > 0) for d in tiny.dense_DxN[r]) for r in range(len(tiny.dense_terms_D))]
  assert max(dense_df) > 2 * budget.range_postings  # dense-row terms split into pieces
  assert _files(tmp_path / "tiny") == _files(tmp_path / "free")
  assert tiny.search(["height of K2"], 5) == free.search(["height of K2"], 5)


def test_too_small_a_limit_fails_naming_the_field(tmp_path, monkeypatch):
  monkeypatch.setattr(build_memory, "BASE_BYTES", 0)
  rows = list(corpus.read_corpus(SAMPLE))
  with pytest.raises(ValueError,
                     match=r"retriever.build_memory_mb=0.5 is too small: indexing \d+ documents"):
    retriever.BM25Index.build(iter(rows), store_dir=str(tmp_path / "i"), memory_mb=0.5)
  assert not os.path.exists(tmp_path / "i" / "meta.json")  # nothing that looks like an index
  with pytest.raises(ValueError, match="build_memory_mb must be > 0"):
    retriever.build_budget(0)


def test_batch_sizes_follow_the_limit():
  free = retriever.build_budget(None)
  assert (free.flush_tokens, free.range_postings) == (1 << 22, 1 << 20)  # the unlimited defaults
  assert retriever.build_budget(1 << 20).flush_tokens == 1 << 22  # never above the defaults
  small = retriever.build_budget(512)
  assert small.flush_tokens * build_memory.BYTES_PER_TOKEN <= 128 << 20
  assert small.range_postings * build_memory.BYTES_PER_POSTING <= 128 << 20
  assert retriever.build_budget(1e-3).range_postings == build_memory.MIN_BATCH
  # The 21M-passage estimate that docs/retrieval.md quotes fits the 16 GiB the issue allows.
  wiki18 = retriever.build_budget(16 << 10)
  assert wiki18.estimate_bytes(21_015_324, 20_000_000, 20, largest_term=10_500_000) < 16 << 30


def test_build_index_tool_honours_the_config_field(tmp_path):
  assert base.get_config().retriever.build_memory_mb > 0
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "build_index.py"), "--corpus",
                        SAMPLE, "--out", str(tmp_path / "i"), "--quiet", "--build_memory_mb", "1"],
                       capture_output=True, text=True, check=False, cwd=ROOT)
  assert out.returncode != 0 and "retriever.build_memory_mb=1 is too small" in out.stderr
  assert not os.path.exists(tmp_path / "i")


def test_dense_row_terms_come_in_pieces_no_larger_than_a_range(tmp_path, monkeypatch):
  monkeypatch.setattr(postings, "FLUSH_TOKENS", 500)  # chunks of a few docs
  builder = postings.PostingsBuilder(spill_dir=str(tmp_path))
  for _, contents in corpus.read_corpus(SAMPLE):
    builder.add(retriever.tokenize(contents))
  df_V, lens = builder.finish()
  dense_V = df_V * 2 >= len(lens)
  whole = {t_lo: (docs, tf) for t_lo, t_hi, _, docs, tf, _ in builder.term_ranges(100)
           if t_hi - t_lo == 1 and dense_V[t_lo]}
  pieces = {}
  for t_lo, t_hi, df_T, docs, tf, first in builder.term_ranges(100, dense_V):
    if dense_V[t_lo]:
      assert t_hi - t_lo == 1 and len(docs) <= 100 and df_T.tolist() == [len(docs)]
      assert first == (t_lo not in pieces)
      pieces.setdefault(t_lo, []).append((docs, tf))
  assert whole and sorted(pieces) == sorted(whole) and max(map(len, pieces.values())) >= 2
  for t, (docs, tf) in whole.items():
    np.testing.assert_array_equal(np.concatenate([d for d, _ in pieces[t]]), docs)
    np.testing.assert_array_equal(np.concatenate([f for _, f in pieces[t]]), tf)
  builder.cleanup()


def test_limited_builds_hand_freed_memory_back_after_every_batch(tmp_path, monkeypatch):
  for name in ("BASE_BYTES", "BYTES_PER_DOC", "BYTES_PER_TERM"):
    monkeypatch.setattr(build_memory, name, 0)
  monkeypatch.setattr(build_memory, "MIN_BATCH", 16)
  calls = []
  monkeypatch.setattr(build_memory, "release_freed_memory", lambda: calls.append(1))
  rows = list(corpus.read_corpus(SAMPLE))
  retriever.BM25Index.build(iter(rows), store_dir=str(tmp_path / "free"))
  assert not calls  # no limit: the allocator is left alone
  retriever.BM25Index.build(iter(rows), store_dir=str(tmp_path / "tiny"), memory_mb=0.1)
  budget = retriever.build_budget(0.1)
  tokens = sum(len(retriever.tokenize(c)) for _, c in rows)
  assert len(calls) >= tokens // budget.flush_tokens + 20
  build_memory.release_freed_memory()  # the real one runs (glibc) or does nothing, without error
