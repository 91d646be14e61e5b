"""Search-R1 answer extraction, exact-match / F1 rewards, action parsing, and the model's own
answer span in a row's tokens (what is scored, and the LLDS-MA answer mask).

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
_ANSWER_SPAN = re.compile(rb"<answer>.*?</answer>", re.DOTALL)  # _ANSWER_RE on token bytes
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
# its sampled tokens (`model_answer`); "search_r1_text": Search-R1's `qa_em.py`, the last
# span of the whole response text, observations and the invalid-action message included, kept
# for parity only (a retrieved document holding `<answer>x</answer>` scores as if answered).
REWARD_SCOPES = ("sampled", "search_r1_text")


def scored_answer(own_answer: str | None, response_text: str, scope: str) -> str | None:
  """The answer a trajectory is scored on under `scope` (see REWARD_SCOPES); `own_answer` is
  `model_answer`'s."""
  if scope == "sampled":
    return own_answer
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


def answer_span_mask(ids: Sequence[int], tok_bytes: Sequence[bytes]) -> np.ndarray:
  """float32: 1 on tokens overlapping the last complete `<answer>…</answer>` (tags included).

  The span `extract_answer` reads, found in O(T) on token bytes (special tokens are empty,
  and never contain the tags) instead of by decoding token by token.
  """
  lens = np.array([len(tok_bytes[t]) for t in ids], np.int64)
  ends = np.cumsum(lens)
  spans = list(_ANSWER_SPAN.finditer(b"".join(tok_bytes[t] for t in ids)))
  if not spans:
    return np.zeros(len(ids), np.float32)
  lo, hi = spans[-1].span()
  return ((ends > lo) & (ends - lens < hi)).astype(np.float32)


def model_answer(ids: Sequence[int], mask: Sequence[float],
                 tok_bytes: Sequence[bytes]) -> tuple[np.ndarray, str | None]:
  """(answer_mask, answer) of the last complete answer span inside one run of sampled tokens.

  Only the model's own text counts (DESIGN.md §Rewards): each maximal run of `mask` = 1 is one
  turn's sampled tokens, searched on its own, so a span quoted in a retrieved document, or one
  joined across an inserted observation or the invalid-action message, is never the answer.
  answer_mask is 1 on that span's tokens; answer is its stripped text (None: never answered).
  """
  mask_T = np.asarray(mask, np.float32)
  edges = np.flatnonzero(np.diff(np.concatenate([[0], (mask_T > 0).astype(np.int8), [0]])))
  out_T = np.zeros(len(ids), np.float32)
  for start, stop in reversed(list(zip(edges[::2], edges[1::2]))):
    run = [int(t) for t in ids[start:stop]]
    out_T[start:stop] = answer_span_mask(run, tok_bytes)
    if out_T.any():
      text = b"".join(tok_bytes[t] for t in run)
      span = list(_ANSWER_SPAN.finditer(text))[-1].group()
      return out_T, span[len(b"<answer>"):-len(b"</answer>")].decode("utf-8", "replace").strip()
  return out_T, None
