"""Position-masked attention: RoPE, the slot-addressed KV cache and query-blocked kernels.

Dims (llds_jax/__init__.py): B rows, T new tokens (queries), S keys (cache slots), H query heads
(or, in `apply_rope`, whichever heads it is given), K kv heads (H/K query heads share one), Dh head
dim (Dh2 = Dh/2 rotary frequencies), J query blocks of C queries (`attend`).

Padding and caching use one rule: every token has a position, and a token whose mask is 0 gets
position -1. A query attends to a key iff `0 <= pos_k <= pos_q`. Because positions increase along a
row, this is the causal mask for left-padded, right-padded and ragged-append batches alike. The
cache stores keys/values in per-row slots together with each slot's position, so the rollout can
append observation tokens to each row at its own offset without re-prefilling. Long inputs attend
in blocks of queries (`attend`), so only one block's scores are alive at a time; a block is at
most `attn_chunk` queries and at most `attn_block_bytes` of float32 scores per device
(`query_block`), which bounds the sampler's wide feeds as well as the update's long rows.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from llds_jax import sharding as shd
from llds_jax.model_config import ModelConfig

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so fully-masked rows give no NaN


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
  """Inverse RoPE frequencies [Dh/2], including Llama-3 / linear scaling."""
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim))
  scaling = dict(cfg.rope_scaling or {})
  kind = scaling.get("rope_type", "default")
  if kind == "linear":
    return inv / scaling["factor"]
  if kind == "llama3":
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    # Long wavelengths are interpolated by `factor`, short ones kept, the band between blended.
    scaled = jnp.where(wavelen > old_len / lo, inv / factor, inv)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return jnp.where(medium, blended, scaled)
  return inv


def apply_rope(x_BxTxHxDh: jax.Array, pos_BxT: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotate-half RoPE (the HF convention), computed in float32."""
  ang_BxTxDh2 = pos_BxT.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
  cos = jnp.cos(jnp.concatenate([ang_BxTxDh2, ang_BxTxDh2], -1))[:, :, None, :]
  sin = jnp.sin(jnp.concatenate([ang_BxTxDh2, ang_BxTxDh2], -1))[:, :, None, :]
  x = x_BxTxHxDh.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
  return (x * cos + rotated * sin).astype(x_BxTxHxDh.dtype)


@flax.struct.dataclass
class KVCache:
  """Key/value slots of every layer plus each slot's position (-1 = empty) and the next free slot.

  Keys and values carry a leading layer axis, so the cached blocks can run as one `lax.scan` that
  reads and writes layer i of one buffer (`model._scan_cached_blocks`) instead of L buffers.
  """

  k: jax.Array  # [L, B, S, K, Dh]; k[i] is layer i's keys
  v: jax.Array  # [L, B, S, K, Dh]
  pos_BxS: jax.Array  # int32
  end_B: jax.Array  # int32, number of filled slots per row

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, slots: int, dtype=None) -> "KVCache":
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
               pos_BxS=jnp.full((batch, slots), -1, jnp.int32), end_B=jnp.zeros((batch,), jnp.int32))

  @property
  def slots(self) -> int:
    return self.pos_BxS.shape[1]


def write_slots(valid_BxT: jax.Array, end_B: jax.Array, slots: int) -> jax.Array:
  """Slot index of each new token: valid tokens are packed after `end`, the rest go out of range."""
  rank_BxT = jnp.cumsum(valid_BxT.astype(jnp.int32), axis=1) - 1
  # Out-of-range indices are dropped by the scatter; a full cache therefore never corrupts
  # existing slots (the sampler checks capacity on the host before it gets there).
  return jnp.where(valid_BxT, end_B[:, None] + rank_BxT, slots)


def scatter_rows(buf_BxS: jax.Array, new_BxT: jax.Array, slot_BxT: jax.Array) -> jax.Array:
  # vmap over rows gives a scatter with a batch dimension, which the partitioner keeps local to
  # each row shard; an explicit row index made it all-gather every row's new K/V (prefill).
  put = lambda buf_S, new_T, slot_T: buf_S.at[slot_T].set(new_T, mode="drop")  # noqa: E731
  return jax.vmap(put)(buf_BxS, new_BxT.astype(buf_BxS.dtype), slot_BxT)


def query_block(shape_BxTxHxS: tuple[int, int, int, int], chunk: int, max_bytes: int) -> int:
  """Queries per attention block: ≤ `chunk`, and ≤ `max_bytes` of one device's f32 scores.

  A block's scores are B·H·C·S float32 values, B and H counted per device (rows split over
  data/fsdp, heads over tensor on the active mesh). The cap matters for the sampler: one
  observation feed of 512 tokens over 80 rows per device and 3884 slots (Qwen2.5-3B, paper
  batch, 32 chips) would otherwise hold 3 × 9.5 GiB of scores per layer.
  """
  B, T, H, S = shape_BxTxHxS
  c = min(chunk, T) if chunk else T
  if max_bytes:
    b_dev, h_dev = shd.local_shape((B, H), ("batch", "heads"))
    c = min(c, max(1, max_bytes // (4 * b_dev * h_dev * S)))
  return c


def attend(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, qpos_BxT, kpos_BxS, chunk: int = 0,
           max_bytes: int = 0, qseg_BxT=None, kseg_BxS=None):
  """Position-masked softmax attention, one block of `query_block` queries at a time.

  Each of J blocks (C queries, padding < J) attends to every key under the same mask, so the
  result is the dense one up to rounding. A `lax.map` under `jax.checkpoint` keeps one block's
  `B×H×C×S` float32 scores alive, and the backward pass recomputes them block by block.
  With segment ids (packed rows, `packing.py`) a query also needs its key's segment: positions
  restart at 0 in every segment, so the position rule alone would let a row see its neighbours.
  """
  B, T, H, Dh = q_BxTxHxDh.shape
  if (qseg_BxT is None) != (kseg_BxS is None):
    raise ValueError("attend: give both query and key segment ids, or neither")
  chunk = query_block((B, T, H, k_BxSxKxDh.shape[1]), chunk, max_bytes)
  if T <= chunk:
    return _dense_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, qpos_BxT, kpos_BxS, qseg_BxT,
                            kseg_BxS)
  n = -(-T // chunk)
  c = -(-T // n)
  pad = n * c - T
  # Padded queries get position -1: they see no key, stay finite and are sliced off (no gradient).
  q_BxTxHxDh = jnp.pad(q_BxTxHxDh, ((0, 0), (0, pad), (0, 0), (0, 0)))
  qpos_BxT = jnp.pad(qpos_BxT, ((0, 0), (0, pad)), constant_values=-1)
  q_JxBxCxHxDh = jnp.swapaxes(q_BxTxHxDh.reshape(B, n, c, H, Dh), 0, 1)
  qpos_JxBxC = jnp.swapaxes(qpos_BxT.reshape(B, n, c), 0, 1)
  xs = (q_JxBxCxHxDh, qpos_JxBxC)
  if qseg_BxT is not None:
    xs += (jnp.swapaxes(jnp.pad(qseg_BxT, ((0, 0), (0, pad))).reshape(B, n, c), 0, 1),)

  @jax.checkpoint
  def block(xs):
    qseg = xs[2] if len(xs) > 2 else None
    return _dense_attention(xs[0], k_BxSxKxDh, v_BxSxKxDh, xs[1], kpos_BxS, qseg, kseg_BxS)

  out_JxBxCxHxDh = lax.map(block, xs)
  return jnp.swapaxes(out_JxBxCxHxDh, 0, 1).reshape(B, n * c, H, Dh)[:, :T]


def _dense_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, qpos_BxT, kpos_BxS, qseg_BxT=None,
                     kseg_BxS=None):
  B, T, H, Dh = q_BxTxHxDh.shape
  K = k_BxSxKxDh.shape[2]
  q = q_BxTxHxDh.reshape(B, T, K, H // K, Dh)
  logits = jnp.einsum("btkgd,bskd->bkgts", q, k_BxSxKxDh, preferred_element_type=jnp.float32)
  logits = logits / math.sqrt(Dh)
  allowed_BxTxS = (kpos_BxS[:, None, :] >= 0) & (kpos_BxS[:, None, :] <= qpos_BxT[:, :, None])
  if qseg_BxT is not None:
    allowed_BxTxS &= kseg_BxS[:, None, :] == qseg_BxT[:, :, None]
  logits = jnp.where(allowed_BxTxS[:, None, None], logits, _MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_BxSxKxDh.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v_BxSxKxDh)
  return out.reshape(B, T, H, Dh)
