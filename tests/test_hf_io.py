"""HF import/export parity against transformers (torch CPU) and loud failures on bad input."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from llds_jax import hf_io, sharding
from llds_jax.model import ModelConfig, Transformer

from hf_fixtures import TINY_CONFIGS, save_torch_model, torch, torch_logits, transformers


def _ids(vocab, shape, seed=0):
  return np.random.RandomState(seed).randint(0, vocab, shape)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_logits_match_transformers(name, tmp_path):
  tm = save_torch_model(name, tmp_path)
  model, cfg = hf_io.load_pretrained(str(tmp_path))
  ids = _ids(cfg.vocab_size, (2, 11))
  diff = np.abs(np.asarray(model(jnp.asarray(ids))) - torch_logits(tm, ids)).max()
  assert diff <= 1e-4, diff


@pytest.mark.parametrize("name", ["qwen2_odd", "llama3_rope", "qwen3_odd"])
def test_padded_batch_matches_transformers(name, tmp_path):
  # Left padding with an attention mask: HF shifts positions itself only when given position_ids,
  # so compare on the valid tokens with explicit positions on both sides.
  tm = save_torch_model(name, tmp_path)
  model, cfg = hf_io.load_pretrained(str(tmp_path))
  ids = _ids(cfg.vocab_size, (2, 9), seed=1)
  mask = np.ones_like(ids)
  mask[1, :3] = 0
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask)))
  with torch.no_grad():
    ref = tm(torch.tensor(ids), attention_mask=torch.tensor(mask),
             position_ids=torch.tensor(pos)).logits.numpy()
  assert np.abs(ours - ref)[mask.astype(bool)].max() <= 1e-4


@pytest.mark.parametrize("name", ["qwen2_tied", "qwen2_untied_mqa", "llama3_rope", "qwen3_odd",
                                  "qwen3_tied"])
def test_hf_roundtrip_bit_identical(name, tmp_path):
  save_torch_model(name, tmp_path / "in")
  model, cfg = hf_io.load_pretrained(str(tmp_path / "in"))
  hf_io.save_pretrained(model, cfg, str(tmp_path / "out"))
  a = load_file(str(tmp_path / "in" / "model.safetensors"))
  b = load_file(str(tmp_path / "out" / "model.safetensors"))
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert ModelConfig.from_hf(json.load(open(tmp_path / "out" / "config.json"))) == cfg


@pytest.mark.parametrize("arch,tied,head_dim", [("Qwen2ForCausalLM", False, 8),
                                                ("LlamaForCausalLM", True, 8),
                                                ("Qwen3ForCausalLM", True, 10)])
def test_export_loads_in_transformers(arch, tied, head_dim, tmp_path):
  cfg = ModelConfig(architecture=arch, vocab_size=80, hidden_size=24, intermediate_size=40,
                    num_layers=2, num_heads=3, num_kv_heads=1, head_dim=head_dim, rope_theta=1e4,
                    tie_word_embeddings=tied, attention_bias=arch.startswith("Qwen2"),
                    eos_token_id=3, bos_token_id=1)
  model = Transformer(cfg, rngs=nnx.Rngs(3))
  if cfg.qk_norm:  # away from their all-ones init, so the export must carry them
    for layer in model.layers:
      layer.q_norm[...] = layer.q_norm[...] + 0.1 * jnp.arange(head_dim)
      layer.k_norm[...] = layer.k_norm[...] - 0.05 * jnp.arange(head_dim)
  hf_io.save_pretrained(model, cfg, str(tmp_path))
  tm = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).float().eval()
  assert type(tm).__name__ == arch
  ids = _ids(80, (2, 7))
  diff = np.abs(np.asarray(model(jnp.asarray(ids))) - torch_logits(tm, ids)).max()
  assert diff <= 1e-5, diff
  assert json.load(open(tmp_path / "generation_config.json"))["eos_token_id"] == 3


def test_sharded_save_with_index(tmp_path):
  save_torch_model("qwen2_odd", tmp_path / "in")
  model, cfg = hf_io.load_pretrained(str(tmp_path / "in"))
  hf_io.save_pretrained(model, cfg, str(tmp_path / "out"), max_shard_bytes=20_000)
  files = sorted(f for f in os.listdir(tmp_path / "out") if f.endswith(".safetensors"))
  assert len(files) > 2 and "model.safetensors.index.json" in os.listdir(tmp_path / "out")
  again, _ = hf_io.load_pretrained(str(tmp_path / "out"))
  tm = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).float().eval()
  ids = _ids(cfg.vocab_size, (1, 6))
  np.testing.assert_allclose(np.asarray(again(jnp.asarray(ids))), torch_logits(tm, ids), atol=1e-4)


def test_load_onto_mesh_places_shards(tmp_path):
  tm = save_torch_model("qwen2_tied", tmp_path)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  model, cfg = hf_io.load_pretrained(str(tmp_path), mesh=mesh)
  q = model.layers[0].q[...]
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  assert q.addressable_shards[0].data.shape == (16, 2, 8)
  ids = _ids(cfg.vocab_size, (4, 5))
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  out = fwd(state, jax.device_put(jnp.asarray(ids), sharding.batch_sharding(mesh)))
  np.testing.assert_allclose(np.asarray(out), torch_logits(tm, ids), atol=1e-4)


def test_config_roundtrip_and_rope_forms():
  hf = transformers.Qwen2Config(vocab_size=50, hidden_size=16, intermediate_size=8,
                                num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=1).to_dict()
  cfg = ModelConfig.from_hf(hf)
  assert ModelConfig.from_hf(cfg.to_hf()) == cfg
  # Our own fields (here the attention query block) never reach config.json.
  chunked = ModelConfig.from_hf(hf, attn_chunk=64)
  assert chunked.to_hf() == cfg.to_hf() and "attn_chunk" not in json.dumps(cfg.to_hf())
  assert ModelConfig.from_hf(chunked.to_hf(), attn_chunk=64) == chunked
  old_style = dict(hf)
  old_style.pop("rope_parameters", None)
  old_style["rope_theta"] = cfg.rope_theta
  assert ModelConfig.from_hf(old_style) == cfg
  llama = dict(TINY_CONFIGS["llama3_rope"])
  llama.pop("arch")
  lcfg = ModelConfig.from_hf(transformers.LlamaConfig(**llama).to_dict())
  assert dict(lcfg.rope_scaling)["rope_type"] == "llama3"
  assert ModelConfig.from_hf(lcfg.to_hf()) == lcfg
  q3 = ModelConfig.from_hf(transformers.Qwen3Config(
      vocab_size=50, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
      num_attention_heads=2, num_key_value_heads=1, head_dim=12).to_dict())
  assert q3.qk_norm and not q3.attention_bias and q3.head_dim == 12
  assert ModelConfig.from_hf(q3.to_hf()) == q3
  assert transformers.Qwen3Config(**q3.to_hf()).head_dim == 12


# --- bad input: one clear error naming the file / tensor ------------------------------------

def test_missing_config(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf_io.load_pretrained(str(tmp_path))


def test_unsupported_architecture(tmp_path):
  save_torch_model("qwen2_tied", tmp_path)
  hf = json.load(open(tmp_path / "config.json"))
  hf["architectures"], hf["model_type"] = ["GPT2LMHeadModel"], "gpt2"
  json.dump(hf, open(tmp_path / "config.json", "w"))
  with pytest.raises(ValueError, match="GPT2LMHeadModel"):
    hf_io.load_pretrained(str(tmp_path))


def _edit_tensors(path, fn):
  f = path / "model.safetensors"
  tensors = load_file(str(f))
  fn(tensors)
  save_file(tensors, str(f))


def test_missing_extra_and_misshapen_tensors(tmp_path):
  save_torch_model("qwen2_untied_mqa", tmp_path)
  _edit_tensors(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ValueError, match="missing.*model.layers.1.mlp.up_proj.weight"):
    hf_io.load_pretrained(str(tmp_path))
  save_torch_model("qwen2_untied_mqa", tmp_path)
  _edit_tensors(tmp_path, lambda t: t.update(stray=np.zeros(3, np.float32)))
  with pytest.raises(ValueError, match="unexpected.*stray"):
    hf_io.load_pretrained(str(tmp_path))
  save_torch_model("qwen2_untied_mqa", tmp_path)
  _edit_tensors(tmp_path, lambda t: t.update(
      {"model.layers.0.self_attn.k_proj.weight": np.zeros((16, 32), np.float32)}))
  with pytest.raises(ValueError, match="k_proj.weight has shape"):
    hf_io.load_pretrained(str(tmp_path))


def test_pickle_checkpoints_are_refused(tmp_path):
  save_torch_model("qwen2_tied", tmp_path)
  os.remove(tmp_path / "model.safetensors")
  (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(FileNotFoundError, match="pickle formats are refused"):
    hf_io.load_pretrained(str(tmp_path))


def test_refuses_nonfinite_export(tmp_path):
  cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_layers=1, num_heads=2,
                    num_kv_heads=1, head_dim=8)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  model.layers[0].up[...] = model.layers[0].up[...].at[0, 0].set(jnp.nan)
  with pytest.raises(ValueError, match="non-finite.*up_proj"):
    hf_io.save_pretrained(model, cfg, str(tmp_path))
