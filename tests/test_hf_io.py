"""HF import/export parity against transformers (torch CPU) and loud failures on bad input."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
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


@pytest.mark.parametrize("keep", [0.9, 0.5, 40, 10])
def test_truncated_gguf_names_the_file(tmp_path, keep):
  import gguf
  path = str(tmp_path / "m.gguf")
  w = gguf.GGUFWriter(path, "qwen2")
  w.add_block_count(1)
  w.add_tensor("token_embd.weight", np.ones((16, 8), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  blob = open(path, "rb").read()
  cut = str(tmp_path / "cut.gguf")
  with open(cut, "wb") as f:
    f.write(blob[:int(len(blob) * keep) if keep < 1 else keep])
  with pytest.raises(ValueError, match=f"{cut}: (not a readable GGUF file|truncated GGUF)"):
    hf_io.load_gguf(cut)


def _write_gguf(tm, path, tokenizer_dir):
  """A float32 GGUF of torch model `tm` (qwen3) with `tokenizer_dir`'s byte-level BPE inside."""
  import gguf

  tok = json.load(open(os.path.join(tokenizer_dir, "tokenizer.json")))
  vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
  vocab += sorted(((t["content"], t["id"]) for t in tok["added_tokens"]), key=lambda kv: kv[1])
  assert [i for _, i in vocab] == list(range(len(vocab)))
  c = tm.config
  w = gguf.GGUFWriter(str(path), "qwen3")
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_key_length(c.head_dim)
  w.add_value_length(c.head_dim)
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_rope_freq_base(c.rope_parameters["rope_theta"])
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("qwen2")
  w.add_token_list([t for t, _ in vocab])
  w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
  w.add_token_types([3 if i >= len(tok["model"]["vocab"]) else 1 for _, i in vocab])
  w.add_eos_token_id(c.eos_token_id)
  to_gguf = {v: k for k, v in hf_io._GGUF_BLOCK.items()}
  for name, p in tm.state_dict().items():
    if name == "lm_head.weight" and c.tie_word_embeddings:
      continue
    short = {v: k for k, v in hf_io._GGUF_NAMES.items()}.get(name)
    if short is None:
      _, _, i, rest = name.split(".", 3)
      short = f"blk.{i}.{to_gguf[rest]}"
    w.add_tensor(short, p.numpy().astype(np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def test_qwen3_gguf_loads_with_its_tokenizer(tmp_path):
  from hf_fixtures import make_torch_model
  from llds_jax import policy

  tiny_tok = os.path.join(os.path.dirname(__file__), "testdata", "tiny_tokenizer")
  tm = make_torch_model("qwen3_tied", vocab_size=1000, eos_token_id=999)  # the tokenizer's size
  _write_gguf(tm, tmp_path / "m.gguf", tiny_tok)
  model, cfg, tok = hf_io.load_gguf(str(tmp_path / "m.gguf"))
  assert cfg.qk_norm and cfg.head_dim == 16 and cfg.eos_token_id == 999
  ref = transformers.AutoTokenizer.from_pretrained(tiny_tok)
  text = "<|im_start|>user\nWho wrote Hamlet? 1599<|im_end|>"
  ids = tok(text)["input_ids"]
  assert ids == ref(text)["input_ids"]
  diff = np.abs(np.asarray(model(jnp.asarray([ids]))) - torch_logits(tm, [ids])).max()
  assert diff <= 1e-4, diff
  # The trap: a config naming another tokenizer for a GGUF that carries its own.
  ref.add_tokens(["<extra>"])
  ref.save_pretrained(str(tmp_path / "other"))
  c = ml_collections.ConfigDict(dict(
      seed=0, model=dict(path=str(tmp_path / "m.gguf"), tokenizer=str(tmp_path / "other"),
                         allow_tokenizer_mismatch=False, dtype="float32", param_dtype="float32",
                         remat="none", scan_layers=True)))
  with pytest.raises(ValueError, match="other' differs from the tokenizer that .*m.gguf' carries"):
    policy.load(c, sharding.make_mesh())
