"""Tiny random `transformers` models (torch CPU) used as parity oracles."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Each entry covers one feature of the decoder: tied/untied head, a single KV head, odd sizes,
# Llama without bias and with llama3 RoPE scaling, Qwen3's per-head q/k norm with a head_dim that
# is not hidden / heads.
TINY_CONFIGS = {
    "qwen2_tied": dict(arch="qwen2", vocab_size=128, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       tie_word_embeddings=True, rope_theta=1e6),
    "qwen2_untied_mqa": dict(arch="qwen2", vocab_size=96, hidden_size=32, intermediate_size=48,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                             tie_word_embeddings=False, rope_theta=1e4),
    "qwen2_odd": dict(arch="qwen2", vocab_size=101, hidden_size=40, intermediate_size=72,
                      num_hidden_layers=3, num_attention_heads=5, num_key_value_heads=5,
                      tie_word_embeddings=False, rope_theta=1e6, rms_norm_eps=1e-5),
    "llama3_rope": dict(arch="llama", vocab_size=120, hidden_size=48, intermediate_size=80,
                        num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                        tie_word_embeddings=True, rope_theta=5e5, max_position_embeddings=256,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 16}),
    "qwen3_odd": dict(arch="qwen3", vocab_size=103, hidden_size=40, intermediate_size=72,
                      num_hidden_layers=3, num_attention_heads=5, num_key_value_heads=1,
                      head_dim=12, tie_word_embeddings=False, rope_theta=1e6, rms_norm_eps=1e-5),
    "qwen3_tied": dict(arch="qwen3", vocab_size=128, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, tie_word_embeddings=True, rope_theta=1e4),
    "llama_untied": dict(arch="llama", vocab_size=64, hidden_size=32, intermediate_size=40,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         tie_word_embeddings=False, rope_theta=1e4),
}


def make_torch_model(name: str, seed: int = 0, **overrides):
  """A randomly initialised HF causal LM (float32, eval mode) for config `name` (+ overrides)."""
  kw = dict(TINY_CONFIGS[name], **overrides)
  arch = kw.pop("arch")
  torch.manual_seed(seed)
  if arch == "qwen2":
    cfg = transformers.Qwen2Config(**kw)
    model = transformers.Qwen2ForCausalLM(cfg)
  elif arch == "qwen3":
    cfg = transformers.Qwen3Config(**kw)
    model = transformers.Qwen3ForCausalLM(cfg)
  else:
    cfg = transformers.LlamaConfig(**kw)
    model = transformers.LlamaForCausalLM(cfg)
  # Default init leaves biases and norms at 0/1; randomise them so parity covers every tensor.
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if pname.endswith("bias") or "norm" in pname:
        p.add_(0.1 * torch.randn_like(p))
  return model.float().eval()


def save_torch_model(name: str, path, seed: int = 0):
  model = make_torch_model(name, seed)
  model.save_pretrained(str(path))
  return model


def torch_logits(model, ids, attention_mask=None):
  with torch.no_grad():
    kw = {} if attention_mask is None else {"attention_mask": torch.tensor(attention_mask)}
    return model(torch.tensor(ids), **kw).logits.float().numpy()
