"""Fused, chunked per-token log-probs and entropies from final hidden states.

Dims (llds_jax/__init__.py): B rows, T tokens, D embed, V vocab, J chunks of C tokens, Sh row
shards.

The full `B×T×V` logits tensor never exists. The sequence is cut into J chunks of C tokens and a
`lax.scan` visits one chunk at a time, in the forward pass and again in a hand-written backward
pass (`jax.custom_vjp`) that recomputes the chunk's logits from the saved per-token log-sum-exp.
So the forward keeps only `B×T` outputs and the backward holds about two `B×C×V` float32 blocks at a
time. Gradients are exact: d log p_y / dz = onehot(y) − p and dH/dz = −p·(log p + H), for logits
z = h·W / temperature, chained into h and W.

Sharding: the batch dim is never merged with anything (rows may be sharded over `data`/`fsdp`),
the target logit is a one-hot select rather than a gather, and every V reduction is a plain sum or
max, so a vocab-sharded unembedding (`tensor`) works under `jit` with ordinary collectives.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from llds_jax import sharding as shd


class _Opts(NamedTuple):
  """Static knobs of the fused kernel (hashable, so they can be custom_vjp nondiff args)."""
  inv_temp: float
  with_entropy: bool
  compute_dtype: jnp.dtype


def _chunk_layout(num_tokens: int, chunk_size: int) -> tuple[int, int]:
  """(J, C): J = ceil(T / chunk_size) chunks of equal size C ≤ chunk_size, padding < J."""
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
  num_chunks = -(-num_tokens // chunk_size)
  return num_chunks, -(-num_tokens // num_chunks)


def _chunk_logits(h_BxCxD, w_DxV, opts: _Opts):
  z_BxCxV = jnp.einsum("bcd,dv->bcv", h_BxCxD.astype(opts.compute_dtype), w_DxV,
                       preferred_element_type=jnp.float32)
  return z_BxCxV * opts.inv_temp if opts.inv_temp != 1.0 else z_BxCxV


def _one_hot(tgt_BxC, v: int):
  # Elementwise compare against an iota: with V sharded this stays local (no gather).
  return lax.broadcasted_iota(jnp.int32, (1, 1, v), 2) == tgt_BxC[:, :, None]


def _gathered(w_DxV, opts: _Opts):
  """The unembedding in compute dtype with D whole (V stays split over `tensor`).

  Every chunk contracts over all of D. Left D-sharded (`embed` -> fsdp, as stored) the partitioner
  all-gathers W inside the chunk scan, once per chunk and pass; gathered here it happens once.
  """
  return shd.constrain(w_DxV.astype(opts.compute_dtype), (None, "vocab"))


def _fwd_scan(h_JxBxCxD, w_DxV, tgt_JxBxC, opts: _Opts):
  """(logp, entropy, lse) per token, each J×B×C float32."""
  w_DxV = _gathered(w_DxV, opts)
  v = w_DxV.shape[1]

  def step(_, xs):
    h_BxCxD, tgt_BxC = xs
    z_BxCxV = _chunk_logits(h_BxCxD, w_DxV, opts)
    lse_BxC = jax.nn.logsumexp(z_BxCxV, axis=-1)
    tgt_z_BxC = jnp.sum(jnp.where(_one_hot(tgt_BxC, v), z_BxCxV, 0.0), axis=-1)
    if opts.with_entropy:
      # H = lse − Σ p·z, without a separate log_softmax block.
      p_BxCxV = jnp.exp(z_BxCxV - lse_BxC[:, :, None])
      ent_BxC = lse_BxC - jnp.sum(p_BxCxV * z_BxCxV, axis=-1)
    else:
      ent_BxC = jnp.zeros_like(lse_BxC)
    return None, (tgt_z_BxC - lse_BxC, ent_BxC, lse_BxC)

  _, outs = lax.scan(step, None, (h_JxBxCxD, tgt_JxBxC))
  return outs


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused(h_JxBxCxD, w_DxV, tgt_JxBxC, opts: _Opts):
  logp_JxBxC, ent_JxBxC, _ = _fwd_scan(h_JxBxCxD, w_DxV, tgt_JxBxC, opts)
  return logp_JxBxC, ent_JxBxC


def _fused_fwd(h_JxBxCxD, w_DxV, tgt_JxBxC, opts: _Opts):
  logp_JxBxC, ent_JxBxC, lse_JxBxC = _fwd_scan(h_JxBxCxD, w_DxV, tgt_JxBxC, opts)
  res = (h_JxBxCxD, w_DxV, tgt_JxBxC, lse_JxBxC, ent_JxBxC)
  return (logp_JxBxC, ent_JxBxC), res


def _row_shards(b: int) -> int:
  """How many shards the active mesh splits `b` rows into (1 without a mesh)."""
  return b // shd.local_shape((b,), ("batch",))[0]


def _fused_bwd(opts: _Opts, res, cts):
  h_JxBxCxD, w_DxV, tgt_JxBxC, lse_JxBxC, ent_JxBxC = res
  g_logp_JxBxC, g_ent_JxBxC = cts
  w_cd_DxV = _gathered(w_DxV, opts)
  b, v = h_JxBxCxD.shape[1], w_DxV.shape[1]
  # dW sums over rows, which are sharded: a D×V carry would be all-reduced on every chunk (the
  # 3B dry run: 154 GB per step). Each row shard keeps its own partial sum (Sh×D×V, Sh sharded
  # like the rows, so one D×V per device as before) and they are reduced once after the scan.
  s = _row_shards(b)
  dw_axes = ("batch", None, "vocab")

  def step(dw_ShxDxV, xs):
    h_BxCxD, tgt_BxC, lse_BxC, ent_BxC, g_logp_BxC, g_ent_BxC = xs
    z_BxCxV = _chunk_logits(h_BxCxD, w_cd_DxV, opts)
    logq_BxCxV = z_BxCxV - lse_BxC[:, :, None]  # log softmax, recomputed
    p_BxCxV = jnp.exp(logq_BxCxV)
    g_z_BxCxV = g_logp_BxC[:, :, None] * (_one_hot(tgt_BxC, v) - p_BxCxV)
    if opts.with_entropy:
      g_z_BxCxV -= g_ent_BxC[:, :, None] * p_BxCxV * (logq_BxCxV + ent_BxC[:, :, None])
    # Chain through z = h·W·inv_temp; matmul operands in compute_dtype, as torch autocast does.
    g_z_BxCxV = (g_z_BxCxV * opts.inv_temp).astype(opts.compute_dtype)
    dh_BxCxD = jnp.einsum("bcv,dv->bcd", g_z_BxCxV, w_cd_DxV, preferred_element_type=jnp.float32)
    # dW is summed over chunks in a float32 carry, whatever the matmul dtype.
    h_ShxbxCxD = h_BxCxD.astype(opts.compute_dtype).reshape(s, b // s, *h_BxCxD.shape[1:])
    g_z_ShxbxCxV = g_z_BxCxV.reshape(s, b // s, *g_z_BxCxV.shape[1:])
    dw_ShxDxV += jnp.einsum("sbcd,sbcv->sdv", h_ShxbxCxD, g_z_ShxbxCxV,
                           preferred_element_type=jnp.float32)
    return shd.constrain(dw_ShxDxV, dw_axes), dh_BxCxD.astype(h_BxCxD.dtype)

  xs = (h_JxBxCxD, tgt_JxBxC, lse_JxBxC, ent_JxBxC, g_logp_JxBxC, g_ent_JxBxC)
  dw0_ShxDxV = shd.constrain(jnp.zeros((s, *w_DxV.shape), jnp.float32), dw_axes)
  dw_ShxDxV, dh_JxBxCxD = lax.scan(step, dw0_ShxDxV, xs)
  return dh_JxBxCxD, dw_ShxDxV.sum(0).astype(w_DxV.dtype), None  # integer targets: no cotangent


_fused.defvjp(_fused_fwd, _fused_bwd)


def token_logprobs(
    hidden_BxTxD: jax.Array,
    unembed_DxV: jax.Array,
    targets_BxT: jax.Array,
    *,
    chunk_size: int = 256,
    temperature: float = 1.0,
    with_entropy: bool = True,
    compute_dtype=None,
) -> tuple[jax.Array, jax.Array | None]:
  """Returns (log p(target), entropy) per token, float32; entropy is None without `with_entropy`.

  `hidden_BxTxD` are the final (post-norm) hidden states at the positions that predict
  `targets_BxT`; `unembed_DxV` is the lm_head kernel (or `embedding.T` for tied embeddings).
  Logits are divided by `temperature` before the softmax, as the official actor does. The matmuls
  run in `compute_dtype` (default: the inputs' promoted dtype) with float32 accumulation; the
  log-sum-exp, the entropy and the gradient sum over chunks are float32. First-order
  differentiable (reverse mode) w.r.t. hidden states and unembedding. A target outside [0, V)
  (e.g. padding) gets the finite value −logsumexp; mask such positions downstream.
  """
  b, t, d = hidden_BxTxD.shape
  if unembed_DxV.shape[0] != d or targets_BxT.shape != (b, t):
    raise ValueError(f"shapes: hidden {hidden_BxTxD.shape}, unembed {unembed_DxV.shape}, "
                     f"targets {targets_BxT.shape}")
  if compute_dtype is None:
    compute_dtype = jnp.promote_types(hidden_BxTxD.dtype, unembed_DxV.dtype)
  opts = _Opts(float(1.0 / temperature), bool(with_entropy), jnp.dtype(compute_dtype))
  n, c = _chunk_layout(t, chunk_size)
  pad = n * c - t
  # Padded tail positions produce finite values that are sliced off, so they get no gradient.
  h_BxTxD = jnp.pad(hidden_BxTxD, ((0, 0), (0, pad), (0, 0)))
  tgt_BxT = jnp.pad(targets_BxT.astype(jnp.int32), ((0, 0), (0, pad)))
  h_JxBxCxD = jnp.swapaxes(h_BxTxD.reshape(b, n, c, d), 0, 1)
  tgt_JxBxC = jnp.swapaxes(tgt_BxT.reshape(b, n, c), 0, 1)
  logp_JxBxC, ent_JxBxC = _fused(h_JxBxCxD, unembed_DxV, tgt_JxBxC, opts)

  def unchunk(x_JxBxC):
    return jnp.swapaxes(x_JxBxC, 0, 1).reshape(b, n * c)[:, :t]

  return unchunk(logp_JxBxC), (unchunk(ent_JxBxC) if with_entropy else None)
