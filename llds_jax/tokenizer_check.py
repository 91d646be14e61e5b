"""Which tokenizer a policy runs with, and the checks that it fits the model.

Every loader path goes through `policy.load` (the trainer, `restore`, tools/evaluate.py and
tools/real_run.py), which ends in `policy_tokenizer`, so a model never silently runs with a
tokenizer that is not its own:

* A model that carries a tokenizer (a GGUF file, or a HF directory with tokenizer files) and a
  `model.tokenizer` naming a different one is refused with both sources named, unless
  `model.allow_tokenizer_mismatch` says so. A copy of the same tokenizer elsewhere is fine.
* Special ids (eos, pad, bos, and every added token such as the chat markers) must be rows of the
  embedding, and eos / pad / bos must agree with the model config where both set them (the
  override lifts only this agreement). Why: an id past the embedding is a gather out of range
  (silently clamped under jit), and an eos the model was not trained to emit makes every turn run
  to its token limit.
"""

from __future__ import annotations

import os

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
_AGREE = ("eos_token_id", "pad_token_id", "bos_token_id")


def carries_tokenizer(model_path: str) -> bool:
  """Whether `model_path` (GGUF file or HF directory) holds its own tokenizer."""
  if model_path.endswith(".gguf"):
    return True
  return bool(model_path) and any(os.path.isfile(os.path.join(model_path, f))
                                  for f in TOKENIZER_FILES)


def _same_path(a: str, b: str) -> bool:
  return os.path.realpath(a) == os.path.realpath(b)


def difference(a, b) -> str | None:
  """Why tokenizers `a` and `b` encode differently (vocabulary or special ids), or None."""
  va, vb = a.get_vocab(), b.get_vocab()
  if len(va) != len(vb):
    return f"{len(va)} vs {len(vb)} tokens"
  moved = sum(va.get(t) != i for t, i in vb.items())
  if moved:
    return f"{moved} of {len(va)} tokens have other ids"
  for name in _AGREE:
    if getattr(a, name) != getattr(b, name):
      return f"{name} {getattr(a, name)} vs {getattr(b, name)}"
  return None


def check_special_ids(tokenizer, cfg, source: str, *, agree: bool = True) -> None:
  """Special and added-token ids inside the embedding; eos/pad/bos as the model config says."""
  if len(tokenizer) > cfg.vocab_size:
    raise ValueError(f"tokenizer {source} has {len(tokenizer)} tokens but the model vocab is "
                     f"{cfg.vocab_size}")
  ids = {f"{name} ({getattr(tokenizer, name.replace('_id', ''))!r})": getattr(tokenizer, name)
         for name in _AGREE}
  ids.update({f"added token {t.content!r}": i for i, t in tokenizer.added_tokens_decoder.items()})
  for what, i in ids.items():
    if i is not None and not 0 <= i < cfg.vocab_size:
      raise ValueError(f"tokenizer {source}: {what} has id {i}, outside the model's embedding "
                       f"of {cfg.vocab_size} rows")
  for name in _AGREE if agree else ():
    ours, model = getattr(tokenizer, name), getattr(cfg, name)
    allowed = model if isinstance(model, tuple) else (model,)
    if ours is not None and model is not None and ours not in allowed:
      raise ValueError(f"tokenizer {source}: {name}={ours} disagrees with the model config's "
                       f"{name}={model} (config.model.allow_tokenizer_mismatch=True overrides)")


def policy_tokenizer(cfg, model_path: str, tokenizer_path: str = "", *, carried=None,
                     allow_mismatch: bool = False, field: str = "config.model.tokenizer"):
  """The checked tokenizer for a model at `model_path` ("" = random init).

  `carried` is the tokenizer already read from the model file (GGUF); a HF directory's own is read
  here. `tokenizer_path` ("" = the model's own) is what the run config names in `field`.
  """
  from transformers import AutoTokenizer

  if tokenizer_path and model_path and _same_path(tokenizer_path, model_path):
    tokenizer_path = ""
  if carried is None and carries_tokenizer(model_path) and not model_path.endswith(".gguf"):
    carried = AutoTokenizer.from_pretrained(model_path)
  if not tokenizer_path:
    if carried is None:
      raise ValueError(f"{field} is empty and {model_path or 'the random-init model'!r} carries no "
                       "tokenizer: name a tokenizer directory")
    check_special_ids(carried, cfg, f"of {model_path}", agree=not allow_mismatch)
    return carried
  if not os.path.exists(tokenizer_path):
    raise FileNotFoundError(f"{field}={tokenizer_path!r}: no such directory")
  named = AutoTokenizer.from_pretrained(tokenizer_path)
  why = None if carried is None else difference(named, carried)
  if why and not allow_mismatch:
    raise ValueError(
        f"{field}={tokenizer_path!r} differs from the tokenizer that {model_path!r} carries "
        f"({why}): the model would read ids it was not trained on. Leave {field} empty to use "
        "the model's own, or set config.model.allow_tokenizer_mismatch=True to override")
  check_special_ids(named, cfg, repr(tokenizer_path), agree=not allow_mismatch)
  return named
