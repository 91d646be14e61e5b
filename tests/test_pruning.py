"""Block-max pruning (llds_jax/pruning.py): pruned top-k == exhaustive top-k, bit for bit."""

import os

import numpy as np
import pytest

from llds_jax import data, pruning, retriever

TESTDATA = os.path.join(os.path.dirname(__file__), "testdata")


def _questions():
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  rows = pq.read_table(os.path.join(TESTDATA, "fanoutqa_answerable.parquet")).to_pylist()
  return [r["question"] for r in rows]


@pytest.fixture(scope="module")
def wiki_docs():
  rows = list(data.read_corpus(os.path.join(TESTDATA, "wiki_sample.jsonl")))
  return [retriever.tokenize(c) for _, c in rows], [retriever.tokenize(q) for q in _questions()]


@pytest.fixture(scope="module")
def zipf_docs():
  """2,000 Zipf docs, several terms in > N/2 of them, and exact duplicates far apart (ties)."""
  rng = np.random.default_rng(1)
  vocab = [f"w{i}" for i in range(2000)]
  probs = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
  probs /= probs.sum()
  docs = [[vocab[j] for j in rng.choice(len(vocab), size=n, p=probs)]
          for n in rng.integers(1, 120, size=2000)]
  for src, dst in [(5, 1500), (5, 1900), (40, 41), (700, 1999), (12, 1300)]:
    docs[dst] = list(docs[src])  # same score: the lower index must win
  queries = [[vocab[j] for j in rng.choice(len(vocab), size=rng.integers(1, 12), p=probs)]
             for _ in range(150)]
  queries += [list(docs[5][:6]), list(docs[700]), ["w0", "w0", "w1"], ["w0"], ["w1", "w2", "w3"]]
  return docs, queries


def _exhaustive(index, queries, k):
  out = []
  for q in queries:
    s_N = index.get_scores(q)
    top = np.lexsort((np.arange(len(s_N)), -s_N))[:k]
    out.append(list(zip(top.tolist(), s_N[top].tolist())))
  return out


@pytest.mark.parametrize("variant", ["okapi", "lucene"])
@pytest.mark.parametrize("corpus", ["wiki_docs", "zipf_docs"])
def test_pruned_top_k_equals_exhaustive(variant, corpus, request, monkeypatch):
  docs, queries = request.getfixturevalue(corpus)
  index = retriever.BM25Index.from_tokenized(docs, variant=variant)
  if corpus == "zipf_docs":
    assert index.meta["num_dense_terms"] >= 3  # df > N/2 terms, stored as dense rows
  # The pruned path for every query the candidate path cannot settle on its own.
  monkeypatch.setattr(retriever, "_DENSE_FRACTION", 10**12)
  parsed = index._term_counts(queries)
  for block_docs, min_df in [(16, 1), (37, 40), (64, 10**9)]:  # blocked terms, both, light only
    index.blockmax = pruning.BlockMax.compute(index, block_docs=block_docs, min_df=min_df)
    for k in (1, 3, 10):
      want = _exhaustive(index, queries, k)
      assert index.search(queries, k) == want
      assert index.search(queries, k, prune=False) == want
      for terms, hits in zip(parsed, want):  # and the pruned path itself, for every query
        if terms:
          ids, scores = pruning.search_one(index, index.blockmax, terms, k)
          assert list(zip(ids.tolist(), scores.tolist())) == hits


def test_ties_across_blocks_go_to_the_lower_index(zipf_docs):
  docs, _ = zipf_docs
  index = retriever.BM25Index.from_tokenized(docs)
  index.blockmax = pruning.BlockMax.compute(index, block_docs=16, min_df=1)
  terms = index._term_counts([docs[5]])[0]
  ids, scores = pruning.search_one(index, index.blockmax, terms, 3)
  assert ids.tolist() == [5, 1500, 1900] and scores[0] == scores[1] == scores[2]


def test_pruning_skips_blocks(wiki_docs, monkeypatch):
  docs, queries = wiki_docs
  index = retriever.BM25Index.from_tokenized(docs)
  index.blockmax = pruning.BlockMax.compute(index, block_docs=8, min_df=1)
  scored = []
  real = pruning._score_blocks
  monkeypatch.setattr(pruning, "_score_blocks",
                      lambda idx, bd, blocks, *a: scored.append(len(blocks)) or real(idx, bd, blocks, *a))
  for terms in index._term_counts(queries):
    pruning.search_one(index, index.blockmax, terms, 3)
  n_blocks = -(-index.num_docs // 8)
  assert sum(scored) < 0.5 * n_blocks * len(queries)  # most blocks are never read


def test_blockmax_saved_loaded_and_recomputed(tmp_path):
  rows = list(data.read_corpus(os.path.join(TESTDATA, "wiki_sample.jsonl")))
  index = retriever.BM25Index.build(rows, store_dir=str(tmp_path / "i"))
  assert index.meta["block_docs"] == pruning.BLOCK_DOCS
  saved = index.blockmax
  assert isinstance(saved.max_UxJ, np.memmap)  # loaded from the index dir, memory-mapped
  fresh = pruning.BlockMax.compute(index)
  for name in ("terms_U", "ptr_UxJ1", "max_UxJ", "dense_max_DxJ"):
    np.testing.assert_array_equal(getattr(saved, name), getattr(fresh, name))
  os.remove(tmp_path / "i" / "blockmax_max_UxJ.npy")  # an index saved before pruning existed
  old = retriever.BM25Index.load(str(tmp_path / "i"))
  q = _questions()[:20]
  assert old.search(q, 5) == index.search(q, 5) == index.search(q, 5, prune=False)


def test_bad_block_size():
  index = retriever.BM25Index.from_tokenized([["a"], ["b"]])
  with pytest.raises(ValueError, match="block_docs"):
    pruning.BlockMax.compute(index, block_docs=0)
