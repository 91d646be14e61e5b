"""Qwen2 / Qwen3 / Llama decoder in Flax NNX, with a slot-addressed KV cache.

Dims (llds_jax/__init__.py): B rows, T new tokens, S cache slots, D embed, H query heads, K kv
heads, Dh head dim, F MLP hidden, V vocab.

One module serves `Qwen2ForCausalLM` (q/k/v bias), `Qwen3ForCausalLM` (dense: per-head q/k
RMSNorm before RoPE, explicit `head_dim`, no bias) and `LlamaForCausalLM` (no bias, optional
`llama3` RoPE scaling). Every weight carries `logical_axes` metadata that `sharding.py` maps to the
mesh; the model itself never names a mesh axis.

Positions, masking, the KV cache and the attention kernels live in `attention.py`: a token whose
mask is 0 gets position -1 and is neither attended to nor cached. The residual stream is pinned
to row sharding (`sharding.constrain`) after the embedding lookup and after every block. The
blocks run as one `lax.scan` without a cache (`scan_layers`) and with one (`scan_cache`; the cache
has a leading layer axis); the stored weights stay one module per block.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from llds_jax import sharding as shd
from llds_jax.attention import KVCache, apply_rope, attend, rope_inv_freq, scatter_rows, write_slots
from llds_jax.model_config import ModelConfig  # its own module; `model.ModelConfig` still works

def compute_dtype_of(w, compute_dtype) -> jnp.dtype:
  """The dtype a block reads weight `w` in (an array or a ShapeDtypeStruct), given `cfg.dtype`.

  Float matrices (kernels, the [heads, head_dim] biases) are cast to the compute dtype on every use
  (`Block.__call__`); 1-D norm weights are applied in float32 as stored. A copy cast this way
  ahead of time (the scan's stacked weights, the rollout's weights) therefore computes the same.
  """
  if w.ndim >= 2 and jnp.issubdtype(w.dtype, jnp.floating):
    return jnp.dtype(compute_dtype)
  return w.dtype


def _param(rngs, shape, axes, dtype, scale=None, init="normal"):
  if init == "ones":
    value = jnp.ones(shape, dtype)
  elif init == "zeros":
    value = jnp.zeros(shape, dtype)
  else:
    value = (scale * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, logical_axes=axes)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)
  return (x32 * w.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))).astype(x.dtype)


class Block(nnx.Module):
  """Pre-norm decoder block: RMSNorm → GQA attention → RMSNorm → SwiGLU."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    D, H, K, Dh, F = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    pd = jnp.dtype(cfg.param_dtype)
    s_in, s_ff = 1 / math.sqrt(D), 1 / math.sqrt(F)
    self.attn_norm = _param(rngs, (D,), ("norm",), pd, init="ones")
    self.q = _param(rngs, (D, H, Dh), ("embed", "heads", "head_dim"), pd, s_in)
    self.k = _param(rngs, (D, K, Dh), ("embed", "kv_heads", "head_dim"), pd, s_in)
    self.v = _param(rngs, (D, K, Dh), ("embed", "kv_heads", "head_dim"), pd, s_in)
    if cfg.attention_bias:
      self.q_bias = _param(rngs, (H, Dh), ("heads", "head_dim"), pd, 0.02)
      self.k_bias = _param(rngs, (K, Dh), ("kv_heads", "head_dim"), pd, 0.02)
      self.v_bias = _param(rngs, (K, Dh), ("kv_heads", "head_dim"), pd, 0.02)
    if cfg.qk_norm:
      self.q_norm = _param(rngs, (Dh,), ("norm",), pd, init="ones")
      self.k_norm = _param(rngs, (Dh,), ("norm",), pd, init="ones")
    self.o = _param(rngs, (H, Dh, D), ("heads", "head_dim", "embed"), pd, 1 / math.sqrt(H * Dh))
    self.mlp_norm = _param(rngs, (D,), ("norm",), pd, init="ones")
    self.gate = _param(rngs, (D, F), ("embed", "mlp"), pd, s_in)
    self.up = _param(rngs, (D, F), ("embed", "mlp"), pd, s_in)
    self.down = _param(rngs, (F, D), ("mlp", "embed"), pd, s_ff)

  def __call__(self, x_BxTxD, pos_BxT, inv_freq, kv=None, seg_BxT=None):
    """Returns the new residual stream and, in cache mode, the layer's updated (k, v, pos).

    `seg_BxT` (packed rows, cache-free only): a token attends only within its own segment.
    """
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    w = lambda p: p[...].astype(dt)  # noqa: E731  (params may be stored in f32 and computed in bf16)
    h = rms_norm(x_BxTxD, self.attn_norm[...], cfg.rms_norm_eps)
    q = jnp.einsum("btd,dhk->bthk", h, w(self.q))
    k = jnp.einsum("btd,dhk->bthk", h, w(self.k))
    v = jnp.einsum("btd,dhk->bthk", h, w(self.v))
    if cfg.attention_bias:
      q, k, v = q + w(self.q_bias)[None, None], k + w(self.k_bias)[None, None], v + w(self.v_bias)[None, None]
    if cfg.qk_norm:  # Qwen3Attention: q_norm(q_proj(x)) per head, then RoPE
      q = rms_norm(q, self.q_norm[...], cfg.rms_norm_eps)
      k = rms_norm(k, self.k_norm[...], cfg.rms_norm_eps)
    q, k = apply_rope(q, pos_BxT, inv_freq), apply_rope(k, pos_BxT, inv_freq)
    if kv is None:
      keys, values, kpos_BxS, new_kv = k, v, pos_BxT, None
    else:
      k_buf, v_buf, kpos_BxS, slot_BxT = kv
      keys = scatter_rows(k_buf, k, slot_BxT)
      values = scatter_rows(v_buf, v, slot_BxT)
      new_kv = (keys, values)
    attn = attend(q, keys.astype(dt), values.astype(dt), pos_BxT, kpos_BxS, cfg.attn_chunk,
                  cfg.attn_block_bytes, seg_BxT, seg_BxT)
    x_BxTxD = x_BxTxD + jnp.einsum("bthk,hkd->btd", attn, w(self.o))
    h = rms_norm(x_BxTxD, self.mlp_norm[...], cfg.rms_norm_eps)
    ff = jax.nn.silu(h @ w(self.gate)) * (h @ w(self.up))
    return x_BxTxD + ff @ w(self.down), new_kv


class Transformer(nnx.Module):
  """Causal LM: `model(tokens) -> logits`; `hidden(...)` exposes the cache path and final states."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = jnp.dtype(cfg.param_dtype)
    self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd, 0.02)
    self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = _param(rngs, (cfg.hidden_size,), ("norm",), pd, init="ones")
    if not cfg.tie_word_embeddings:
      self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd,
                            1 / math.sqrt(cfg.hidden_size))

  def unembed(self) -> jax.Array:
    """The `[D, V]` output projection in compute dtype (the transposed embedding when tied)."""
    w = self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]
    return w.astype(jnp.dtype(self.cfg.dtype))

  def stacked_blocks(self):
    """(graphdef, weights stacked over layers) for the cache path's `hidden(..., blocks=)`.

    Not pinned to the training layout: the stacked copy keeps the layout of the weights it is
    made from, so the rollout's tensor-only copy is not resharded over fsdp (and then gathered
    block by block for every decoded token).
    """
    return _stacked_blocks(self.layers, pin=False)

  def hidden(self, tokens_BxT, positions_BxT=None, mask_BxT=None, cache: KVCache | None = None,
             segment_ids_BxT=None, blocks=None):
    """Final-norm hidden states [B, T, D] and the updated cache (None without a cache).

    Tokens with `mask == 0` get position -1: they are never attended to, and in cache mode they
    are not written, so a right-padded block of new tokens appends only its valid tokens.
    `segment_ids_BxT` (packed rows, no cache): attention stays inside each segment.
    `blocks` (from `stacked_blocks`, `scan_cache` only) lets a decode loop stack the weights
    once, not once per token.
    """
    cfg = self.cfg
    if segment_ids_BxT is not None and cache is not None:
      raise ValueError("Transformer.hidden: segment ids are for cache-free (packed) passes only")
    if blocks is not None and (cache is None or not cfg.scan_cache):
      # Only the scanned cache path reads them; elsewhere they would be silently ignored.
      raise ValueError("Transformer.hidden: `blocks` needs a cache and ModelConfig.scan_cache")
    B, T = tokens_BxT.shape
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    valid_BxT = jnp.ones((B, T), bool) if mask_BxT is None else mask_BxT.astype(bool)
    pos_BxT = jnp.where(valid_BxT, positions_BxT, -1).astype(jnp.int32)
    inv_freq = rope_inv_freq(cfg)
    x = self.embed[...].astype(jnp.dtype(cfg.dtype))[tokens_BxT]
    # Rows over (data, fsdp), D whole: otherwise the table's D-sharding flows into every
    # activation after the lookup, and FSDP turns into all-reducing full-batch activations.
    act = ("batch", "length", "act_embed")
    x = shd.constrain(x, act)
    if cache is not None:
      slot_BxT = write_slots(valid_BxT, cache.end_B, cache.slots)
      kpos_BxS = scatter_rows(cache.pos_BxS, pos_BxT, slot_BxT)
    if cache is None and cfg.scan_layers:
      x = _scan_blocks(_stacked_blocks(self.layers), x, pos_BxT, inv_freq, act, cfg.remat,
                       segment_ids_BxT)
    elif cache is not None and cfg.scan_cache:
      x, k_L, v_L = _scan_cached_blocks(blocks or self.stacked_blocks(), x, pos_BxT, inv_freq, act,
                                        cache.k, cache.v, kpos_BxS, slot_BxT)
    else:
      k_L, v_L = (None, None) if cache is None else (cache.k, cache.v)
      for i, layer in enumerate(self.layers):
        kv = None if cache is None else (k_L[i], v_L[i], kpos_BxS, slot_BxT)
        x, layer_kv = _maybe_remat(layer, cfg.remat)(x, pos_BxT, inv_freq, kv, segment_ids_BxT)
        x = shd.constrain(x, act)  # and again per block, so the backward pass keeps it too
        if cache is not None:  # in place: the sampler donates the cache
          k_L, v_L = k_L.at[i].set(layer_kv[0]), v_L.at[i].set(layer_kv[1])
    h = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)
    if cache is None:
      return h, None
    end_B = cache.end_B + valid_BxT.sum(1, dtype=jnp.int32)
    return h, KVCache(k=k_L, v=v_L, pos_BxS=kpos_BxS, end_B=end_B)

  def logits(self, h_BxTxD) -> jax.Array:
    return jnp.einsum("btd,dv->btv", h_BxTxD, self.unembed(), preferred_element_type=jnp.float32)

  def __call__(self, tokens_BxT, positions_BxT=None, mask_BxT=None) -> jax.Array:
    """Full forward without a cache: float32 logits [B, T, V]."""
    h, _ = self.hidden(tokens_BxT, positions_BxT, mask_BxT)
    return self.logits(h)


def _remat_policy(policy: str):
  # "dots" keeps matmul outputs and recomputes the cheap elementwise ops; "full" keeps only inputs.
  return jax.checkpoint_policies.dots_with_no_batch_dims_saveable if policy == "dots" else None


def _maybe_remat(layer: Block, policy: str):
  if policy == "none":
    return layer
  # Plain jax.checkpoint over the layer's split state: `nnx.remat` refuses to run when the step
  # nests a trace around the model (train_step's eval_shape of the micro-batch loss inside jit).
  graphdef, state = nnx.split(layer)

  @functools.partial(jax.checkpoint, policy=_remat_policy(policy))
  def run(state, *args):
    return nnx.merge(graphdef, state)(*args)

  return functools.partial(run, state)


def _stacked_blocks(layers, pin: bool = True):
  """The blocks' graphdef and their weights stacked on a leading layer axis (scan input).

  Matrices are cast to the compute dtype before stacking, which is what each block does on use,
  so the stacked copy is exact and costs half for f32 masters. `pin` constrains each stacked
  weight to its training layout (the update's scan); without it the copy inherits the layout of
  the weights stacked (the rollout's own layout, `sharding.WEIGHT_LAYOUTS`).
  """
  cfg = layers[0].cfg

  def stack(*vs):
    value = jnp.stack([x.astype(compute_dtype_of(x, cfg.dtype)) for x in (v[...] for v in vs)])
    axes = vs[0].get_metadata().get("logical_axes")
    # Layer axis whole, each weight sharded as it is stored, so iteration i gathers one block.
    return vs[0].replace(value if axes is None or not pin else shd.constrain(value, (None, *axes)))

  stacked = jax.tree.map(stack, *[nnx.state(b) for b in layers],
                         is_leaf=lambda v: isinstance(v, nnx.Variable))
  return nnx.graphdef(layers[0]), stacked


def _scan_blocks(blocks, x_BxTxD, pos_BxT, inv_freq, act, remat, seg_BxT=None):
  """Every block as one `lax.scan` step over the blocks' stacked weights (no cache).

  Why: with unrolled blocks the compiler may schedule every rematerialized forward before the
  first backward matmul; the CPU compile of the 3B train step did, holding every block's
  internals at once (~30 GB per 4096-token row per device). A scan's backward recomputes and
  differentiates one block per iteration, so one block's internals live at a time; it also
  compiles one block instead of all.
  """
  graphdef, stacked = blocks

  def body(x, state):
    y, _ = nnx.merge(graphdef, state)(x, pos_BxT, inv_freq, None, seg_BxT)
    return shd.constrain(y, act), None

  if remat != "none":
    body = jax.checkpoint(body, policy=_remat_policy(remat))
  x_BxTxD, _ = lax.scan(body, x_BxTxD, stacked)
  return x_BxTxD


def _scan_cached_blocks(blocks, x_BxTxD, pos_BxT, inv_freq, act, k_LxBxSxKxDh, v_LxBxSxKxDh,
                        kpos_BxS, slot_BxT):
  """The cache path as one `lax.scan` over stacked weights: one block to compile, not L.

  The whole cache rides in the carry and iteration i reads and rewrites only layer i (a dynamic
  slice and update of one buffer, which XLA keeps in place), so the scan neither copies the cache
  per step nor holds a second one, as scanning it as `xs` → `ys` would. Unrolled, a 30-layer
  model's prefill, observation feed and decode each compiled 30 blocks (issue 17: 199 s of first
  rollout on CPU). No remat: the cache path is never differentiated.
  """
  graphdef, stacked = blocks

  def body(carry, state):
    x, i, k_L, v_L = carry
    kv = (k_L[i], v_L[i], kpos_BxS, slot_BxT)
    y, (keys, values) = nnx.merge(graphdef, state)(x, pos_BxT, inv_freq, kv)
    k_L = lax.dynamic_update_index_in_dim(k_L, keys.astype(k_L.dtype), i, 0)
    v_L = lax.dynamic_update_index_in_dim(v_L, values.astype(v_L.dtype), i, 0)
    return (shd.constrain(y, act), i + 1, k_L, v_L), None

  init = (x_BxTxD, jnp.zeros((), jnp.int32), k_LxBxSxKxDh, v_LxBxSxKxDh)
  (x_BxTxD, _, k_L, v_L), _ = lax.scan(body, init, stacked)
  return x_BxTxD, k_L, v_L
