"""Hugging Face I/O: config.json ⇄ ModelConfig, safetensors ⇄ params, GGUF import.

One key table (`_key_table`) maps each HF tensor name to our parameter path and a layout rule;
load and save both use it, and both insist that the two key sets are equal. Weights are read
from safetensors one tensor at a time and placed straight into their mesh shards; pickle-based
formats are never read and no remote code is ever executed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from safetensors import safe_open
from safetensors.numpy import save_file

from llds_jax import bpe, sharding as shd
from llds_jax.model import ModelConfig, Transformer

SHARD_BYTES = 5 * 1024**3  # transformers' default `max_shard_size`
# Tensors some exporters add that carry no information for us.
_IGNORABLE = ("rotary_emb.inv_freq",)


# ---------------------------------------------------------------------------------------------
# Layout rules: (to_ours, to_hf) given the config. HF linear weights are torch [out, in].

def _rules(cfg: ModelConfig):
  D, H, K, Dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  same = (lambda w: w, lambda w: w)
  transpose = (lambda w: w.T, lambda w: w.T)

  def proj_in(n):  # [n*Dh, D] -> [D, n, Dh]
    return (lambda w: w.T.reshape(D, n, Dh), lambda w: w.reshape(D, n * Dh).T)

  def bias(n):  # [n*Dh] -> [n, Dh]
    return (lambda w: w.reshape(n, Dh), lambda w: w.reshape(n * Dh))

  proj_out = (lambda w: w.T.reshape(H, Dh, D), lambda w: w.reshape(H * Dh, D).T)
  return dict(same=same, transpose=transpose, q=proj_in(H), kv=proj_in(K), q_bias=bias(H),
              kv_bias=bias(K), o=proj_out)


def _key_table(cfg: ModelConfig) -> dict[str, tuple[tuple, str]]:
  """HF tensor name -> (our path in the nnx State, layout rule name)."""
  table = {
      "model.embed_tokens.weight": (("embed",), "same"),
      "model.norm.weight": (("final_norm",), "same"),
  }
  if not cfg.tie_word_embeddings:
    table["lm_head.weight"] = (("lm_head",), "transpose")
  for i in range(cfg.num_layers):
    p, o = f"model.layers.{i}.", ("layers", i)
    table.update({
        p + "input_layernorm.weight": (o + ("attn_norm",), "same"),
        p + "post_attention_layernorm.weight": (o + ("mlp_norm",), "same"),
        p + "self_attn.q_proj.weight": (o + ("q",), "q"),
        p + "self_attn.k_proj.weight": (o + ("k",), "kv"),
        p + "self_attn.v_proj.weight": (o + ("v",), "kv"),
        p + "self_attn.o_proj.weight": (o + ("o",), "o"),
        p + "mlp.gate_proj.weight": (o + ("gate",), "transpose"),
        p + "mlp.up_proj.weight": (o + ("up",), "transpose"),
        p + "mlp.down_proj.weight": (o + ("down",), "transpose"),
    })
    if cfg.qk_norm:
      table.update({
          p + "self_attn.q_norm.weight": (o + ("q_norm",), "same"),
          p + "self_attn.k_norm.weight": (o + ("k_norm",), "same"),
      })
    if cfg.attention_bias:
      table.update({
          p + "self_attn.q_proj.bias": (o + ("q_bias",), "q_bias"),
          p + "self_attn.k_proj.bias": (o + ("k_bias",), "kv_bias"),
          p + "self_attn.v_proj.bias": (o + ("v_bias",), "kv_bias"),
      })
  return table


def _get(state, path):
  node = state
  for k in path:
    node = node[k]
  return node


# ---------------------------------------------------------------------------------------------
# Loading.

def read_config(path: str, **overrides) -> ModelConfig:
  """ModelConfig from `path/config.json` (our dtype/remat fields via `overrides`)."""
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"{cfg_path}: missing (not a Hugging Face model directory)")
  with open(cfg_path) as f:
    try:
      hf = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{cfg_path}: invalid JSON ({e})") from e
  try:
    return ModelConfig.from_hf(hf, **overrides)
  except (KeyError, ValueError) as e:
    raise ValueError(f"{cfg_path}: {e}") from e


def _tensor_files(path: str) -> dict[str, str]:
  """HF tensor name -> safetensors file that holds it."""
  index = os.path.join(path, "model.safetensors.index.json")
  single = os.path.join(path, "model.safetensors")
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    return {k: os.path.join(path, v) for k, v in weight_map.items()}
  if os.path.isfile(single):
    with safe_open(single, "numpy") as f:
      return {k: single for k in f.keys()}
  others = sorted(x for x in os.listdir(path) if x.endswith((".bin", ".pt", ".pth", ".ckpt")))
  hint = f" (found {others}: pickle formats are refused, convert to safetensors)" if others else ""
  raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")


def _fill_params(cfg: ModelConfig, read: Callable[[str], np.ndarray], names: set[str], where: str,
                 *, mesh=None, rules=shd.DEFAULT_RULES) -> Transformer:
  """Build the model from `read(hf_name)`, one tensor at a time, each placed onto its shards."""
  table = _key_table(cfg)
  if cfg.tie_word_embeddings:
    names = names - {"lm_head.weight"}  # some exporters write the tied copy; it is redundant
  names = {n for n in names if not n.endswith(_IGNORABLE)}
  missing, extra = sorted(set(table) - names), sorted(names - set(table))
  if missing:
    raise ValueError(f"{where}: missing tensor(s) {missing[:5]}{' …' if len(missing) > 5 else ''}")
  if extra:
    raise ValueError(f"{where}: unexpected tensor(s) {extra[:5]}{' …' if len(extra) > 5 else ''} "
                     f"for {cfg.architecture}")
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  shardings = shd.state_shardings(abstract, mesh, rules) if mesh is not None else None
  rules_fns = _rules(cfg)
  for name, (ours, rule) in table.items():
    var = _get(abstract, ours)
    want = var.get_raw_value()
    raw = read(name)
    try:
      w = rules_fns[rule][0](raw)
    except ValueError:  # a reshape that cannot work: report it as the shape mismatch it is
      w = raw
    if tuple(w.shape) != tuple(want.shape):
      raise ValueError(f"{where}: tensor {name} has shape {tuple(raw.shape)}, which does not map "
                       f"to our {ours[-1]} of shape {tuple(want.shape)} for this config")
    w = np.asarray(w, dtype=want.dtype)
    if shardings is None:
      value = jnp.asarray(w)
    else:
      sharding: NamedSharding = _get(shardings, ours).get_raw_value()
      # Each process materializes only its own shards (multi-host safe).
      value = jax.make_array_from_callback(w.shape, sharding, lambda idx, w=w: w[idx])
    var.set_raw_value(value)
  return nnx.merge(graphdef, abstract)


def load_pretrained(path: str, *, dtype=jnp.float32, mesh=None, rules=shd.DEFAULT_RULES,
                    **overrides) -> tuple[Transformer, ModelConfig]:
  """Load a HF Qwen2/Qwen3/Llama directory (single or sharded safetensors) as (model, cfg)."""
  name = jnp.dtype(dtype).name
  overrides = {"param_dtype": name, "dtype": name, **overrides}
  cfg = read_config(path, **overrides)
  files = _tensor_files(path)
  handles = {}

  def read(key):
    fname = files[key]
    if fname not in handles:
      handles[fname] = safe_open(fname, "numpy")
    return handles[fname].get_tensor(key)

  try:
    model = _fill_params(cfg, read, set(files), path, mesh=mesh, rules=rules)
  finally:
    handles.clear()
  return model, cfg


# ---------------------------------------------------------------------------------------------
# Saving.

def hf_state_dict(model: Transformer, cfg: ModelConfig, dtype=None) -> dict[str, np.ndarray]:
  """HF-named numpy tensors (gathered to host) in the HF layout."""
  _, state = nnx.split(model)
  rules_fns = _rules(cfg)
  out = {}
  for name, (ours, rule) in _key_table(cfg).items():
    value = _get(state, ours).get_raw_value()
    if jax.process_count() > 1:
      value = jax.experimental.multihost_utils.process_allgather(value, tiled=True)
    w = np.asarray(jax.device_get(value))
    if dtype is not None:
      w = w.astype(jnp.dtype(dtype))
    out[name] = np.ascontiguousarray(rules_fns[rule][1](w))
  return out


def save_pretrained(model: Transformer, cfg: ModelConfig, path: str, *, tokenizer=None,
                    dtype=None, max_shard_bytes: int = SHARD_BYTES) -> None:
  """Write a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads."""
  tensors = hf_state_dict(model, cfg, dtype)
  bad = [k for k, v in tensors.items() if not np.all(np.isfinite(v.astype(np.float32)))]
  if bad:
    raise ValueError(f"refusing to save non-finite weights: {bad[:5]}")
  if jax.process_index() != 0:
    return
  os.makedirs(path, exist_ok=True)
  hf = cfg.to_hf()
  if dtype is not None:
    hf["torch_dtype"] = jnp.dtype(dtype).name
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf[k] is not None}
  with open(os.path.join(path, "generation_config.json"), "w") as f:
    json.dump(gen, f, indent=2)
  shards, current, size = [], {}, 0
  for k, v in tensors.items():
    if current and size + v.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[k] = v
    size += v.nbytes
  shards.append(current)
  meta = {"format": "pt"}
  if len(shards) == 1:
    save_file(shards[0], os.path.join(path, "model.safetensors"), metadata=meta)
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, os.path.join(path, fname), metadata=meta)
      weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
             "weight_map": weight_map}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
      json.dump(index, f, indent=2)
  if tokenizer is not None:
    tokenizer.save_pretrained(path)


# ---------------------------------------------------------------------------------------------
# GGUF (the pip-shipped Qwen2.5-0.5B and SmolLM2-135M models; qwen2, qwen3, llama): dequantize,
# un-permute, rename.

_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def _gguf_hf_name(name: str) -> str:
  if name in _GGUF_NAMES:
    return _GGUF_NAMES[name]
  parts = name.split(".", 2)
  if parts[0] == "blk" and parts[2] in _GGUF_BLOCK:
    return f"model.layers.{parts[1]}.{_GGUF_BLOCK[parts[2]]}"
  raise ValueError(f"GGUF tensor {name!r} has no Hugging Face equivalent")


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undo llama.cpp's interleaved-RoPE permutation of llama q/k rows (rotate-half order back)."""
  return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tokenizer(fields: dict):
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  kind, pre = fields.get("tokenizer.ggml.model"), fields.get("tokenizer.ggml.pre", "default")
  if kind != "gpt2":
    raise ValueError(f"GGUF tokenizer.ggml.model={kind!r}: only byte-level BPE ('gpt2') is supported")
  tokens = fields["tokenizer.ggml.tokens"]
  merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
  tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                             ignore_merges=False))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre != "qwen2")
  if pre == "qwen2":
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(bpe.SPLIT_PATTERN), behavior="isolated"), byte_level])
  elif pre == "smollm":  # digits one by one, then the GPT-2 split
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
  elif pre in ("gpt2", "default"):
    tok.pre_tokenizer = byte_level
  else:
    raise ValueError(f"GGUF tokenizer.ggml.pre={pre!r} is not supported (qwen2, smollm, gpt2)")
  tok.decoder = decoders.ByteLevel()
  types = fields.get("tokenizer.ggml.token_type", [1] * len(tokens))
  special = [t for t, ty in zip(tokens, types) if ty == 3]  # CONTROL
  user = [t for t, ty in zip(tokens, types) if ty == 4]  # USER_DEFINED
  name = lambda key: tokens[fields[key]] if key in fields else None  # noqa: E731
  hf_tok = PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=name("tokenizer.ggml.bos_token_id"),
      eos_token=name("tokenizer.ggml.eos_token_id"), pad_token=name("tokenizer.ggml.padding_token_id"),
      clean_up_tokenization_spaces=False)
  hf_tok.add_special_tokens({"additional_special_tokens": special})
  if user:
    hf_tok.add_tokens(user)
  hf_tok.chat_template = fields.get("tokenizer.chat_template")
  return hf_tok


def load_gguf(path: str, *, dtype=jnp.float32, mesh=None, rules=shd.DEFAULT_RULES, **overrides):
  """(model, cfg, tokenizer) from a GGUF file, torch-free; weights are dequantized to `dtype`."""
  import gguf

  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: GGUF file not found (run tools/fetch_assets.py)")
  size = os.path.getsize(path)
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # noqa: BLE001  (numpy/struct errors on a cut or foreign file)
    raise ValueError(f"{path}: not a readable GGUF file ({size} bytes; truncated download?): "
                     f"{type(e).__name__}: {str(e)[:200]}") from None
  for t in reader.tensors:  # a cut file can still parse when only tensor data is missing
    if t.data_offset + t.n_bytes > size:
      raise ValueError(f"{path}: truncated GGUF: tensor {t.name!r} ends at byte "
                       f"{t.data_offset + t.n_bytes}, the file has {size}")
  fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
  arch = fields.get("general.architecture")
  archs = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
  if arch not in archs:
    raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported {tuple(archs)}")
  tensors = {t.name: t for t in reader.tensors}
  a = lambda k, default=None: fields.get(f"{arch}.{k}", default)  # noqa: E731
  heads = a("attention.head_count")
  vocab = len(fields["tokenizer.ggml.tokens"])
  hf = {
      "architectures": [archs[arch]],
      "vocab_size": a("vocab_size", vocab),
      "hidden_size": a("embedding_length"),
      "intermediate_size": a("feed_forward_length"),
      "num_hidden_layers": a("block_count"),
      "num_attention_heads": heads,
      "num_key_value_heads": a("attention.head_count_kv", heads),
      "head_dim": a("attention.key_length") or a("embedding_length") // heads,
      "rms_norm_eps": a("attention.layer_norm_rms_epsilon", 1e-6),
      "rope_theta": a("rope.freq_base", 10000.0),
      "max_position_embeddings": a("context_length", 32768),
      "tie_word_embeddings": "output.weight" not in tensors,
      "attention_bias": "blk.0.attn_q.bias" in tensors,
      "bos_token_id": fields.get("tokenizer.ggml.bos_token_id"),
      "eos_token_id": fields.get("tokenizer.ggml.eos_token_id"),
      "pad_token_id": fields.get("tokenizer.ggml.padding_token_id"),
  }
  name = jnp.dtype(dtype).name
  cfg = ModelConfig.from_hf(hf, **{"param_dtype": name, "dtype": name, **overrides})
  by_hf = {_gguf_hf_name(n): n for n in tensors}

  def read(hf_name):
    t = tensors[by_hf[hf_name]]
    w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    w = w.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims innermost first
    if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
      w = _unpermute(w, cfg.num_heads if "q_proj" in hf_name else cfg.num_kv_heads)
    return w

  model = _fill_params(cfg, read, set(by_hf), path, mesh=mesh, rules=rules)
  return model, cfg, _gguf_tokenizer(fields)
