"""In-process BM25 over a Search-R1 corpus: inverted index, batched exact top-k, memory-mapped files.

Dims: N documents, V vocabulary terms, P postings (distinct (term, doc) pairs), D terms stored as
dense rows, C queries scored together densely, k results per query.

Scoring, `variant="okapi"` (default k1=1.5, b=0.75, epsilon=0.25): exactly `rank_bm25.BM25Okapi`.
  idf(t) = log(N − df + 0.5) − log(df + 0.5); every idf < 0 (df > N/2) is replaced by
  epsilon · mean(raw idf over the whole vocabulary, negatives included), as rank_bm25 does.
  score(q, d) = Σ_{t in q, with repeats} idf(t) · tf·(k1+1) / (tf + k1·(1 − b + b·|d|/avgdl)).
Scoring, `variant="lucene"` (default k1=0.9, b=0.4, Pyserini's BM25 defaults): Lucene ≥ 8 BM25Similarity.
  idf(t) = log(1 + (n − df + 0.5)/(df + 0.5)) with n = documents that have at least one token;
  score = Σ idf · tf / (tf + k1·(1 − b + b·L(|d|)/avgdl)) (no (k1+1) factor since Lucene 8), where
  L is Lucene's one-byte length norm (SmallFloat.intToByte4: exact below 24, then 4 significant
  bits, rounded down) and avgdl uses the exact lengths. A repeated query term counts once per
  repeat (Anserini boosts a term by its query count). Lucene computes in float32; we compute in
  float64, so scores agree to float32 rounding. Anserini's analyzer (Porter stemming, stopwords)
  is *not* reproduced: both variants use `tokenize` below.

Per-posting impacts (the whole score contribution of a term occurrence) are precomputed in float64
and stored exactly as float32 (compressed losslessly, block_postings.py); query scores are
accumulated in float64. Relative error vs rank_bm25 is therefore ≤ ~1e-7 per score.
"""

import collections
import dataclasses
import json
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np

from llds_jax import block_postings, build_memory, postings, pruning, top_k
from llds_jax.passage_store import PassageStore, PassageStoreWriter

# Bumped whenever the files change meaning: /1 raw CSR arrays and an uncompressed doc store;
# /2 compressed postings (block_postings.py) and passage store (passage_store.py).
FORMAT = "llds_jax.bm25/2"
_WORD_RE = re.compile(r"\w+")
_DEFAULTS = {"okapi": (1.5, 0.75), "lucene": (0.9, 0.4)}
_DENSE_BUDGET = 1 << 20  # search: float64 scores held at once on the dense path (8 MiB)
_DENSE_FRACTION = 8  # search: sparse terms touching ≥ N/8 postings → dense path (sort vs O(N))


def tokenize(text: str) -> list[str]:
  """Analyzer for docs and queries: lowercase, then maximal runs of unicode word chars (`\\w+`)."""
  return _WORD_RE.findall(text.lower())


def split_contents(contents: str) -> tuple[str, str]:
  """Search-R1 passage split: title = first line, text = the remaining lines."""
  title, _, text = contents.partition("\n")
  return title, text


@dataclasses.dataclass(frozen=True)
class Doc:
  """One retrieved passage."""
  index: int  # row of the corpus
  id: str
  contents: str
  score: float

  @property
  def title(self) -> str:
    return split_contents(self.contents)[0]

  @property
  def text(self) -> str:
    return split_contents(self.contents)[1]


def format_observation(docs: Sequence[Doc | str]) -> str:
  """Search-R1 `_passages2string`: `Doc {i}(Title: {title}) {text}\\n` per passage, i from 1."""
  parts = []
  for i, doc in enumerate(docs, 1):
    title, text = split_contents(doc if isinstance(doc, str) else doc.contents)
    parts.append(f"Doc {i}(Title: {title}) {text}\n")
  return "".join(parts)


def lucene_length(doc_lens: np.ndarray) -> np.ndarray:
  """Document lengths as Lucene stores them: SmallFloat.byte4ToInt(intToByte4(len))."""
  free = 24  # = 255 − longToInt4(Integer.MAX_VALUE): lengths below this are exact
  x = np.asarray(doc_lens, np.int64)
  rest = np.maximum(x - free, 0)
  bits = np.floor(np.log2(np.maximum(rest, 1))).astype(np.int64) + 1
  shift = np.maximum(bits - 4, 0)  # keep the 4 most significant bits
  return np.where(x < free, x, free + ((rest >> shift) << shift))


def _check_variant(variant: str):
  if variant not in _DEFAULTS:
    raise ValueError(f"unknown BM25 variant {variant!r}; expected one of {sorted(_DEFAULTS)}")


def build_budget(memory_mb: float | None) -> build_memory.BuildBudget:
  """Batch sizes under `memory_mb` from the modules' defaults (read now: tests shrink them)."""
  return build_memory.BuildBudget(memory_mb, postings.FLUSH_TOKENS, block_postings.CHUNK)


class BM25Index:
  """Sparse BM25 index: compressed postings (term → docs, impacts) and an optional doc store."""

  _ARRAYS = ("doc_lens_N", "dense_terms_D", "dense_DxN", "dense_max_D")

  def __init__(self, *, vocab, meta, store=None, postings_arrays, **arrays):
    self.vocab, self.meta, self.store = vocab, meta, store
    # Plain ndarray views of memory-mapped files: same pages, without np.memmap's per-slice
    # Python overhead (a third of the time of a pruned query).
    self.postings = block_postings.BlockPostings(postings_arrays, len(arrays["doc_lens_N"]))
    self.indptr_V1 = self.postings.indptr_V1  # df of term t = indptr_V1[t + 1] − indptr_V1[t]
    for name in self._ARRAYS:
      setattr(self, name, np.asarray(arrays[name]))
    self.num_docs = len(self.doc_lens_N)
    self._range_max = {}  # dense row → its range maxima, computed on first use
    self._dense_row = {int(t): r for r, t in enumerate(self.dense_terms_D)}

  # ---- building ----

  @classmethod
  def from_tokenized(cls, corpus_tokens: Iterable[Sequence[str]], *, k1=None, b=None, epsilon=0.25,
                     variant="okapi") -> "BM25Index":
    """Index pre-tokenized documents (no document store)."""
    builder = postings.PostingsBuilder()
    for tokens in corpus_tokens:
      builder.add(tokens)
    return cls._from_builder(builder, k1=k1, b=b, epsilon=epsilon, variant=variant)

  @classmethod
  def build(cls, docs: Iterable[str | tuple[str, str]], *, k1=None, b=None, epsilon=0.25,
            variant="okapi", store_dir: str | None = None,
            memory_mb: float | None = None) -> "BM25Index":
    """Index Search-R1 `contents` strings or (id, contents) pairs, tokenized with `tokenize`.

    With `store_dir`, document text streams to disk there (nothing is held in memory beyond the
    postings), the finished index is saved there and returned memory-mapped. `memory_mb`
    (config.retriever.build_memory_mb) bounds the build's batches and fails it, naming the field,
    when the corpus cannot be indexed under that limit (build_memory.py); the index is the same.
    """
    _check_variant(variant)
    budget = build_budget(memory_mb)
    if store_dir is not None:
      os.makedirs(store_dir, exist_ok=True)
      # meta.json is written last, so a build that dies midway never looks like a valid index.
      if os.path.exists(os.path.join(store_dir, "meta.json")):
        os.remove(os.path.join(store_dir, "meta.json"))
    writer = PassageStoreWriter(store_dir)
    builder = postings.PostingsBuilder(spill_dir=store_dir, budget=budget)
    try:
      for i, doc in enumerate(docs):
        doc_id, text = (str(i), doc) if isinstance(doc, str) else doc
        writer.add(doc_id, text)
        builder.add(tokenize(text))
    finally:
      store = writer.close()
    try:
      index = cls._from_builder(builder, k1=k1, b=b, epsilon=epsilon, variant=variant,
                                out_dir=store_dir)
    finally:
      builder.cleanup()
    index.store = store
    if store_dir is None:
      return index
    index._save_postings(store_dir, postings_saved=True)
    del index, builder  # the vocabulary dict is not held twice while load() reads it back
    return cls.load(store_dir)

  @classmethod
  def _from_builder(cls, builder, *, k1, b, epsilon, variant, out_dir=None) -> "BM25Index":
    """Scores and encodes the builder's postings a term range at a time (memory O(range) beyond
    the per-doc and per-term arrays and the dense rows); with `out_dir` the postings go there."""
    _check_variant(variant)
    k1 = _DEFAULTS[variant][0] if k1 is None else float(k1)
    b = _DEFAULTS[variant][1] if b is None else float(b)
    df_V, doc_lens = builder.finish()
    # Terms in at least half the docs become dense rows: no more bytes than their postings, and
    # adding a contiguous row per query is far cheaper than scattering ≥ N/2 postings.
    dense_V = df_V * 2 >= len(doc_lens)
    dense_terms = np.flatnonzero(dense_V)
    n = len(doc_lens)
    if n == 0 or not builder.vocab:
      raise ValueError(f"cannot index a corpus with {n} documents and {len(builder.vocab)} terms")
    budget = builder.budget or build_budget(None)
    budget.check(n, len(builder.vocab), len(dense_terms), builder.chunk_postings,
                 int(df_V[~dense_V].max(initial=0)))
    df = df_V.astype(np.float64)
    meta = {"format": FORMAT, "variant": variant, "k1": k1, "b": b, "epsilon": float(epsilon),
            "num_docs": n, "num_terms": len(builder.vocab), "num_postings": int(df_V.sum()),
            "num_dense_terms": len(dense_terms), "analyzer": "lower+\\w+"}
    if variant == "okapi":
      idf = np.log(n - df + 0.5) - np.log(df + 0.5)
      meta["average_idf"] = float(idf.sum() / len(idf))
      idf[idf < 0] = epsilon * meta["average_idf"]
      avgdl = doc_lens.sum() / n
      norm_N = k1 * (1 - b + b * doc_lens / avgdl)
      scale = k1 + 1
    else:
      n_nonempty = int(np.count_nonzero(doc_lens))
      idf = np.log(1 + (n_nonempty - df + 0.5) / (df + 0.5))
      avgdl = doc_lens.sum() / n_nonempty
      norm_N = k1 * (1 - b + b * lucene_length(doc_lens) / avgdl)
      scale = 1.0
    meta["avgdl"] = float(avgdl)

    def impacts(idf_P, tf_P, docs_P):  # float64 math, float32 storage
      tf_P = tf_P.astype(np.float64)
      return (idf_P * tf_P * scale / (tf_P + norm_N[docs_P])).astype(np.float32)

    dense_DxN = np.zeros((len(dense_terms), n), np.float32)
    dense_row_V = np.cumsum(dense_V) - 1
    encoder = block_postings.Encoder(out_dir)
    for t_lo, t_hi, df_T, docs, tf, first in builder.term_ranges(budget.range_postings, dense_V):
      sel_T = dense_V[t_lo:t_hi]
      idf_P = np.repeat(idf[t_lo:t_hi], df_T)
      w_P = impacts(idf_P, tf, docs)
      dense_P = np.repeat(sel_T, df_T)
      if dense_P.any():
        rows_P = np.repeat(dense_row_V[t_lo:t_hi], df_T)[dense_P]
        dense_DxN[rows_P, docs[dense_P]] = w_P[dense_P]
      if first:  # a dense-row term may come in pieces; the encoder sees it once, empty
        encoder.add(t_lo, np.where(sel_T, 0, df_T), docs[~dense_P], w_P[~dense_P])
      if budget.limit_mb is not None:
        del idf_P, w_P, dense_P, docs, tf
        build_memory.release_freed_memory()
    encoded = encoder.finish()
    return cls(vocab=builder.vocab, meta=meta, postings_arrays=encoded, doc_lens_N=doc_lens,
               dense_terms_D=dense_terms, dense_DxN=dense_DxN,
               dense_max_D=dense_DxN.max(axis=1, initial=-np.inf))

  # ---- persistence ----

  def dense_range_max(self, r: int) -> np.ndarray:
    """Dense row r's max over each range of pruning.DENSE_RANGE docs (block-max bounds; cached)."""
    if r not in self._range_max:
      row = self.dense_DxN[r]
      self._range_max[r] = np.maximum.reduceat(row, np.arange(0, len(row), pruning.DENSE_RANGE))
    return self._range_max[r]

  @property
  def term_max_V(self) -> np.ndarray:
    """Each term's largest sparse impact: the MaxScore bounds."""
    return self.postings.term_max_V

  def _all_arrays(self) -> dict:
    return {**self.postings.arrays(), **{name: getattr(self, name) for name in self._ARRAYS}}

  def _save_postings(self, out_dir: str, postings_saved: bool = False):
    arrays = self._all_arrays()
    for name in self._ARRAYS if postings_saved else arrays:
      np.save(os.path.join(out_dir, f"{name}.npy"), np.asarray(arrays[name]))
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
      json.dump(list(self.vocab), f, ensure_ascii=False)  # dict order is term-id order
    with open(os.path.join(out_dir, "meta.json"), "w", encoding="utf-8") as f:
      json.dump({**self.meta, "has_store": self.store is not None}, f, indent=1)

  def save(self, out_dir: str):
    """Writes .npy arrays, vocab.json, meta.json and the document store (if any) into `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    if self.store is not None:
      self.store.save(out_dir)
    self._save_postings(out_dir)

  @classmethod
  def load(cls, index_dir: str, mmap: bool = True) -> "BM25Index":
    """Opens a saved index; with `mmap` the arrays stay on disk and pages are shared by processes."""
    meta_path = os.path.join(index_dir, "meta.json")
    if not os.path.exists(meta_path):
      raise FileNotFoundError(f"{index_dir} is not a BM25 index ({meta_path} missing); "
                              "build one with tools/build_index.py")
    with open(meta_path, encoding="utf-8") as f:
      meta = json.load(f)
    if meta.get("format") != FORMAT:
      raise ValueError(f"{meta_path}: index format {meta.get('format')!r}, this code reads "
                       f"{FORMAT!r}; rebuild the index with tools/build_index.py --corpus CORPUS "
                       f"--out {index_dir} (the demo index: python tools/fetch_assets.py)")
    names = block_postings.ARRAYS + cls._ARRAYS
    missing = [n for n in names if not os.path.exists(os.path.join(index_dir, f"{n}.npy"))]
    if missing:
      raise FileNotFoundError(f"{index_dir}: index arrays {missing} missing; rebuild the index")
    arrays = {name: np.load(os.path.join(index_dir, f"{name}.npy"), mmap_mode="r" if mmap else None)
              for name in names}
    with open(os.path.join(index_dir, "vocab.json"), encoding="utf-8") as f:
      vocab = {term: i for i, term in enumerate(json.load(f))}
    store = PassageStore.load(index_dir, mmap) if meta.pop("has_store") else None
    postings_arrays = {name: arrays.pop(name) for name in block_postings.ARRAYS}
    return cls(vocab=vocab, meta=meta, store=store, postings_arrays=postings_arrays, **arrays)

  # ---- scoring ----
  # Term-at-a-time: a query's postings slices (terms in ascending id order) are concatenated and
  # summed per doc with np.bincount in float64, then its dense-row terms are added in id order.
  # Candidate path (no O(N) work): score only the docs hit by the query's sparse terms, gathering the
  # dense-row terms at those docs. Any other doc holds only dense-row terms, so it scores at most
  # bound = Σ count·max(row); if ≥ k candidates beat the bound, the top k is exact. Otherwise (or
  # when the sparse postings are ≥ N/_DENSE_FRACTION, where sorting them costs more than O(N)) the
  # query gets a dense N-row and a vectorized top-k. Both paths add the same numbers in the same
  # order, so their scores are bit-identical.

  def _term_counts(self, queries) -> list[list[tuple[int, int]]]:
    """Per query: sorted (term id, count in query) over its known terms."""
    if isinstance(queries, str):
      raise TypeError("expected a list of queries, got a single str")
    out = []
    for query in queries:
      tokens = tokenize(query) if isinstance(query, str) else query
      counts = collections.Counter(self.vocab[t] for t in tokens if t in self.vocab)
      out.append(sorted(counts.items()))
    return out

  def _sparse_slices(self, terms: list[tuple[int, int]]):
    """(docs, weights·count) postings slices of the query's sparse (non-dense-row) terms."""
    docs, weights = [np.zeros(0, np.int32)], [np.zeros(0)]
    for t, count in terms:
      if t not in self._dense_row:
        d, w = self.postings.term(t)
        docs.append(d)
        # Repeated query terms count once per repeat (rank_bm25 loops over the query with repeats).
        weights.append(w if count == 1 else w * np.float64(count))
    return np.concatenate(docs), np.concatenate(weights)

  def _add_dense_terms(self, terms, s_N: np.ndarray, docs=None) -> float:
    """Adds the dense-row terms' scores (at `docs`, or all docs) into s_N; returns their max sum."""
    bound = 0.0
    for t, count in terms:
      if t in self._dense_row:
        r = self._dense_row[t]
        w = self.dense_DxN[r] if docs is None else self.dense_DxN[r, docs]
        s_N += w if count == 1 else w * np.float64(count)
        bound += float(self.dense_max_D[r]) * count
    return bound

  def _dense(self, queries: list[list[tuple[int, int]]]) -> np.ndarray:
    s_CxN = np.zeros((len(queries), self.num_docs))
    for row, terms in zip(s_CxN, queries):
      row[:] = np.bincount(*self._sparse_slices(terms), minlength=self.num_docs)
      self._add_dense_terms(terms, row)
    return s_CxN

  def get_scores(self, query_tokens: Sequence[str]) -> np.ndarray:
    """Dense float64 scores over all N documents for one tokenized query."""
    return self._dense(self._term_counts([list(query_tokens)]))[0]

  def _candidates_top_k(self, terms, k: int):
    """Exact top-k from the sparse terms' hit docs, or None when that cannot be proven."""
    sparse = [t for t, _ in terms if t not in self._dense_row]
    touched = sum(int(self.indptr_V1[t + 1] - self.indptr_V1[t]) for t in sparse)
    if not touched or touched * _DENSE_FRACTION >= self.num_docs:
      return None
    docs, weights = self._sparse_slices(terms)
    hits, inverse = np.unique(docs, return_inverse=True)
    sums = np.bincount(inverse, weights, minlength=len(hits))
    if len(sparse) == len(terms):  # other docs score exactly 0 (sparse impacts are all > 0)
      return top_k.of_hits(hits.astype(np.int64), sums, self.num_docs, k)
    bound = self._add_dense_terms(terms, sums, hits)
    above = sums > bound + 1e-9 * abs(bound)  # margin for float64 rounding of the bound's sum
    if np.count_nonzero(above) < k:
      return None
    return top_k.of_hits(hits[above].astype(np.int64), sums[above], self.num_docs, k)

  def search(self, queries: Sequence[str | Sequence[str]], k: int = 3, *,
             prune: bool = True) -> list[list[tuple[int, float]]]:
    """Top-k (doc index, score) per query, best first; ties and all-zero queries → lower index first.

    Strings are tokenized with `tokenize`; lists are used as given. An empty query (or one with no
    known term) returns docs 0..k-1 with score 0. `prune` scores the queries the candidate path
    cannot settle with exact MaxScore pruning (pruning.py) instead of all N docs; same results.
    """
    parsed = self._term_counts(queries)
    if k < 1:
      raise ValueError(f"k must be ≥ 1, got {k}")
    k = min(k, self.num_docs)
    out, dense = [], []
    for i, terms in enumerate(parsed):
      top = (np.arange(k), np.zeros(k)) if not terms else None
      prune_q = prune and terms and pruning.worth_pruning(self, terms, _DENSE_FRACTION)
      if prune_q:  # MaxScore first: it settles most queries the candidate path can, cheaper
        top = pruning.search_one(self, self.term_max_V, terms, k)
      if terms and top is None and not (prune_q and any(t in self._dense_row for t, _ in terms)):
        top = self._candidates_top_k(terms, k)
      out.append(None if top is None else list(zip(top[0].tolist(), top[1].tolist())))
      if top is None:
        dense.append(i)
    chunk = max(1, _DENSE_BUDGET // self.num_docs)
    for lo in range(0, len(dense), chunk):
      rows = dense[lo:lo + chunk]
      ids_Cxk, scores_Cxk = top_k.dense_rows(self._dense([parsed[i] for i in rows]), k)
      for i, ids, scores in zip(rows, ids_Cxk.tolist(), scores_Cxk.tolist()):
        out[i] = list(zip(ids, scores))
    return out

  def retrieve(self, queries: Sequence[str | Sequence[str]], k: int = 3) -> list[list[Doc]]:
    """Top-k documents per query (needs the document store)."""
    if self.store is None:
      raise ValueError("this index has no document store (built from tokens); use build() or "
                       "tools/build_index.py to index a corpus with its text")
    return [[Doc(i, *self.store.get(i), s) for i, s in hits] for hits in self.search(queries, k)]

  def retrieve_text(self, queries: Sequence[str], k: int = 3) -> list[str]:
    """Search-R1 passage text (`format_observation`) per query: what the rollout shows the model."""
    return [format_observation(docs) for docs in self.retrieve(queries, k)]
