"""Bounded index-build memory (llds_jax/build_memory.py, config.retriever.build_memory_mb)."""

import os
import subprocess
import sys

import pytest

from configs import base
from llds_jax import build_memory, corpus, retriever

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "tests", "testdata", "wiki_sample.jsonl")


def _files(path) -> dict:
  out = {}
  for name in sorted(os.listdir(path)):
    with open(os.path.join(path, name), "rb") as f:
      out[name] = f.read()
  return out


def test_tiny_limit_builds_a_byte_identical_index(tmp_path, monkeypatch):
  monkeypatch.setattr(build_memory, "BASE_BYTES", 0)  # the test process's interpreter aside
  rows = list(corpus.read_corpus(SAMPLE))
  free = retriever.BM25Index.build(iter(rows), store_dir=str(tmp_path / "free"))
  tiny = retriever.BM25Index.build(iter(rows), store_dir=str(tmp_path / "tiny"), memory_mb=3)
  budget = build_memory.BuildBudget(3)
  tokens = sum(len(retriever.tokenize(c)) for _, c in rows)
  assert budget.flush_tokens * 2 < tokens  # several spilled chunks …
  assert budget.range_postings * 3 < tiny.meta["num_postings"]  # … and several encoded ranges
  assert _files(tmp_path / "tiny") == _files(tmp_path / "free")
  assert tiny.search(["height of K2"], 5) == free.search(["height of K2"], 5)


def test_too_small_a_limit_fails_naming_the_field(tmp_path, monkeypatch):
  monkeypatch.setattr(build_memory, "BASE_BYTES", 0)
  rows = list(corpus.read_corpus(SAMPLE))
  with pytest.raises(ValueError, match=r"retriever.build_memory_mb=0.5 is too small: indexing \d+ documents"):
    retriever.BM25Index.build(iter(rows), store_dir=str(tmp_path / "i"), memory_mb=0.5)
  assert not os.path.exists(tmp_path / "i" / "meta.json")  # nothing that looks like an index
  with pytest.raises(ValueError, match="build_memory_mb must be > 0"):
    build_memory.BuildBudget(0)


def test_batch_sizes_follow_the_limit():
  free = build_memory.BuildBudget(None)
  assert (free.flush_tokens, free.range_postings) == (1 << 22, 1 << 20)  # the unlimited defaults
  assert build_memory.BuildBudget(1 << 20).flush_tokens == 1 << 22  # never above the defaults
  small = build_memory.BuildBudget(512)
  assert small.flush_tokens * build_memory.BYTES_PER_TOKEN <= 128 << 20
  assert small.range_postings * build_memory.BYTES_PER_POSTING <= 128 << 20
  assert build_memory.BuildBudget(1e-3).range_postings == build_memory.MIN_BATCH
  # The 21M-passage estimate that docs/retrieval.md quotes fits the 16 GiB the issue allows.
  wiki18 = build_memory.BuildBudget(16 << 10)
  assert wiki18.estimate_bytes(21_015_324, 12_000_000, 20) < 16 << 30


def test_build_index_tool_honours_the_config_field(tmp_path):
  assert base.get_config().retriever.build_memory_mb > 0
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "build_index.py"), "--corpus",
                        SAMPLE, "--out", str(tmp_path / "i"), "--quiet", "--build_memory_mb", "1"],
                       capture_output=True, text=True, check=False, cwd=ROOT)
  assert out.returncode != 0 and "retriever.build_memory_mb=1 is too small" in out.stderr
  assert not os.path.exists(tmp_path / "i")
