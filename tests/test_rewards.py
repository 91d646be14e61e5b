"""Rewards: Search-R1 normalisation / EM / F1 tables, action parsing, and the answer-span token mask."""

import os

import numpy as np
import pytest
import transformers

import answer_oracle
from llds_jax import rewards

TOKENIZER_DIR = os.path.join(os.path.dirname(__file__), "testdata", "tiny_tokenizer")


@pytest.fixture(scope="module")
def tok():
  return transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.mark.parametrize("raw,normalized", [
    ("The Eiffel Tower", "eiffel tower"),
    ("  A  cat,\tan apple!\n", "cat apple"),
    ("U.S.A.", "usa"),
    ("rock-n-roll", "rocknroll"),
    ("Theater of the Absurd", "theater of absurd"),  # articles only as whole words
    ("the", ""),
    ("Café ÉCOLE", "café école"),  # unicode letters kept and lowercased
    ("“Quoted” — text", "“quoted” — text"),  # only ASCII punctuation is removed, as in Search-R1
    ("8,611 m", "8611 m"),
])
def test_normalize_answer(raw, normalized):
  assert rewards.normalize_answer(raw) == normalized


@pytest.mark.parametrize("response,answer", [
    ("<think>x</think><answer> Paris </answer>", "Paris"),
    ("<answer>Lyon</answer> then <answer> Paris</answer>", "Paris"),  # last wins
    ("<answer>Lyon</answer> then <answer> Paris", "Lyon"),  # unclosed last tag is ignored
    ("<answer> Paris", None),
    ("no tags at all", None),
    ("<answer></answer>", ""),
    ("<answer>\nNew\nYork\n</answer>", "New\nYork"),
    ("<ANSWER>Paris</ANSWER>", None),  # tags are case-sensitive, as in Search-R1
])
def test_extract_answer(response, answer):
  assert rewards.extract_answer(response) == answer


@pytest.mark.parametrize("response,golds,em", [
    ("<answer> the Eiffel Tower. </answer>", ["Eiffel Tower"], 1.0),
    ("<answer>PARIS</answer>", "paris", 1.0),
    ("<answer>Lyon</answer><answer>Paris</answer>", ["London", "Paris"], 1.0),
    ("<answer>Paris</answer><answer>Lyon</answer>", ["Paris"], 0.0),  # only the last answer counts
    ("<answer>Paris, France</answer>", ["Paris"], 0.0),
    ("Paris", ["Paris"], 0.0),  # no answer tag
    ("<answer> </answer>", ["Paris"], 0.0),
    ("<answer>Paris</answer>", [], 0.0),
    ("<answer>1631</answer>", [1631], 1.0),  # non-string golds are compared as text
])
def test_exact_match(response, golds, em):
  assert rewards.exact_match(response, golds) == em


def test_f1():
  assert rewards.f1("<answer>the Eiffel Tower Paris</answer>", ["Eiffel Tower"]) == pytest.approx(0.8)
  assert rewards.f1("<answer>Eiffel Tower</answer>", ["Paris", "the Eiffel Tower"]) == 1.0
  assert rewards.f1("<answer>tower tower</answer>", ["tower"]) == pytest.approx(2 / 3)
  assert rewards.f1("<answer>London</answer>", ["Paris"]) == 0.0
  assert rewards.f1("no answer", ["Paris"]) == 0.0
  assert rewards.f1("<answer>the</answer>", ["Paris"]) == 0.0


@pytest.mark.parametrize("text,action", [
    ("<think>hm</think>\n<search> capital of France </search>", ("search", "capital of France")),
    ("<search>q1</search><answer>a</answer>", ("search", "q1")),
    ("<answer> Paris </answer><search>q</search>", ("answer", "Paris")),
    ("<search>\nmulti\nline </search>", ("search", "multi\nline")),
    ("<search> q </answer>", (None, "")),
    ("just thinking", (None, "")),
])
def test_parse_action(text, action):
  assert rewards.parse_action(text) == action


def test_truncate_action_checks_search_first():
  assert rewards.truncate_action("<search>q</search> tail </answer>") == "<search>q</search>"
  assert rewards.truncate_action("<answer>a</answer> more <answer>b</answer>") == "<answer>a</answer>"
  # Search-R1 cuts at </search> even when an answer closed earlier.
  assert rewards.truncate_action("<answer>a</answer><search>q</search>x") == \
      "<answer>a</answer><search>q</search>"
  assert rewards.truncate_action("open ended") == "open ended"


@pytest.mark.parametrize("response,span", [
    ("<think> It is Paris. </think>\n<answer> Paris </answer>", "<answer> Paris </answer>"),
    ("<answer>Lyon</answer> wait\n<answer>Paris</answer><|im_end|>", "<answer>Paris</answer>"),
    ("<think>東京?</think><answer> 東京都 </answer> trailing", "<answer> 東京都 </answer>"),
])
def test_answer_token_mask_covers_last_span(tok, response, span):
  ids = tok.encode(response, add_special_tokens=False)
  mask = answer_oracle.answer_token_mask(ids, tok)
  assert mask.dtype == np.float32 and mask.shape == (len(ids),)
  # Reference spans from prefix decodes: token i covers [len(decode(ids[:i])), len(decode(ids[:i+1]))).
  ends = np.array([len(tok.decode(ids[:i + 1])) for i in range(len(ids))])
  starts = np.concatenate([[0], ends[:-1]])
  lo = response.rindex(span)
  expected = np.where((ends > lo) & (starts < lo + len(span)), 0.0, 1.0)
  np.testing.assert_array_equal(mask, expected)
  zeros = np.flatnonzero(mask == 0)
  assert span in tok.decode(ids[zeros[0]:zeros[-1] + 1])


def test_answer_token_mask_multibyte_characters_split_over_tokens(tok):
  ids = tok.encode("<answer> 東京都 </answer>", add_special_tokens=False)
  assert any("\ufffd" in tok.decode([t]) for t in ids)  # the merge path is exercised
  assert np.all(answer_oracle.answer_token_mask(ids, tok) == 0.0)


def test_answer_token_mask_no_span_and_tail(tok):
  for text in ("<answer> Paris", "no answer here", ""):
    ids = tok.encode(text, add_special_tokens=False)
    assert np.all(answer_oracle.answer_token_mask(ids, tok) == 1.0)
  text = "<answer> Paris </answer>" + " filler words" * 30
  ids = tok.encode(text, add_special_tokens=False)
  assert np.all(answer_oracle.answer_token_mask(ids, tok, tail_tokens=50) == 1.0)  # span is outside the tail
  assert np.any(answer_oracle.answer_token_mask(ids, tok) == 0.0)
  text = " filler words" * 30 + "<answer> Paris </answer>"
  ids = tok.encode(text, add_special_tokens=False)
  np.testing.assert_array_equal(answer_oracle.answer_token_mask(ids, tok, tail_tokens=50),
                                answer_oracle.answer_token_mask(ids, tok))


class _SentencePieceLike:
  """Decodes single tokens without their leading space, like SentencePiece, to force the fallback."""
  pieces = [" <answer>", " Paris", " </answer>", " ok", "."]

  def decode(self, ids, **_):
    return "".join(self.pieces[i] for i in ids)

  def batch_decode(self, seqs, **_):
    return [self.decode(s).lstrip() for s in seqs]


def test_answer_token_mask_prefix_fallback():
  mask = answer_oracle.answer_token_mask([3, 0, 1, 2, 4], _SentencePieceLike())
  assert mask.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]
