"""Block-max pruning (llds_jax/pruning.py): pruned top-k == exhaustive top-k, bit for bit."""

import os

import numpy as np
import pytest

from llds_jax import block_postings, corpus, pruning, retriever

TESTDATA = os.path.join(os.path.dirname(__file__), "testdata")


def _questions():
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  rows = pq.read_table(os.path.join(TESTDATA, "fanoutqa_answerable.parquet")).to_pylist()
  return [r["question"] for r in rows]


@pytest.fixture(scope="module")
def wiki_docs():
  rows = list(corpus.read_corpus(os.path.join(TESTDATA, "wiki_sample.jsonl")))
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
    if docs[src][-1] != f"tie{src}":
      docs[src].append(f"tie{src}")  # a rare term marking the copies
    docs[dst] = list(docs[src])  # same score: the lower index must win
  queries = [[vocab[j] for j in rng.choice(len(vocab), size=rng.integers(1, 12), p=probs)]
             for _ in range(150)]
  queries += [list(docs[5][:6]), list(docs[700]), ["w0", "w0", "w1"], ["w0"], ["w1", "w2", "w3"],
              ["tie5", "w0"], ["tie40", "tie40", "w2"], ["tie700", "tie12", "w1"]]
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
  parsed = index._term_counts(queries)
  monkeypatch.setattr(pruning, "MIN_WORK", 0)  # search() prunes whatever the corpus size
  for fraction in (pruning.FALLBACK_FRACTION, 1):  # default; and pruning even with many candidates
    monkeypatch.setattr(pruning, "FALLBACK_FRACTION", fraction)
    for k in (1, 3, 10):
      want = _exhaustive(index, queries, k)
      assert index.search(queries, k) == want
      assert index.search(queries, k, prune=False) == want
      pruned = 0
      for terms, hits in zip(parsed, want):  # the pruned path on its own, wherever it answers
        top = pruning.search_one(index, index.term_max_V, terms, k) if terms else None
        if top is not None:
          assert list(zip(top[0].tolist(), top[1].tolist())) == hits
          pruned += 1
      assert fraction != 1 or pruned >= 0.3 * len(queries)  # the test is not vacuous


def test_ties_go_to_the_lower_index(zipf_docs, monkeypatch):
  docs, _ = zipf_docs
  index = retriever.BM25Index.from_tokenized(docs)
  monkeypatch.setattr(pruning, "FALLBACK_FRACTION", 1)
  for src, want in [(5, [5, 1500, 1900]), (700, [700, 1999])]:
    query = [f"tie{src}", "w0", "w1", "w30"]
    top = pruning.search_one(index, index.term_max_V, index._term_counts([query])[0], len(want))
    assert top[0].tolist() == want and len(set(top[1].tolist())) == 1  # equal scores


def test_pruning_reads_fewer_docs_than_postings(wiki_docs, monkeypatch):
  docs, queries = wiki_docs
  index = retriever.BM25Index.from_tokenized(docs)
  monkeypatch.setattr(pruning, "FALLBACK_FRACTION", 1)
  scored, real = [], pruning.score_docs
  monkeypatch.setattr(pruning, "score_docs",
                      lambda idx, d, *a: scored.append(len(d)) or real(idx, d, *a))
  postings = 0
  for terms in index._term_counts(queries):
    if pruning.search_one(index, index.term_max_V, terms, 3) is not None:
      postings += sum(index.num_docs if t in index._dense_row else
                      int(index.indptr_V1[t + 1] - index.indptr_V1[t]) for t, _ in terms)
  assert 0 < sum(scored) < 0.25 * postings  # docs scored exactly vs postings an exhaustive pass adds


def test_term_max_saved_and_loaded(tmp_path):
  rows = list(corpus.read_corpus(os.path.join(TESTDATA, "wiki_sample.jsonl")))
  index = retriever.BM25Index.build(rows, store_dir=str(tmp_path / "i"))
  saved = index.term_max_V
  assert isinstance(saved.base, np.memmap)  # loaded from the index dir, memory-mapped
  fresh = np.array([index.postings.term(t)[1].max(initial=0) for t in range(len(saved))])
  np.testing.assert_array_equal(saved, fresh)
  df_V = np.diff(index.indptr_V1)
  assert (fresh[df_V > 0] > 0).all() and (fresh[df_V == 0] == 0).all()


def test_block_max_bounds_skip_lookups_and_keep_results(zipf_docs, monkeypatch):
  docs, queries = zipf_docs
  index = retriever.BM25Index.from_tokenized(docs)
  parsed = index._term_counts(queries)
  monkeypatch.setattr(pruning, "FALLBACK_FRACTION", 1)
  monkeypatch.setattr(pruning, "CACHED_DF", 1 << 30)  # every sparse term gets block bounds
  looked, real = [], pruning._lookup
  monkeypatch.setattr(pruning, "_lookup",
                      lambda idx, t, d, *a: looked.append(len(d)) or real(idx, t, d, *a))
  runs = {}
  for block_max in (False, True):  # global bounds only, then per-block bounds
    monkeypatch.setattr(pruning, "BLOCK_MAX", block_max)
    looked.clear()
    top = [pruning.search_one(index, index.term_max_V, t, 10) for t in parsed if t]
    runs[block_max] = ([None if r is None else (r[0].tolist(), r[1].tolist()) for r in top],
                       sum(looked))
  assert runs[True][0] == runs[False][0] and sum(r is not None for r in runs[True][0]) > 30
  assert runs[True][1] < 0.99 * runs[False][1]  # fewer candidate lookups in the rarer terms


def test_common_words_with_the_largest_bounds_are_non_essential(zipf_docs, monkeypatch):
  # okapi's idf floor plus tf saturation gives the df > N/2 words some of the largest bounds; the
  # non-essential set is chosen by postings per unit of bound, so those words are looked up at the
  # candidates instead of forcing an exhaustive pass (the smallest-bounds-first split pruned 64).
  docs, queries = zipf_docs
  index = retriever.BM25Index.from_tokenized(docs)
  monkeypatch.setattr(pruning, "FALLBACK_FRACTION", 1)
  parsed = [t for t in index._term_counts(queries) if t]
  pruned = sum(pruning.search_one(index, index.term_max_V, t, 10) is not None for t in parsed)
  assert pruned >= 0.75 * len(parsed)


@pytest.mark.parametrize("n,j", [(5, 8), (80, 80), (1000, 80), (27_000, 80), (27_000, 10)])
def test_best_positions_hold_the_best_values(n, j):
  v = np.random.default_rng(n + j).random(n)
  got = pruning.best_positions(v, j)
  assert np.all(np.diff(got) > 0) and len(got) <= max(4 * j, min(n, j))
  want = np.argsort(-v)[:j]  # distinct values: the best j are unambiguous
  assert set(want.tolist()) <= set(got.tolist())


def test_sparse_queries_past_the_candidate_limit_are_pruned_not_dense(zipf_docs, monkeypatch):
  # A query of sparse terms only whose postings reach N/FALLBACK_FRACTION used to take the O(N)
  # dense pass (the candidate path gives up there); it is now answered by MaxScore.
  docs, queries = zipf_docs
  index = retriever.BM25Index.from_tokenized(docs, variant="lucene")
  monkeypatch.setattr(pruning, "MIN_WORK_SPARSE", 0)
  monkeypatch.setattr(pruning, "FALLBACK_FRACTION", 1)  # a tiny corpus: let MaxScore answer
  rng = np.random.default_rng(3)
  queries = [[f"w{i}" for i in rng.integers(3, 200, size=rng.integers(2, 7))] for _ in range(60)]
  parsed = index._term_counts(queries)
  sparse_big = [q for q, terms in zip(queries, parsed) if terms
                and not any(t in index._dense_row for t, _ in terms)
                and pruning.exhaustive_work(index, terms) * retriever._DENSE_FRACTION >= index.num_docs]
  assert len(sparse_big) >= 10
  want = _exhaustive(index, sparse_big, 10)
  dense_rows = []
  real = index._dense
  monkeypatch.setattr(index, "_dense", lambda qs: dense_rows.append(len(qs)) or real(qs))
  assert index.search(sparse_big, 10) == want
  assert sum(dense_rows) <= 0.2 * len(sparse_big)


def test_terms_looked_up_by_gather_keep_their_global_bound(zipf_docs, monkeypatch):
  # Dense rows and cached common terms are looked up as cheaply as their block bounds are read, so
  # no block bounds are computed for them; results stay exact.
  docs, queries = zipf_docs
  index = retriever.BM25Index.from_tokenized(docs)
  monkeypatch.setattr(pruning, "FALLBACK_FRACTION", 1)
  monkeypatch.setattr(pruning, "CACHED_DF", 300)
  bounded, real = [], pruning._block_bounds
  monkeypatch.setattr(pruning, "_block_bounds",
                      lambda idx, key, d: bounded.append(key) or real(idx, key, d))
  parsed = [t for t in index._term_counts(queries) if t]
  want = _exhaustive(index, queries, 10)
  answered = 0
  for terms, q in zip(parsed, [q for q, t in zip(queries, index._term_counts(queries)) if t]):
    top = pruning.search_one(index, index.term_max_V, terms, 10)
    if top is not None:
      assert list(zip(top[0].tolist(), top[1].tolist())) == want[queries.index(q)]
      answered += 1
  assert answered > 30 and bounded
  assert all(kind == "s" and pruning._df(index, t) < 300 for kind, t in bounded)


def test_terms_decoded_whole_are_not_decoded_again_by_lookups(zipf_docs, monkeypatch):
  # Pass 1 and the essential merge decode their terms whole; the lookups of the same query (θ,
  # refined θ, survivors) search those postings instead of the compressed ones (byte-mapped
  # common terms aside: their gather is cheaper still).
  docs, queries = zipf_docs
  index = retriever.BM25Index.from_tokenized(docs, variant="lucene")
  monkeypatch.setattr(pruning, "FALLBACK_FRACTION", 1)
  whole, blocks = [], []
  real_term, real_lookup = index.postings.term, index.postings.lookup
  monkeypatch.setattr(index.postings, "term", lambda t: whole.append(t) or real_term(t))
  monkeypatch.setattr(index.postings, "lookup",
                      lambda t, d: blocks.append(t) or real_lookup(t, d))
  answered, again = 0, 0
  for terms in index._term_counts(queries):
    whole.clear()
    blocks.clear()
    if terms and pruning.search_one(index, index.term_max_V, terms, 10) is not None:
      answered += 1
      again += len({t for t in set(whole) & set(blocks)
                    if pruning._df(index, t) * block_postings.DENSIFY_FRACTION < index.num_docs})
  assert answered > 30 and again == 0


def test_many_essential_candidates_go_on_pruning(zipf_docs, monkeypatch):
  # Essential candidates in N/8..N/2 docs: the essential merge is already paid, so MaxScore goes on
  # instead of giving up for the exhaustive O(N) pass (the limit was N/8).
  docs, queries = zipf_docs
  index = retriever.BM25Index.from_tokenized(docs, variant="lucene")
  sizes, real = [], pruning._merged_postings
  monkeypatch.setattr(pruning, "_merged_postings",
                      lambda *a: (lambda out: sizes.append(len(out[0])) or out)(real(*a)))
  want = _exhaustive(index, queries, 10)
  many = 0
  for terms, hits in zip(index._term_counts(queries), want):
    sizes.clear()
    top = pruning.search_one(index, index.term_max_V, terms, 10) if terms else None
    if len(sizes) == 2 and sizes[1] * 8 >= index.num_docs:  # pass 1, then the essential merge
      many += 1
      assert top is not None and list(zip(top[0].tolist(), top[1].tolist())) == hits
  assert many >= 5


def test_large_indexes_prune_mid_sized_queries(zipf_docs, monkeypatch):
  # On an index of ≥ LARGE_DOCS docs, queries of MIN_WORK_LARGE..MIN_WORK_SPARSE postings are pruned
  # rather than sorted or scored over all N docs; small indexes keep the exhaustive paths.
  docs, queries = zipf_docs
  index = retriever.BM25Index.from_tokenized(docs, variant="lucene")
  parsed = [t for t in index._term_counts(queries) if t]
  mid = [t for t in parsed if 2000 <= pruning.exhaustive_work(index, t) < 4000]
  assert len(mid) >= 10
  monkeypatch.setattr(pruning, "MIN_WORK", 1 << 30)
  monkeypatch.setattr(pruning, "MIN_WORK_SPARSE", 4000)
  monkeypatch.setattr(pruning, "MIN_WORK_LARGE", 2000)
  assert not any(pruning.worth_pruning(index, t, retriever._DENSE_FRACTION) for t in mid)
  monkeypatch.setattr(pruning, "LARGE_DOCS", index.num_docs)
  assert all(pruning.worth_pruning(index, t, retriever._DENSE_FRACTION) for t in mid)


def test_merge_through_the_largest_terms_bitmap_keeps_results(zipf_docs, monkeypatch):
  # When the largest term of a merge has a doc bitmap, only the other terms are sorted and their
  # sums are added into its postings at the shared docs: same candidates and partial sums (up to
  # float64 rounding), so the same exact top-k.
  docs, queries = zipf_docs
  index = retriever.BM25Index.from_tokenized(docs, variant="lucene")
  monkeypatch.setattr(pruning, "FALLBACK_FRACTION", 1)
  monkeypatch.setattr(pruning, "CACHED_DF", 50)
  monkeypatch.setattr(block_postings, "CACHE_MIN_DF", 50)
  monkeypatch.setattr(block_postings, "RANK_FRACTION", 1 << 20)  # every common term: a bitmap
  parsed = index._term_counts(queries)
  merges = []
  for terms in parsed:
    sparse = [(t, c) for t, c in terms if t not in index._dense_row]
    if len(sparse) >= 2:
      got_docs, got_w = pruning._merged_postings(index, sparse)
      want_docs, want_w = pruning._sorted_union([index.postings.term(t)[0] for t, _ in sparse],
                                                [index.postings.term(t)[1] * np.float64(c)
                                                 for t, c in sparse])
      order = np.argsort(got_docs)
      np.testing.assert_array_equal(got_docs[order], want_docs)
      np.testing.assert_allclose(got_w[order], want_w, rtol=1e-12)
      merges.append(len(got_docs))
  used, real = [], index.postings.positions
  monkeypatch.setattr(index.postings, "positions", lambda t, d: used.append(t) or real(t, d))
  want = _exhaustive(index, queries, 10)
  answered = 0
  for terms, hits in zip(parsed, want):
    top = pruning.search_one(index, index.term_max_V, terms, 10) if terms else None
    if top is not None:
      assert list(zip(top[0].tolist(), top[1].tolist())) == hits
      answered += 1
  assert len(merges) > 30 and answered > 30 and len(used) > 30
