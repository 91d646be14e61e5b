"""Compressed postings (block_postings.py), passage store (passage_store.py): lossless round trips."""

import json
import os

import numpy as np
import pytest

from llds_jax import block_postings, corpus, doc_bitmap, passage_store, retriever
from tests import tool_loader

TESTDATA = os.path.join(os.path.dirname(__file__), "testdata")


def _random_csr(rng, n_docs=70_000):
  """Terms from empty to ~n/2 docs; impacts from 1 to 400 distinct values (table escapes)."""
  dfs = np.r_[0, rng.integers(1, 40, 300), 0, [1, 2, 127, 128, 129, 255, 256, 257],
              rng.integers(2_000, 35_000, 6)]
  docs, weights = [], []
  for i, df in enumerate(dfs):
    docs.append(np.sort(rng.choice(n_docs, df, replace=False)))
    values = (rng.random(1 if i % 7 == 0 else rng.integers(2, 400)) + 0.01).astype(np.float32)
    weights.append(rng.choice(values, df))
  docs[-1][-1] = n_docs + 2**20  # a delta escaping even 2-byte widths
  docs.append(np.arange(1, 300) * 300_007)  # every delta needs 4 bytes
  weights.append(np.full(299, 0.5, np.float32))
  return np.r_[0, np.cumsum([len(d) for d in docs])], docs, weights


def test_encode_decode_round_trip_exact(monkeypatch):
  rng = np.random.default_rng(0)
  indptr, docs, weights = _random_csr(rng)
  monkeypatch.setattr(block_postings, "CHUNK", 20_000)  # terms split over several chunks
  monkeypatch.setattr(block_postings, "CACHE_MIN_DF", 1 << 40)  # lookups decode blocks, not terms
  enc = block_postings.encode(indptr, np.concatenate(docs).astype(np.int32),
                              np.concatenate(weights))
  assert len(enc["gap_exc_pos_E"]) and len(enc["w_exc_pos_E"])  # both escape paths are exercised
  assert set(enc["gap_width_V"].tolist()) == {1, 2, 4}
  p = block_postings.BlockPostings(enc)
  for t in range(len(docs)):
    d, w = p.term(t)
    np.testing.assert_array_equal(d, docs[t])
    np.testing.assert_array_equal(w, weights[t])  # bit-exact float32 impacts
    assert p.term_max_V[t] == weights[t].max(initial=0)
    first_B, max_B = p.blocks(t)
    assert len(first_B) == -(-len(docs[t]) // block_postings.BLOCK)
    for b in range(len(first_B)):  # block skip pointers and block-max bounds
      sl = slice(b * block_postings.BLOCK, (b + 1) * block_postings.BLOCK)
      assert first_B[b] == docs[t][sl][0] and max_B[b] == weights[t][sl].max()
    if len(first_B) > 2:
      some = np.array([0, len(first_B) // 2, len(first_B) - 1])
      d, w = p.decode_blocks(t, some)
      rows = np.concatenate([np.arange(b * 128, min(b * 128 + 128, len(docs[t]))) for b in some])
      np.testing.assert_array_equal(d, docs[t][rows])
      np.testing.assert_array_equal(w, weights[t][rows])
    at = np.unique(np.r_[rng.integers(0, 70_000, 40), docs[t][::97]])
    want = np.zeros(len(at), np.float32)
    hit = np.isin(at, docs[t])
    want[hit] = weights[t][np.searchsorted(docs[t], at[hit])]
    np.testing.assert_array_equal(p.lookup(t, at), want)


def test_postings_take_under_70_percent_of_the_old_format():
  rng = np.random.default_rng(1)
  probs = 1.0 / np.arange(1, 2001) ** 1.1
  docs = [[f"w{j}" for j in rng.choice(2000, size=n, p=probs / probs.sum())]
          for n in rng.integers(1, 120, size=2000)]
  index = retriever.BM25Index.from_tokenized(docs)
  old_bytes = 8 * index.meta["num_postings"] + 12 * index.meta["num_terms"]  # CSR + term max
  assert sum(v.nbytes for v in index.postings.arrays().values()) < 0.7 * old_bytes


def test_old_format_fails_loud_with_rebuild_message(tmp_path):
  rows = list(corpus.read_corpus(os.path.join(TESTDATA, "wiki_sample.jsonl")))[:20]
  retriever.BM25Index.build(rows, store_dir=str(tmp_path))
  meta_path = tmp_path / "meta.json"
  meta = json.loads(meta_path.read_text())
  meta_path.write_text(json.dumps({**meta, "format": "llds_jax.bm25/1"}))
  with pytest.raises(ValueError, match=r"'llds_jax.bm25/1'.*rebuild the index with tools/build"):
    retriever.BM25Index.load(str(tmp_path))
  fa = tool_loader.load("tools/fetch_assets.py", "fetch_assets")
  assert not fa.index_is_current(str(tmp_path))  # fetch_assets rebuilds it instead of trusting it
  meta_path.write_text(json.dumps(meta))
  assert fa.index_is_current(str(tmp_path))
  assert len(retriever.BM25Index.load(str(tmp_path)).store) == 20


@pytest.mark.parametrize("to_disk", [True, False])
def test_passage_store_round_trip(tmp_path, monkeypatch, to_disk):
  monkeypatch.setattr(passage_store, "BLOCK_BYTES", 300)  # many blocks
  rows = list(corpus.read_corpus(os.path.join(TESTDATA, "wiki_sample.jsonl")))[:60]
  rows += [("", ""), ("ü-€", '"Zürich"\n— naïve 漢字'), ("last", "x" * 5000)]
  writer = passage_store.PassageStoreWriter(str(tmp_path) if to_disk else None)
  for doc_id, contents in rows:
    writer.add(doc_id, contents)
  store = writer.close()
  assert len(store) == len(rows) and len(store._first_B1) > 10
  for i in [5, 4, 62, 0, *range(len(rows))]:  # out of order: the block cache must not leak
    assert store.get(i) == rows[i]
  with pytest.raises(IndexError, match="out of range"):
    store.get(len(rows))
  if to_disk:
    assert isinstance(passage_store.PassageStore.load(str(tmp_path))._blob, np.memmap)
    raw = sum(len(a.encode()) + len(b.encode()) for a, b in rows)
    assert os.path.getsize(tmp_path / "passages.bin") < 0.7 * raw


def test_decode_cache_is_bounded_and_returns_the_same_postings(monkeypatch):
  rng = np.random.default_rng(2)
  indptr, docs, weights = _random_csr(rng)
  monkeypatch.setattr(block_postings, "CACHE_MIN_DF", 100)
  monkeypatch.setattr(block_postings, "CACHE_BYTES", 8 * 40_000)  # room for about one big term
  p = block_postings.BlockPostings(block_postings.encode(
      indptr, np.concatenate(docs).astype(np.int32), np.concatenate(weights)))
  for t in [*range(len(docs)), *reversed(range(len(docs)))]:
    d, w = p.term(t)
    np.testing.assert_array_equal(d, docs[t])
    np.testing.assert_array_equal(w, weights[t])
    assert not d.flags.writeable and not w.flags.writeable  # shared through the cache
    assert p._cached_bytes <= block_postings.CACHE_BYTES
  assert p._cache and all(len(p._cache[t][0]) >= 100 for t in p._cache)


def test_byte_map_lookups_equal_binary_search_lookups(monkeypatch):
  # Terms in ≥ N/DENSIFY_FRACTION docs are looked up through a per-doc byte map; the impacts must
  # be the same float32 bits, table codes ≥ 254 and escaped impacts included, and the map LRU bounded.
  rng = np.random.default_rng(4)
  indptr, docs, weights = _random_csr(rng)
  weights[-2] = (rng.random(len(docs[-2])) + 0.01).astype(np.float32)  # > 255 distinct: escapes
  enc = block_postings.encode(indptr, np.concatenate(docs).astype(np.int32), np.concatenate(weights))
  n_docs = int(max(d.max(initial=0) for d in docs)) + 1
  monkeypatch.setattr(block_postings, "DENSIFY_FRACTION", n_docs // 2_000)  # df ≥ 2,000: mapped
  monkeypatch.setattr(block_postings, "DENSE_CACHE_BYTES", 3 * n_docs)
  plain, mapped = block_postings.BlockPostings(enc), block_postings.BlockPostings(enc, n_docs)
  big = [t for t in range(len(docs)) if len(docs[t]) >= 2_000]
  assert len(big) >= 6 and any(len(np.unique(weights[t])) > 255 for t in big)
  for t in [*big, *reversed(big), 1, 2]:
    at = np.unique(np.r_[rng.integers(0, n_docs, 500), docs[t][::7]])
    np.testing.assert_array_equal(mapped.lookup(t, at), plain.lookup(t, at))
    assert mapped._map_bytes <= block_postings.DENSE_CACHE_BYTES
  assert sorted(mapped._maps) == big[:3] and not plain._maps


@pytest.mark.parametrize("n_docs,df",
                         [(1, 1), (64, 64), (130, 3), (1000, 0), (5000, 900), (5000, 4999)])
def test_doc_bitmap_positions_equal_binary_search(n_docs, df):
  rng = np.random.default_rng(n_docs + df)
  docs = np.sort(rng.choice(n_docs, df, replace=False)).astype(np.int32)
  at = np.r_[rng.integers(0, n_docs, 300), docs[::3], 0, n_docs - 1, 63, 64].clip(0, n_docs - 1)
  at = at.astype(np.int32)
  got = doc_bitmap.positions(*doc_bitmap.build(docs, n_docs), at)
  pos = np.minimum(np.searchsorted(docs, at), max(df - 1, 0))
  want = np.where((docs[pos] == at) if df else np.zeros(len(at), bool), pos, -1)
  np.testing.assert_array_equal(got, want)


def test_bitmap_lookups_equal_binary_search_lookups(monkeypatch):
  # Common terms in ≥ N/RANK_FRACTION docs are looked up through a bitmap with word ranks; same
  # float32 impacts as the binary search, absent docs 0, and the bitmap LRU bounded.
  rng = np.random.default_rng(5)
  n_docs = 20_000
  docs = [np.sort(rng.choice(n_docs, df, replace=False))
          for df in (0, 3, 600, 900, 5000, 12000, 19990)]
  weights = [(rng.random(len(d)) + 0.01).astype(np.float32) for d in docs]  # > 255 values: escapes
  indptr = np.r_[0, np.cumsum([len(d) for d in docs])]
  enc = block_postings.encode(indptr, np.concatenate(docs).astype(np.int32), np.concatenate(weights))
  monkeypatch.setattr(block_postings, "CACHE_MIN_DF", 500)
  monkeypatch.setattr(block_postings, "RANK_FRACTION", n_docs // 500)  # df ≥ 500: bitmap
  monkeypatch.setattr(block_postings, "DENSIFY_FRACTION", 1)  # no byte maps
  monkeypatch.setattr(block_postings, "RANK_MIN_LOOKUP", 1)
  plain, ranked = block_postings.BlockPostings(enc), block_postings.BlockPostings(enc, n_docs)
  per_term = 12 * (n_docs // 64 + 1)  # 8 bytes of bits and 4 of rank a word
  monkeypatch.setattr(block_postings, "RANK_CACHE_BYTES", 2 * per_term)
  big = [t for t in range(len(docs)) if len(docs[t]) >= 500]
  assert len(big) >= 4 and ranked.gathers(big[0]) and not plain.gathers(big[0])
  for t in [*big, 0, 1, 2]:
    at = np.unique(np.r_[rng.integers(0, n_docs, 500), docs[t][::5]])
    np.testing.assert_array_equal(ranked.lookup(t, at), plain.lookup(t, at))
    assert ranked._bitmap_bytes <= block_postings.RANK_CACHE_BYTES
  # The LRU keeps the last two terms used: big[-1], then big[0] (term 2) again.
  assert sorted(ranked._bitmaps) == [big[0], big[-1]] and not plain._bitmaps
