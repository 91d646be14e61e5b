"""The model's architecture: a frozen dataclass of HF `config.json` fields plus our dtype, remat
and attention-chunk choices, with the `config.json` round trip (`from_hf` / `to_hf`).

Its own module so that model.py, attention.py, sampler.py and hf_io.py all read it without an
import cycle (attention.py is imported by model.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM")
_MODEL_TYPES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                "llama": "LlamaForCausalLM"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture hyper-parameters (HF `config.json` fields) plus our dtype/remat choices."""

  architecture: str = "Qwen2ForCausalLM"
  vocab_size: int = 151936
  hidden_size: int = 896
  intermediate_size: int = 4864
  num_layers: int = 24
  num_heads: int = 14
  num_kv_heads: int = 2
  head_dim: int = 64
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1e6
  # Frozen (key, value) pairs of the HF rope scaling dict, e.g. (("rope_type", "llama3"), ...).
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  max_position_embeddings: int = 32768
  tie_word_embeddings: bool = True
  attention_bias: bool = True  # q/k/v projections carry a bias (Qwen2: always)
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  # Ours, not HF: storage dtype of params, compute dtype of matmuls, block rematerialization,
  # and the query block of attention over longer inputs (0 = all queries at once).
  param_dtype: str = "float32"
  dtype: str = "float32"
  remat: str = "none"  # none | full | dots (save matmul outputs)
  attn_chunk: int = 512
  attn_block_bytes: int = 2**29  # and at most this much f32 scores per device (0 = no cap)
  scan_layers: bool = True  # cache-free passes run the blocks as one lax.scan (`_scan_blocks`)
  # The cache path (prefill, observation feed, decode) as one lax.scan too (`_scan_cached_blocks`):
  # one block to compile instead of num_layers, for one more copy of the block weights (stacked)
  # in every sampler program.
  scan_cache: bool = True

  def __post_init__(self):
    if self.architecture not in ARCHITECTURES:
      raise ValueError(f"ModelConfig.architecture={self.architecture!r}: supported {ARCHITECTURES}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for rotate-half RoPE")
    if self.remat not in ("none", "full", "dots"):
      raise ValueError(f"ModelConfig.remat={self.remat!r}: expected none | full | dots")
    if self.attn_chunk < 0 or self.attn_block_bytes < 0:
      raise ValueError(f"ModelConfig.attn_chunk={self.attn_chunk} and attn_block_bytes="
                       f"{self.attn_block_bytes} must be ≥ 0 (0 = off)")
    rope_type = dict(self.rope_scaling or {}).get("rope_type", "default")
    if rope_type not in ("default", "linear", "llama3"):
      raise ValueError(f"rope_scaling rope_type={rope_type!r} is not supported (default, linear, llama3)")

  @property
  def is_qwen2(self) -> bool:
    return self.architecture == "Qwen2ForCausalLM"

  @property
  def qk_norm(self) -> bool:
    """Qwen3: RMSNorm over each head's query and key (weights [Dh]) before RoPE."""
    return self.architecture == "Qwen3ForCausalLM"

  @classmethod
  def from_hf(cls, hf: dict, **overrides) -> "ModelConfig":
    """Build from a HF `config.json` dict; `overrides` set our own fields (dtype, remat, ...)."""
    arch = (hf.get("architectures") or [None])[0]
    if arch is None:
      arch = _MODEL_TYPES.get(hf.get("model_type"))
    if arch not in ARCHITECTURES:
      raise ValueError(f"config.json: unsupported architecture {arch!r} "
                       f"(model_type={hf.get('model_type')!r}); supported: {ARCHITECTURES}")
    if hf.get("use_sliding_window"):
      raise ValueError("config.json: use_sliding_window=true is not supported")
    # transformers >= 5 nests RoPE in `rope_parameters`; older files use `rope_theta`/`rope_scaling`.
    rope = dict(hf.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    if not rope and hf.get("rope_scaling"):
      rope = dict(hf["rope_scaling"])
    if "type" in rope and "rope_type" not in rope:
      rope["rope_type"] = rope.pop("type")
    scaling = None if rope.get("rope_type", "default") == "default" else tuple(sorted(rope.items()))
    heads = hf["num_attention_heads"]
    eos = hf.get("eos_token_id")
    kwargs = dict(
        architecture=arch,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=True if arch == "Qwen2ForCausalLM" else bool(hf.get("attention_bias", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=hf.get("pad_token_id"),
    )
    if hf.get("mlp_bias"):
      raise ValueError("config.json: mlp_bias=true is not supported")
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_hf(self) -> dict:
    """The HF `config.json` dict that `transformers` reads back to the same architecture."""
    model_type = {v: k for k, v in _MODEL_TYPES.items()}[self.architecture]
    rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
    rope.update(dict(self.rope_scaling or {}))
    eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
    hf = {
        "architectures": [self.architecture],
        "model_type": model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "rope_parameters": rope,
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": self.pad_token_id,
        "torch_dtype": self.param_dtype,
        "use_cache": True,
    }
    if self.rope_scaling:
      hf["rope_scaling"] = dict(rope)
    if self.is_qwen2:
      hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.num_layers,
                attention_dropout=0.0)
    elif self.qk_norm:
      hf.update(attention_bias=self.attention_bias, use_sliding_window=False, sliding_window=None,
                max_window_layers=self.num_layers, attention_dropout=0.0)
    else:
      hf.update(attention_bias=self.attention_bias, mlp_bias=False, attention_dropout=0.0,
                pretraining_tp=1)
    return hf
