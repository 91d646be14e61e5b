"""search_pool.SearchPool: a turn's queries across worker processes, same answers as one process."""

import os

import pyarrow.parquet as pq
import pytest

from llds_jax import corpus, retriever, search_pool

TESTDATA = os.path.join(os.path.dirname(__file__), "testdata")


def test_pool_answers_like_the_index(tmp_path):
  rows = list(corpus.read_corpus(os.path.join(TESTDATA, "wiki_sample.jsonl")))
  index = retriever.BM25Index.build(rows, store_dir=str(tmp_path))
  questions = [r["question"] for r in
               pq.read_table(os.path.join(TESTDATA, "fanoutqa_answerable.parquet")).to_pylist()]
  with search_pool.load_retriever(str(tmp_path), workers=2) as pool:
    assert isinstance(pool, search_pool.SearchPool)
    assert pool.retrieve_text(questions, 3) == index.retrieve_text(questions, 3)
    assert pool.cpu_s > 0  # the workers' search time is accounted
    assert pool.search(questions[:5], 7) == index.search(questions[:5], 7)  # in order, 2 chunks
    assert pool.retrieve(questions[:1], 2) == index.retrieve(questions[:1], 2)  # one worker busy
    assert pool.retrieve_text([], 3) == []
    with pytest.raises(TypeError, match="list of queries"):
      pool.search("one string", 3)


def test_pool_needs_an_index_dir_and_workers(tmp_path):
  corpus = os.path.join(TESTDATA, "wiki_sample.jsonl")
  with pytest.raises(ValueError, match="saved index directory"):
    search_pool.load_retriever(corpus, workers=2)
  with pytest.raises(ValueError, match="retriever.workers must be ≥ 1"):
    search_pool.SearchPool(str(tmp_path), 0)
  assert isinstance(search_pool.load_retriever(corpus), retriever.BM25Index)  # workers=1: in-process
