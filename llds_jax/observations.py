"""Observation text → token ids: the `<information>` block around retrieved passages, the
invalid-action message, and their tokenization with special-token parsing off.

Shared by the rollout (what the policy attends to) and the format warm-up (`sft`), so both feed
an observation as the same ids.
"""

from __future__ import annotations

from collections.abc import Sequence

INFO_OPEN, INFO_CLOSE = "\n\n<information>", "</information>\n\n"
OBS_TRUNCATION = ("passages", "raw")
INVALID_ACTION = ("\nMy previous action is invalid. If I want to search, I should put the query "
                  "between <search> and </search>. If I want to give the final answer, I should "
                  "put the answer between <answer> and </answer>. Let me try again.\n")


def encode_observations(tokenizer, texts: Sequence[str], max_tokens: int,
                        truncation: str = "passages") -> list[list[int]]:
  """Observation ids (at most `max_tokens` each) with special-token parsing off.

  Special tokens are never parsed, so document text never becomes a control id. An information
  block longer than `max_tokens` keeps its closing `</information>\n\n` under
  `truncation="passages"`: the passages are cut to the room left after the closing tag's tokens.
  Why: a block that stops mid-document teaches the model to continue writing documents (Search-R1's
  raw cut, `truncation="raw"`, loses the tag for most long top-3 results). Other texts (the
  invalid-action message) are cut raw.
  """
  if truncation not in OBS_TRUNCATION:
    raise ValueError(f"observation truncation {truncation!r} not in {OBS_TRUNCATION} "
                     "(config.rollout.obs_truncation)")
  if not texts:
    return []
  encode = lambda xs: tokenizer(list(xs), add_special_tokens=False,  # noqa: E731
                                split_special_tokens=True)["input_ids"]
  out = [[int(t) for t in ids] for ids in encode(texts)]
  cut = [i for i, (text, ids) in enumerate(zip(texts, out))
         if len(ids) > max_tokens and truncation == "passages" and text.endswith(INFO_CLOSE)]
  if cut:
    open_ids, close_ids = encode([INFO_OPEN, INFO_CLOSE])
    room = max_tokens - len(close_ids)
    if room < len(open_ids):
      raise ValueError(f"max_obs_tokens={max_tokens} cannot hold the <information> tags "
                       f"({len(open_ids) + len(close_ids)} tokens) (config.rollout.max_obs_tokens)")
    heads = encode([texts[i][:-len(INFO_CLOSE)] for i in cut])
    for i, head in zip(cut, heads):
      out[i] = [int(t) for t in head[:room]] + [int(t) for t in close_ids]
  return [ids[:max_tokens] for ids in out]


def information_block(passages: str) -> str:
  """Search-R1 observation around the retrieved passages."""
  return f"{INFO_OPEN}{passages.strip()}{INFO_CLOSE}"
