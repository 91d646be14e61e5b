"""Search-R1 QA data: parquet rows → examples, the prompt template, and the prompt batches.

The retrieval corpus is corpus.py's and the demo-asset layout assets.py's.

Group ids. GRPO groups the G rollouts of one prompt. The official code groups by
`extra_info.index`, which restarts at 0 for each data source of a merged file, so NQ #i and
HotpotQA #i share a group (PAPER.md §C). Here every loaded example gets `uid` = its position in the
loaded list, and `load_examples` rejects duplicate (data_source, extra_info.split, extra_info.index)
keys, so uid is a bijection with that key and no two prompts ever share a group.
"""

import dataclasses
from collections.abc import Iterator, Sequence

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
