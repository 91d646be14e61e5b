"""Search-R1 answer extraction, exact-match / F1 rewards, action parsing and the LLDS-MA answer mask.

Pure Python + NumPy. Semantics follow Search-R1's `qa_em.py` and `generation.py` (PAPER.md §D.3,
§D.5), applied to the *response* text only: Search-R1 decodes prompt + response and skips the first
`<answer>` match (the prompt's `<answer> Beijing </answer>` example); here the prompt is never part
of the text, so the last complete span of the response is the answer.
"""

import collections
import re
import string
from collections.abc import Sequence

import numpy as np

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ACTION_RE = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_PUNCT = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
  """SQuAD/Search-R1 normalisation: lowercase, drop ASCII punctuation and a/an/the, collapse spaces."""
  s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
  return " ".join(_ARTICLES_RE.sub(" ", s).split())


def _as_list(golds: str | Sequence[str]) -> list[str]:
  return [golds] if isinstance(golds, str) else [str(g) for g in golds]


def extract_answer(response_text: str) -> str | None:
  """Stripped content of the last complete `<answer>…</answer>`; None when there is none."""
  matches = _ANSWER_RE.findall(response_text)
  return matches[-1].strip() if matches else None


# What a trajectory is scored on (config.rl.reward_scope, tools/evaluate.py --reward_scope):
# "sampled" (default, DESIGN.md §Rewards): the model's own answer, the last complete span inside
# its sampled tokens (`rollout.model_answer`); "search_r1_text": Search-R1's `qa_em.py`, the last
# span of the whole response text, observations and the invalid-action message included, kept
# for parity only (a retrieved document holding `<answer>x</answer>` scores as if answered).
REWARD_SCOPES = ("sampled", "search_r1_text")


def scored_answer(model_answer: str | None, response_text: str, scope: str) -> str | None:
  """The answer a trajectory is scored on under `scope` (see REWARD_SCOPES)."""
  if scope == "sampled":
    return model_answer
  if scope == "search_r1_text":
    return extract_answer(response_text)
  raise ValueError(f"reward scope {scope!r} not in {REWARD_SCOPES}")


def em_of(answer: str | None, golds: str | Sequence[str]) -> float:
  """1.0 if the normalized `answer` equals any normalized gold, else 0.0 (None → 0)."""
  if answer is None:
    return 0.0
  pred = normalize_answer(answer)
  return float(any(pred == normalize_answer(g) for g in _as_list(golds)))


def f1_of(answer: str | None, golds: str | Sequence[str]) -> float:
  """Token F1 between the normalized `answer` and the best gold (None → 0)."""
  if answer is None:
    return 0.0
  pred = normalize_answer(answer).split()
  best = 0.0
  for gold in _as_list(golds):
    ref = normalize_answer(gold).split()
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common:
      precision, recall = common / len(pred), common / len(ref)
      best = max(best, 2 * precision * recall / (precision + recall))
  return best


def exact_match(response_text: str, golds: str | Sequence[str]) -> float:
  """1.0 if the normalized extracted answer equals any normalized gold, else 0.0 (no answer → 0)."""
  return em_of(extract_answer(response_text), golds)


def f1(response_text: str, golds: str | Sequence[str]) -> float:
  """Token F1 between the normalized extracted answer and the best gold (no answer → 0)."""
  return f1_of(extract_answer(response_text), golds)


def parse_action(text: str) -> tuple[str | None, str]:
  """First `<search>…</search>` or `<answer>…</answer>` of a turn → (kind, stripped content).

  kind is "search", "answer" or None (an invalid action, content "").
  """
  m = _ACTION_RE.search(text)
  return (m.group(1), m.group(2).strip()) if m else (None, "")


def truncate_action(text: str) -> str:
  """Search-R1 turn post-processing: cut after the first `</search>`, else after the first `</answer>`."""
  for tag in ("</search>", "</answer>"):
    cut = text.find(tag)
    if cut >= 0:
      return text[:cut + len(tag)]
  return text


def _token_char_spans(token_ids: Sequence[int], tokenizer) -> tuple[str, np.ndarray]:
  """Decoded text and each token's [start, end) char span in it (special tokens kept).

  Byte-level BPE can split one character over several tokens; those tokens decode to U+FFFD on their
  own, so consecutive tokens are merged until they decode cleanly and share the merged span.
  """
  kw = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
  ids = [int(t) for t in token_ids]
  text = tokenizer.decode(ids, **kw)
  pieces = tokenizer.batch_decode([[t] for t in ids], **kw)
  spans_Tx2 = np.zeros((len(ids), 2), np.int64)
  pos, i = 0, 0
  while i < len(ids):
    j, piece = i + 1, pieces[i]
    while "\ufffd" in piece and j < len(ids) and not text.startswith(piece, pos):
      j += 1
      piece = tokenizer.decode(ids[i:j], **kw)
    if not text.startswith(piece, pos):
      break
    spans_Tx2[i:j] = (pos, pos + len(piece))
    pos, i = pos + len(piece), j
  if i < len(ids) or pos != len(text):
    # Tokenizers whose pieces do not concatenate to the full decode (e.g. SentencePiece dropping
    # word-initial spaces): fall back to prefix decodes, O(T²) but exact.
    ends = [len(tokenizer.decode(ids[:t + 1], **kw)) for t in range(len(ids))]
    spans_Tx2[:, 1] = ends
    spans_Tx2[1:, 0] = ends[:-1]
    spans_Tx2[0, 0] = 0
  return text, spans_Tx2


def answer_token_mask(token_ids: Sequence[int], tokenizer,
                      tail_tokens: int | None = None) -> np.ndarray:
  """float32[T]: 0.0 on tokens overlapping the last complete `<answer>…</answer>` (tags included).

  `token_ids` is one unpadded response. `tail_tokens=50` reproduces the official code, which only
  looks for the answer in the last 50 tokens; None searches the whole response. No complete span
  → all ones. Used as the LLDS-MA weight pattern (β is applied where the mask is 0).
  """
  mask_T = np.ones(len(token_ids), np.float32)
  start = 0 if tail_tokens is None else max(0, len(token_ids) - tail_tokens)
  if start == len(token_ids):
    return mask_T
  text, spans_Tx2 = _token_char_spans(token_ids[start:], tokenizer)
  matches = list(_ANSWER_RE.finditer(text))
  if not matches:
    return mask_T
  lo, hi = matches[-1].span()
  hit = (spans_Tx2[:, 1] > lo) & (spans_Tx2[:, 0] < hi)
  mask_T[start:][hit] = 0.0
  return mask_T
