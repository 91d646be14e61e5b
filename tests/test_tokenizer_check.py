"""No silent tokenizer mismatch: every loader path refuses a tokenizer that is not the model's."""

import os
import sys

import pytest
import tool_loader
import transformers
from flax import nnx

from llds_jax import hf_io, policy, restore, sharding, tokenizer_check
from llds_jax.model import ModelConfig, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "tests", "testdata", "tiny_tokenizer")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """A HF model directory that carries the tiny tokenizer, a copy of it, and a different one."""
  root = tmp_path_factory.mktemp("tok")
  tok = transformers.AutoTokenizer.from_pretrained(TOKENIZER)
  cfg = ModelConfig(vocab_size=1024, hidden_size=16, intermediate_size=16, num_layers=1,
                    num_heads=2, num_kv_heads=1, head_dim=8, eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id)
  hf_io.save_pretrained(Transformer(cfg, rngs=nnx.Rngs(0)), cfg, str(root / "model"), tokenizer=tok)
  tok.save_pretrained(str(root / "copy"))
  tok.add_tokens(["<extra>"])
  tok.save_pretrained(str(root / "other"))
  return {k: str(root / k) for k in ("model", "copy", "other")}


def _config(**model):
  sys.path.insert(0, ROOT)
  from configs import tiny
  c = tiny.get_config()
  c.model.update(model)
  return c


def _load(c):
  return policy.load(c, sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}))


def test_named_tokenizer_other_than_the_models_own_is_refused(dirs):
  with pytest.raises(ValueError, match=f"{dirs['other']}.*differs.*{dirs['model']}.*1001 vs 1000"):
    _load(_config(path=dirs["model"], tokenizer=dirs["other"]))
  _, _, tok = _load(_config(path=dirs["model"], tokenizer=dirs["other"],
                            allow_tokenizer_mismatch=True))
  assert len(tok) == 1001  # the explicit override is honoured
  for named in ("", dirs["copy"], dirs["model"]):  # the model's own, wherever it is named from
    _, _, tok = _load(_config(path=dirs["model"], tokenizer=named))
    assert len(tok) == 1000


def test_gguf_carried_tokenizer_wins_over_a_named_one(dirs):
  # What policy.load does for a GGUF: its tokenizer comes from the file (`carried`).
  carried = transformers.AutoTokenizer.from_pretrained(dirs["other"])
  cfg = ModelConfig(vocab_size=1024, hidden_size=16, intermediate_size=16, num_layers=1,
                    num_heads=2, num_kv_heads=1, head_dim=8)
  with pytest.raises(ValueError, match=f"{TOKENIZER}.*differs.*model.gguf"):
    tokenizer_check.policy_tokenizer(cfg, "/x/model.gguf", TOKENIZER, carried=carried)
  assert tokenizer_check.policy_tokenizer(cfg, "/x/model.gguf", "", carried=carried) is carried


def test_special_ids_outside_the_embedding_or_disagreeing_are_refused(dirs, tmp_path):
  from tokenizers import Tokenizer, models
  # Three tokens, but the chat marker's id is past the 1000-row embedding of the random model.
  sparse = transformers.PreTrainedTokenizerFast(
      tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1, "<|im_end|>": 1500},
                                                  unk_token="<unk>")),
      eos_token="<|im_end|>", unk_token="<unk>")
  sparse.save_pretrained(str(tmp_path / "sparse"))
  with pytest.raises(ValueError, match="eos_token_id \\('<\\|im_end\\|>'\\) has id 1500, outside"):
    _load(_config(tokenizer=str(tmp_path / "sparse")))
  # The model's config says eos is 5; the tokenizer ends turns with 999.
  c = _config(tokenizer=dirs["copy"])
  c.model.random.eos_token_id = 5
  with pytest.raises(ValueError, match="eos_token_id=999 disagrees.*eos_token_id=5"):
    _load(c)
  c.model.allow_tokenizer_mismatch = True  # lifts the agreement, never the embedding range
  assert _load(c)[2].eos_token_id == 999
  with pytest.raises(ValueError, match="outside"):
    _load(_config(tokenizer=str(tmp_path / "sparse"), allow_tokenizer_mismatch=True))


def test_restored_runs_go_through_the_same_check(dirs):
  c = _config(path=dirs["model"], tokenizer=dirs["other"])
  with pytest.raises(ValueError, match="run config model.tokenizer.*differs"):
    restore.policy_config(c)


def test_evaluating_the_configs_own_model_applies_the_trainers_tokenizer_rule(dirs):
  # tools/evaluate.py with no weight flag evaluates the config's model: the same `policy.load` as
  # the trainer, so a named tokenizer that differs from the model's own is refused there too.
  evaluate_tool = tool_loader.load("tools/evaluate.py", "evaluate_tool")
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  with pytest.raises(ValueError, match=f"{dirs['other']}.*differs.*{dirs['model']}"):
    evaluate_tool.load_weights(_config(path=dirs["model"], tokenizer=dirs["other"]), mesh)
  # Weights given by hand (--hf) bring their own tokenizer; the config's is for its own model.
  _, tok, what = evaluate_tool.load_weights(_config(tokenizer=dirs["other"]), mesh,
                                            hf=dirs["model"])
  assert len(tok) == 1000 and what == dirs["model"]
