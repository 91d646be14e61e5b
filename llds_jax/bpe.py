"""A Qwen2.5-like byte-level BPE tokenizer trained in-process, for tiny models and testbeds.

Like Qwen2.5's: NFC normalizer, Qwen2's pre-tokenizer split, byte-level BPE (any string encodes,
no unk), and the special tokens `<|endoftext|>` (pad), `<|im_start|>`, `<|im_end|>` (eos) as the
last three ids. Used by tests/testdata/make_tiny_tokenizer.py (the committed tiny tokenizer) and
tools/lld_experiment.py (the testbed's own vocabulary); nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterable

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen2's pre-tokenizer (also what hf_io gives a GGUF whose `tokenizer.ggml.pre` is qwen2):
# contractions, letter runs (with one leading non-letter), single digits, punctuation runs,
# newlines, and whitespace not followed by a non-space.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                 r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def train_bpe(texts: Iterable[str], vocab_size: int, chat_template: str, **hf_kwargs):
  """A `PreTrainedTokenizerFast` of `vocab_size` ids (specials included) fitted on `texts`."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
  from tokenizers import pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=vocab_size - len(SPECIALS), min_frequency=2, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
  hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", clean_up_tokenization_spaces=False,
                               **hf_kwargs)
  hf.chat_template = chat_template
  return hf
