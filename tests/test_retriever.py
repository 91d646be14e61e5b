"""BM25 retriever: rank_bm25 parity (real text and a Zipfian corpus), Lucene formula, I/O, bad input."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from rank_bm25 import BM25Okapi

from llds_jax import block_postings, corpus, postings, retriever

TESTDATA = os.path.join(os.path.dirname(__file__), "testdata")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _wiki_rows():
  return list(corpus.read_corpus(os.path.join(TESTDATA, "wiki_sample.jsonl")))


@pytest.fixture(scope="module")
def wiki():
  rows = _wiki_rows()
  index = retriever.BM25Index.build(rows)
  ref = BM25Okapi([retriever.tokenize(c) for _, c in rows])
  questions = [r["question"] for r in
               pq.read_table(os.path.join(TESTDATA, "fanoutqa_answerable.parquet")).to_pylist()]
  return rows, index, ref, questions


@pytest.fixture(scope="module")
def zipf():
  """1,500 docs over a 3,000-word Zipf vocabulary: several terms are in more than half the docs."""
  rng = np.random.default_rng(0)
  vocab = [f"w{i}" for i in range(3000)]
  probs = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
  probs /= probs.sum()
  lens = rng.integers(1, 160, size=1500)
  lens[7] = 0  # an empty document
  docs = [[vocab[j] for j in rng.choice(len(vocab), size=n, p=probs)] for n in lens]
  docs[3].append("solo")  # a term in exactly one document
  queries = [[vocab[j] for j in rng.choice(len(vocab), size=rng.integers(1, 9), p=probs)]
             for _ in range(300)]
  queries += [["w0", "w0", "w1"], ["solo"], ["unknown"], []]
  return docs, queries


def _assert_parity(index, ref, queries):
  for q in queries:
    np.testing.assert_allclose(index.get_scores(q), ref.get_scores(q), rtol=1e-6, atol=1e-12)


def test_tokenize():
  assert retriever.tokenize("Hello, World! Café_au lait 2,000 ÉTÉ") == [
      "hello", "world", "café_au", "lait", "2", "000", "été"]
  assert retriever.tokenize("") == []


def test_okapi_parity_real_text(wiki):
  rows, index, ref, questions = wiki
  rng = np.random.default_rng(1)
  words = [w for _, c in rows for w in retriever.tokenize(c)]
  queries = [retriever.tokenize(q) for q in questions]
  queries += [list(rng.choice(words, size=rng.integers(1, 12))) for _ in range(150)]
  floored = [w for w in ref.idf if ref.idf[w] == ref.epsilon * ref.average_idf]
  assert {"the", "of"} <= set(floored)  # the epsilon floor is exercised by real queries
  _assert_parity(index, ref, queries)


def test_okapi_parity_zipf_common_terms(zipf):
  docs, queries = zipf
  index = retriever.BM25Index.from_tokenized(docs)
  ref = BM25Okapi(docs)
  n_common = sum(1 for w in ref.idf if ref.idf[w] == ref.epsilon * ref.average_idf)
  assert n_common >= 5
  _assert_parity(index, ref, queries)
  # Non-default parameters go through the same formula.
  index2 = retriever.BM25Index.from_tokenized(docs, k1=1.2, b=0.5, epsilon=0.1)
  _assert_parity(index2, BM25Okapi(docs, k1=1.2, b=0.5, epsilon=0.1), queries[:50])


def test_search_is_ranked_top_k_with_index_tiebreak(zipf):
  docs, queries = zipf
  index = retriever.BM25Index.from_tokenized(docs)
  results = index.search(queries, k=10)
  assert len(results) == len(queries)
  for q, hits in zip(queries, results):
    scores = index.get_scores(q)
    expected = np.lexsort((np.arange(len(scores)), -scores))[:10]
    assert [i for i, _ in hits] == expected.tolist()
    assert [s for _, s in hits] == scores[expected].tolist()
  assert results[-1] == [(i, 0.0) for i in range(10)]  # empty query: first docs, score 0
  assert results[-2] == results[-1]  # unknown term = empty query
  # One hit, then zero-score docs in index order.
  assert results[-3][0][0] == 3 and results[-3][0][1] > 0
  assert results[-3][1:] == [(i, 0.0) for i in (0, 1, 2, 4, 5, 6, 7, 8, 9)]


def test_search_matches_rank_bm25_top10_scores(wiki):
  rows, index, ref, questions = wiki
  for q, hits in zip(questions, index.search(questions, k=10)):
    ref_scores = ref.get_scores(retriever.tokenize(q))
    np.testing.assert_allclose([s for _, s in hits], np.sort(ref_scores)[::-1][:10], rtol=1e-6)
    np.testing.assert_allclose([ref_scores[i] for i, _ in hits], [s for _, s in hits], rtol=1e-6)


def test_gold_passages_are_retrieved(wiki):
  rows, index, _, _ = wiki
  table = pq.read_table(os.path.join(TESTDATA, "fanoutqa_answerable.parquet")).to_pylist()
  docs = index.retrieve([r["question"] for r in table], k=3)
  found = [any(d.title == f'"{r["extra_info"]["evidence_title"]}"' for d in top)
           for r, top in zip(table, docs)]
  assert sum(found) >= 70, sum(found)  # 83 questions; BM25 finds the gold page in the top 3 for most


def test_lucene_variant_matches_direct_formula(zipf):
  docs, queries = zipf
  index = retriever.BM25Index.from_tokenized(docs, variant="lucene")
  assert (index.meta["k1"], index.meta["b"]) == (0.9, 0.4)
  n = sum(1 for d in docs if d)
  avgdl = sum(len(d) for d in docs) / n
  df = {}
  for d in docs:
    for w in set(d):
      df[w] = df.get(w, 0) + 1

  def norm_len(dl):  # Lucene keeps lengths < 24 exact, else the top 4 bits of (dl − 24)
    if dl < 24:
      return dl
    bits = bin(dl - 24)[2:]
    return 24 + int(bits[:4] + "0" * max(0, len(bits) - 4), 2)

  for q in queries[:40]:
    expected = np.zeros(len(docs))
    for j, d in enumerate(docs):
      for w in q:
        tf = d.count(w)
        if tf:
          idf = math.log(1 + (n - df[w] + 0.5) / (df[w] + 0.5))
          expected[j] += idf * tf / (tf + 0.9 * (1 - 0.4 + 0.4 * norm_len(len(d)) / avgdl))
    np.testing.assert_allclose(index.get_scores(q), expected, rtol=1e-6, atol=1e-12)


def test_lucene_length_table():
  got = retriever.lucene_length(np.array([0, 5, 23, 24, 31, 32, 33, 40, 41, 100, 1000]))
  assert got.tolist() == [0, 5, 23, 24, 31, 32, 33, 40, 40, 96, 984]


def test_save_load_identical(wiki, tmp_path):
  rows, index, _, questions = wiki
  index.save(str(tmp_path))
  for mmap in (True, False):
    loaded = retriever.BM25Index.load(str(tmp_path), mmap=mmap)
    assert isinstance(loaded.postings.codes_P.base, np.memmap) == mmap  # a view of the mapped file
    assert loaded.search(questions, k=5) == index.search(questions, k=5)
    assert loaded.retrieve_text(questions, k=3) == index.retrieve_text(questions, k=3)
    np.testing.assert_array_equal(loaded.get_scores(["k2", "the"]), index.get_scores(["k2", "the"]))
    assert loaded.meta == index.meta


def test_streaming_build_equals_in_memory(wiki, tmp_path, monkeypatch):
  rows, index, _, questions = wiki
  monkeypatch.setattr(postings, "FLUSH_TOKENS", 997)  # many spilled chunks and weight blocks
  monkeypatch.setattr(block_postings, "CHUNK", 1009)  # many encoding chunks
  streamed = retriever.BM25Index.build(iter(rows), store_dir=str(tmp_path / "idx"))
  assert isinstance(streamed.store._blob, np.memmap)
  assert not [f for f in os.listdir(tmp_path / "idx") if f.startswith("_build")]  # spills removed
  want = index._all_arrays()
  for name, value in streamed._all_arrays().items():
    np.testing.assert_array_equal(value, want[name])
  assert streamed.search(questions, k=5) == index.search(questions, k=5)
  docs = streamed.retrieve(["height of K2"], k=1)[0]
  assert (docs[0].id, docs[0].contents) == rows[docs[0].index]
  assert docs[0].title == '"K2"'


def test_format_observation_is_search_r1_exact():
  docs = [retriever.Doc(0, "a", '"Paris"\nParis is the capital.\nSecond line.', 3.0),
          retriever.Doc(1, "b", "No title line", 1.0), '"X"\n']
  assert retriever.format_observation(docs) == (
      'Doc 1(Title: "Paris") Paris is the capital.\nSecond line.\n'
      "Doc 2(Title: No title line) \n"
      'Doc 3(Title: "X") \n')
  assert retriever.format_observation([]) == ""


def test_retrieve_text_real_query(wiki):
  _, index, _, _ = wiki
  text, = index.retrieve_text(["What is the height of K2?"], k=3)
  assert text.startswith('Doc 1(Title: "K2") K2, also known as Mount Godwin-Austen')
  assert text.count("\nDoc ") == 2 and text.endswith("\n")


def test_empty_and_long_queries(wiki):
  rows, index, ref, _ = wiki
  rng = np.random.default_rng(2)
  words = [w for _, c in rows for w in retriever.tokenize(c)]
  long_q = " ".join(rng.choice(words, size=3000))[:10_000]
  queries = ["", "   ", long_q, "x" * 10_000, "?!" * 5000]
  results = index.search(queries, k=3)
  assert results[0] == results[1] == results[3] == results[4] == [(0, 0.0), (1, 0.0), (2, 0.0)]
  assert len(results[2]) == 3 and results[2][0][1] > 0
  np.testing.assert_allclose(index.get_scores(retriever.tokenize(long_q)),
                             ref.get_scores(retriever.tokenize(long_q)), rtol=1e-6)
  assert len(index.retrieve_text(queries, k=3)) == 5


def test_k_bounds_and_argument_errors(zipf):
  docs, _ = zipf
  index = retriever.BM25Index.from_tokenized(docs[:5])
  assert len(index.search([["w0"]], k=50)[0]) == 5
  assert index.search([], k=3) == []
  with pytest.raises(ValueError, match="k must be"):
    index.search([["w0"]], k=0)
  with pytest.raises(TypeError, match="list of queries"):
    index.search("w0", k=1)
  with pytest.raises(ValueError, match="no document store"):
    index.retrieve([["w0"]])
  with pytest.raises(ValueError, match="unknown BM25 variant"):
    retriever.BM25Index.from_tokenized(docs[:5], variant="bm25+")
  with pytest.raises(ValueError, match="0 documents"):
    retriever.BM25Index.from_tokenized([])


@pytest.mark.parametrize("lines,message", [
    (['{"id": "0", "contents": "\\"A\\"\\ntext"}', '{"id": "1", "contents": "ok"}', '{"id": 2, "cont'],
     r"corpus.jsonl:3: invalid JSON"),
    (['{"id": "0", "contents": "a"}', '{"id": "1", "text": "no contents"}'],
     r"corpus.jsonl:2: row has no 'contents' field"),
    (['{"id": "0", "contents": 5}'], r"corpus.jsonl:1: 'contents' is int"),
])
def test_bad_corpus_rows_name_file_and_line(tmp_path, lines, message):
  path = tmp_path / "corpus.jsonl"
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=message):
    retriever.BM25Index.build(corpus.read_corpus(str(path)), store_dir=str(tmp_path / "idx"))
  assert not (tmp_path / "idx" / "meta.json").exists()


def test_load_missing_index(tmp_path):
  with pytest.raises(FileNotFoundError, match="build_index.py"):
    retriever.BM25Index.load(str(tmp_path))


def test_build_index_tool(tmp_path):
  corpus = os.path.join(TESTDATA, "wiki_sample.jsonl")
  out = str(tmp_path / "idx")
  tool = os.path.join(ROOT, "tools", "build_index.py")
  built = subprocess.run([sys.executable, tool, "--corpus", corpus, "--out", out, "--variant",
                          "lucene", "--quiet"], capture_output=True, text=True, check=True)
  assert "documents 300" in built.stdout and "vocabulary" in built.stdout
  with open(os.path.join(out, "meta.json")) as f:
    assert json.load(f)["variant"] == "lucene"
  queried = subprocess.run([sys.executable, tool, "--index", out, "--query", "height of K2",
                            "--topk", "2"], capture_output=True, text=True, check=True)
  expected = retriever.BM25Index.load(out).retrieve_text(["height of K2"], k=2)[0]
  assert queried.stdout.endswith(expected)


def test_dense_and_sparse_paths_agree_bitwise(zipf, monkeypatch):
  docs, queries = zipf
  index = retriever.BM25Index.from_tokenized(docs)
  assert index.meta["num_dense_terms"] >= 3  # terms in ≥ half the docs are stored as dense rows
  rare = [[w for w in q if w not in {"w0", "w1", "w2", "w3", "w4"}] for q in queries]
  default = index.search(queries + rare, k=7)
  monkeypatch.setattr(retriever, "_DENSE_FRACTION", 0)  # candidate path for every query it can take
  monkeypatch.setattr(retriever, "_DENSE_BUDGET", 1)  # and one row per dense chunk
  assert index.search(queries + rare, k=7) == default
  # Both outcomes of the candidate bound occur: proven top-k, and fallback to a dense row.
  mixed = [t for t in index._term_counts(queries) if {i for i, _ in t} - set(index._dense_row)
           and {i for i, _ in t} & set(index._dense_row)]
  proven = [index._candidates_top_k(t, 7) is not None for t in mixed]
  assert any(proven) and not all(proven)
  monkeypatch.setattr(retriever, "_DENSE_FRACTION", 10**12)  # dense path for every non-empty query
  assert index.search(queries + rare, k=7, prune=False) == default


def test_negative_epsilon_floor_on_tiny_corpus():
  # Most terms are in > N/2 docs, so the mean idf (and rank_bm25's floor) is negative.
  docs = [["a", "b"], ["a", "b", "b"], ["a", "c"], ["a", "b", "d"]]
  ref = BM25Okapi(docs)
  assert ref.epsilon * ref.average_idf < 0
  index = retriever.BM25Index.from_tokenized(docs)
  queries = [["a"], ["b"], ["c"], ["a", "c"], ["d", "b"], []]
  _assert_parity(index, ref, queries)
  for q, hits in zip(queries, index.search(queries, k=4)):
    scores = ref.get_scores(q)
    assert [i for i, _ in hits] == np.lexsort((np.arange(4), -scores)).tolist()
