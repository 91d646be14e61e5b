"""Search-R1 data on disk: QA parquet + prompt template, corpus jsonl + document store, demo assets.

Group ids. GRPO groups the G rollouts of one prompt. The official code groups by
`extra_info.index`, which restarts at 0 for each data source of a merged file, so NQ #i and
HotpotQA #i share a group (PAPER.md §C). Here every loaded example gets `uid` = its position in the
loaded list, and `load_examples` rejects duplicate (data_source, extra_info.split, extra_info.index)
keys, so uid is a bijection with that key and no two prompts ever share a group.
"""

import array
import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from llds_jax.rewards import normalize_answer

# PAPER.md §D.2, verbatim (including the original "as your want"); one line plus "\n".
SEARCH_R1_TEMPLATE = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first every "
    "time you get new information. After reasoning, if you find you lack some knowledge, you can call "
    "a search engine by <search> query </search> and it will return the top searched results between "
    "<information> and </information>. You can search as many times as your want. If you find no "
    "further external knowledge needed, you can directly provide the answer inside <answer> and "
    "</answer>, without detailed illustrations. For example, <answer> Beijing </answer>. "
    "Question: {question}\n")

_REQUIRED = ("data_source", "reward_model", "extra_info")


def make_prompt(question: str) -> str:
  """The Search-R1 user prompt: question stripped, '?' appended if missing, inserted in the template."""
  question = question.strip()
  if not question:
    raise ValueError("empty question")
  if question[-1] != "?":
    question += "?"
  return SEARCH_R1_TEMPLATE.format(question=question)


@dataclasses.dataclass(frozen=True)
class Example:
  """One prompt: chat messages, gold answers and its group identity."""
  data_source: str
  messages: list  # [{"role": ..., "content": ...}, ...]
  golds: list  # list[str]
  index: int  # extra_info.index (row within its data source)
  question: str | None
  uid: int  # unique group id of this prompt (see module docstring)


def _field(row: dict, dotted: str, path: str, row_no: int):
  value = row
  for key in dotted.split("."):
    if not isinstance(value, dict) or value.get(key) is None:
      raise ValueError(f"{path}: row {row_no}: missing field '{dotted}'")
    value = value[key]
  return value


def _golds(value, path: str, row_no: int) -> list[str]:
  """The row's gold answers; anything that cannot be an answer raises naming file and row."""
  golds = [value] if isinstance(value, str) else value
  if not isinstance(golds, (list, tuple, np.ndarray)) or len(golds) == 0:
    raise ValueError(f"{path}: row {row_no}: reward_model.ground_truth.target={value!r}: needs "
                     "a non-empty list of gold answer strings")
  for g in golds:
    # An empty gold (or one of only punctuation/articles) normalizes to "" and would reward
    # answers like "<answer> the </answer>"; NaN/None/numbers are not answers either.
    if not isinstance(g, str) or not normalize_answer(g):
      raise ValueError(f"{path}: row {row_no}: reward_model.ground_truth.target holds {g!r}: "
                       "every gold must be a string with a word in it")
  return list(golds)


def load_examples(paths: str | Sequence[str]) -> list[Example]:
  """Reads Search-R1 parquet files (DESIGN.md §Data); missing columns/fields raise naming them."""
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  examples, seen = [], {}
  for path in [paths] if isinstance(paths, str) else paths:
    table = pq.read_table(path)
    if table.num_rows == 0:
      raise ValueError(f"{path}: no rows (an empty data file)")
    columns = set(table.column_names)
    for name in _REQUIRED:
      if name not in columns:
        raise ValueError(f"{path}: missing column '{name}' (columns: {sorted(columns)})")
    if "prompt" not in columns and "question" not in columns:
      raise ValueError(f"{path}: missing column 'prompt' (or 'question' to build it from); "
                       f"columns: {sorted(columns)}")
    for row_no, row in enumerate(table.to_pylist()):
      golds = _golds(_field(row, "reward_model.ground_truth.target", path, row_no), path, row_no)
      index = int(_field(row, "extra_info.index", path, row_no))
      source = str(_field(row, "data_source", path, row_no))
      question = row.get("question")
      messages = row.get("prompt")
      if messages is None:
        if question is None:
          raise ValueError(f"{path}: row {row_no}: neither 'prompt' nor 'question' is set")
        if not isinstance(question, str) or not question.strip():
          raise ValueError(f"{path}: row {row_no}: empty question {question!r}")
        messages = [{"role": "user", "content": make_prompt(question)}]
      if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{path}: row {row_no}: 'prompt' has no chat messages ({messages!r})")
      for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not m.get("role"):
          raise ValueError(f"{path}: row {row_no}: 'prompt' message {m!r} needs a role and a "
                           "string content")
      if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        raise ValueError(f"{path}: row {row_no}: 'prompt' has no non-empty user message")
      messages = [{"role": m["role"], "content": m["content"]} for m in messages]
      key = (source, (row.get("extra_info") or {}).get("split"), index)
      if key in seen:
        raise ValueError(f"{path}: row {row_no}: duplicate (data_source, extra_info.split, "
                         f"extra_info.index) = {key}, "
                         f"first seen at {seen[key]}; group ids would collide")
      seen[key] = f"{path} row {row_no}"
      examples.append(Example(source, messages, golds, index, question, len(examples)))
  return examples


def encode_prompt(messages: Sequence[dict], tokenizer) -> list[int]:
  """Chat-templated prompt ids with the assistant generation header appended."""
  # return_dict=True makes transformers 4 and 5 agree (5 defaults to a BatchEncoding, 4 to a list).
  enc = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True,
                                      return_dict=True)
  return [int(t) for t in enc["input_ids"]]


def check_prompt_lengths(examples: Sequence[Example], tokenizer, max_tokens: int,
                         field: str) -> None:
  """Raises naming the first example whose encoded prompt exceeds `max_tokens`.

  Run once over the whole file before any work: otherwise an over-long question surfaces only
  when a shuffled batch reaches it, possibly hours into a run.
  """
  for ex in examples:
    n = len(encode_prompt(ex.messages, tokenizer))
    if n > max_tokens:
      raise ValueError(f"{field}: question {ex.uid} (data_source {ex.data_source!r}, "
                       f"extra_info.index {ex.index}) is {n} prompt tokens, over "
                       f"config.rollout.max_prompt_tokens={max_tokens}")


def repeat_groups(batch: Sequence[Example], group_size: int) -> tuple[list[Example], np.ndarray]:
  """Each prompt repeated G times consecutively (as verl does) and the matching group ids [B·G]."""
  rows = [ex for ex in batch for _ in range(group_size)]
  return rows, np.array([ex.uid for ex in rows], np.int64)


class PromptIterator:
  """Endless batches over deterministic per-epoch shuffles, with a resumable (epoch, position) cursor.

  Epoch e uses the permutation of `np.random.default_rng([seed, e])`, so a restored cursor yields
  exactly the batches an uninterrupted run would have.
  """

  def __init__(self, examples: Sequence[Example], batch_size: int, seed: int = 0, *,
               shuffle: bool = True, drop_last: bool = True):
    if batch_size < 1:
      raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    if not examples:
      raise ValueError("PromptIterator needs at least one example")
    if drop_last and batch_size > len(examples):
      raise ValueError(f"batch_size {batch_size} with drop_last needs at least that many examples, "
                       f"got {len(examples)}")
    self.examples, self.batch_size, self.seed = list(examples), batch_size, seed
    self.shuffle, self.drop_last = shuffle, drop_last
    self.epoch, self.position = 0, 0

  def _order(self, epoch: int) -> np.ndarray:
    n = len(self.examples)
    return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

  def state(self) -> dict:
    """JSON-able cursor: the next batch starts at `position` of epoch `epoch`'s order."""
    return {"epoch": self.epoch, "position": self.position}

  def restore(self, state: dict):
    """Moves the cursor to a `state()` taken earlier."""
    epoch, position = int(state["epoch"]), int(state["position"])
    if not 0 <= position <= len(self.examples) or epoch < 0:
      raise ValueError(f"invalid iterator state {state} for {len(self.examples)} examples")
    self.epoch, self.position = epoch, position

  def __iter__(self) -> Iterator[list[Example]]:
    return self

  def __next__(self) -> list[Example]:
    n = len(self.examples)
    remaining = n - self.position
    if remaining <= 0 or (self.drop_last and remaining < self.batch_size):
      self.epoch, self.position = self.epoch + 1, 0
    order = self._order(self.epoch)
    take = order[self.position:self.position + self.batch_size]
    self.position += len(take)
    return [self.examples[i] for i in take]


# ---- retrieval corpus: Search-R1 jsonl in, id/contents blobs out ----


def iter_jsonl(path: str) -> Iterator[tuple[int, Any]]:
  """(1-based line number, value) per non-blank line; invalid JSON raises naming file and line."""
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{line_no}: not UTF-8 (byte {raw[e.start]:#04x} at column "
                         f"{e.start + 1})") from None
      if not line.strip():
        continue
      try:
        yield line_no, json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_no}: invalid JSON: {e.msg} (column {e.colno})") from None


def read_corpus(path: str) -> Iterator[tuple[str, str]]:
  """Streams (id, contents) from a Search-R1 corpus jsonl; bad rows raise naming file and line.

  Duplicate ids raise too: a retrieved passage must name one document.
  """
  seen = {}
  for line_no, row in iter_jsonl(path):
    if not isinstance(row, dict) or "contents" not in row:
      raise ValueError(f"{path}:{line_no}: row has no 'contents' field")
    if not isinstance(row["contents"], str):
      raise ValueError(f"{path}:{line_no}: 'contents' is {type(row['contents']).__name__}, not str")
    # A missing id falls back to the 0-based line number (Search-R1 corpora always have one).
    doc_id = str(row.get("id", line_no - 1))
    first = seen.setdefault(doc_id, line_no)
    if first != line_no:
      raise ValueError(f"{path}:{line_no}: duplicate document id {doc_id!r} (first at line {first})")
    yield doc_id, row["contents"]


class DocStore:
  """Document ids and contents as utf-8 blobs + int64 offsets; memory-mapped when loaded from disk."""
  NAMES = ("ids", "contents")

  def __init__(self, blobs: dict, offsets: dict):
    self._blobs, self._offsets = blobs, offsets

  def __len__(self) -> int:
    return len(self._offsets["ids"]) - 1

  def _get(self, name: str, i: int) -> str:
    lo, hi = self._offsets[name][i], self._offsets[name][i + 1]
    return bytes(self._blobs[name][lo:hi]).decode("utf-8")

  def get(self, i: int) -> tuple[str, str]:
    """(id, contents) of document i."""
    return self._get("ids", i), self._get("contents", i)

  def save(self, out_dir: str):
    """Writes the blobs and offsets into `out_dir`."""
    for name in self.NAMES:
      with open(os.path.join(out_dir, f"doc_{name}.bin"), "wb") as f:
        f.write(memoryview(np.ascontiguousarray(self._blobs[name])))
      np.save(os.path.join(out_dir, f"doc_{name}_offsets.npy"), np.asarray(self._offsets[name]))

  @classmethod
  def load(cls, index_dir: str, mmap: bool = True) -> "DocStore":
    """Opens the store saved in `index_dir` (memory-mapped unless `mmap=False`)."""
    blobs, offsets = {}, {}
    for name in cls.NAMES:
      path = os.path.join(index_dir, f"doc_{name}.bin")
      # np.memmap refuses empty files (all strings empty), so those are read instead.
      use_mmap = mmap and os.path.getsize(path)
      blobs[name] = np.memmap(path, np.uint8, mode="r") if use_mmap else np.fromfile(path, np.uint8)
      offsets[name] = np.load(path.replace(".bin", "_offsets.npy"), mmap_mode="r" if mmap else None)
    return cls(blobs, offsets)


class DocStoreWriter:
  """Streams documents into a DocStore: files in `out_dir` (text never held in memory), or memory."""

  def __init__(self, out_dir: str | None = None):
    self.out_dir = out_dir
    self._files = {n: open(os.path.join(out_dir, f"doc_{n}.bin"), "wb") if out_dir else io.BytesIO()
                   for n in DocStore.NAMES}
    self._offsets = {n: array.array("q", [0]) for n in DocStore.NAMES}

  def add(self, doc_id: str, contents: str):
    """Appends one document."""
    for name, value in (("ids", doc_id), ("contents", contents)):
      written = self._files[name].write(value.encode("utf-8"))
      self._offsets[name].append(self._offsets[name][-1] + written)

  def close(self) -> DocStore:
    """Finishes writing and returns the store (memory-mapped when written to disk)."""
    offsets = {n: np.asarray(o) for n, o in self._offsets.items()}
    if self.out_dir is None:
      blobs = {n: np.frombuffer(f.getvalue(), np.uint8) for n, f in self._files.items()}
      return DocStore(blobs, offsets)
    for name, f in self._files.items():
      f.close()
      np.save(os.path.join(self.out_dir, f"doc_{name}_offsets.npy"), offsets[name])
    return DocStore.load(self.out_dir)


# ---- demo assets (tools/fetch_assets.py writes them) ----

QWEN_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
_ASSET_LAYOUT = {
    "qwen_gguf": "models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    "smollm_gguf": "models/smollm2-135m-instruct.q4_1.gguf",
    "wiki_corpus": "data/wiki_summaries/corpus.jsonl",
    "wiki_index": "data/wiki_summaries/bm25_okapi",
    "fanoutqa_train": "data/fanoutqa/train.parquet",
    "fanoutqa_test": "data/fanoutqa/test.parquet",
    "fanoutqa_answerable": "data/fanoutqa/answerable.parquet",
}


def file_sha256(path: str) -> str:
  """Hex sha256 of a file, read in 16 MiB blocks (assets, checkpoint manifests)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
      h.update(block)
  return h.hexdigest()


def default_asset_dir() -> str:
  """$LLDS_ASSETS, else ~/.cache/llds_jax."""
  home_cache = os.path.join(os.path.expanduser("~"), ".cache", "llds_jax")
  return os.environ.get("LLDS_ASSETS") or home_cache


def asset_paths(dest: str | None = None, *, require: Sequence[str] | None = None) -> dict[str, str]:
  """Absolute paths of the demo assets; missing required ones (default: all) raise with the fix."""
  root = os.path.abspath(dest or default_asset_dir())
  paths = {name: os.path.join(root, rel) for name, rel in _ASSET_LAYOUT.items()}
  unknown = set(require or ()) - set(paths)
  if unknown:
    raise KeyError(f"unknown assets {sorted(unknown)}; known: {sorted(paths)}")
  # An index directory only counts once its meta.json (written last) exists.
  present = lambda n: os.path.exists(os.path.join(paths[n], "meta.json") if n.endswith("_index")
                                     else paths[n])
  missing = [n for n in (paths if require is None else require) if not present(n)]
  if missing:
    raise FileNotFoundError(f"demo assets missing under {root}: {', '.join(missing)}; run "
                            f"`python tools/fetch_assets.py --dest {root}` first")
  return paths
