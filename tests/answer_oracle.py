"""Test oracle for the answer span: char-level decoding instead of token bytes.

`rewards.answer_span_mask` finds the last complete `<answer>…</answer>` in O(T) on token bytes;
this finds it the slow, obvious way (decode, regex on the text, map char spans back to tokens), so
tests can check one against the other. `tail_tokens` reproduces the official code's 50-token look.
"""

import re
from collections.abc import Sequence

import numpy as np


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
  matches = list(re.finditer(r"<answer>(.*?)</answer>", text, re.DOTALL))
  if not matches:
    return mask_T
  lo, hi = matches[-1].span()
  hit = (spans_Tx2[:, 1] > lo) & (spans_Tx2[:, 0] < hi)
  mask_T[start:][hit] = 0.0
  return mask_T
