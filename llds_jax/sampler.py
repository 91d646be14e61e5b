"""Batched sampling over a slot KV cache: a jitted block feed and a jitted `lax.while_loop` decoder.

Dims (llds_jax/__init__.py): B rows, T tokens of a fed block, Ts tokens per segment, S cache
slots, V vocab, Q stop strings, M stop-string automaton states (bytes of the longest stop string).

Generation runs in *segments*. `feed` writes a right-padded block of new tokens into each row's
cache at that row's next position (the prompt, or in the rollout the pending token plus an
observation), then samples the segment's first token from the logits of the row's last block
token. `decode` samples one token per step until every row has stopped: on an EOS id, on a token
that completes a stop string, or at its per-row limit. The last sampled token of a segment is
*pending*: it is not in the cache yet, so the next `feed` starts with it (or drops it, e.g. an EOS).
A row with an empty block samples nothing in that segment; finished rows cost only masking. An
optional static `view` limits both calls to the first `view` cache slots (sliced out, written back
in place), so attention costs follow the context a segment can reach, not the cache capacity.

Stop strings are matched exactly on bytes through the `[Q, M, V]` automaton table of `stops.py`:
on device each step is one gather per row and stop string, the whole completing token is kept,
and matching restarts at every segment.

Sampling: temperature 0 is argmax (equal to `transformers` greedy). Otherwise logits / temperature,
then top-k, then top-p (nucleus: keep the smallest top set whose mass reaches `top_p`). Row b's key
for the token at position p is `fold_in(fold_in(key(seed), row_offset + b), p)`: rows differ, runs
repeat, and neither depends on batch layout or sharding. The returned log-prob of a sampled token is
the model's log-softmax at temperature 1 (before top-k/top-p), i.e. what the trainer recomputes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding

from llds_jax import hosts, stops
from llds_jax import sharding as shd
from llds_jax.model import KVCache, ModelConfig, Transformer

# Per-row stop reason of the current segment.
RUNNING, EOS, STOP_STRING, LENGTH = 0, 1, 2, 3
STOP_NAMES = ("running", "eos", "stop_string", "length")


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  """Static sampling settings (hashable, so they are a jit static argument)."""

  temperature: float = 0.0  # 0 = greedy
  top_p: float = 1.0  # 1 = off
  top_k: int = 0  # 0 = off
  eos_ids: tuple[int, ...] = ()

  def __post_init__(self):
    if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
      raise ValueError(f"bad sampling settings {self}: need temperature ≥ 0, 0 < top_p ≤ 1, "
                       "top_k ≥ 0")


def bucket(n: int, minimum: int = 16) -> int:
  """Smallest of minimum·{1, 1.5, 2, 3, 4, ...} ≥ n: few compiled shapes, ≤ 50% padding."""
  size = minimum
  while size < n:
    size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
  return size


# ---------------------------------------------------------------------------------------------
# Device side: state, one block feed, the decode loop.

@flax.struct.dataclass
class SamplingState:
  """Everything a row needs to continue generating; all leaves have the row as leading dim."""

  cache: KVCache
  tokens_BxTs: jax.Array  # int32, tokens sampled in the current segment
  logp_BxTs: jax.Array  # float32, their log-probs at temperature 1
  num_B: jax.Array  # int32, tokens sampled in the current segment
  limit_B: jax.Array  # int32, most tokens this segment may sample
  last_B: jax.Array  # int32, the pending token (sampled, not yet in the cache)
  next_pos_B: jax.Array  # int32, the position the pending token takes when fed
  done_B: jax.Array  # bool, stopped in this segment (or had nothing to do)
  stop_B: jax.Array  # int32, RUNNING / EOS / STOP_STRING / LENGTH
  match_BxQ: jax.Array  # int32, stop-string automaton states
  key_B: jax.Array  # per-row PRNG keys


def init_state(cfg: ModelConfig, batch: int, slots: int, segment: int, num_stops: int, *,
               seed: int = 0, row_offset: int = 0, cache_dtype=None, mesh=None) -> SamplingState:
  """An empty state, created directly in its row shards when `mesh` is given.

  `batch` is this process's rows; the global state has `batch × process_count` rows, and row r's
  sampling key is `fold_in(key(seed), row_offset + r)` for its global index r.
  """
  rows = batch * (jax.process_count() if mesh is not None else 1)
  make = _state_maker(cfg, rows, slots, segment, num_stops, cache_dtype, mesh)
  return make(hosts.put_replicated(np.asarray(seed_words(seed) + [row_offset], np.int32), mesh))


def seed_words(seed: int) -> list[int]:
  """`[seed, 0]` for an int32 seed; past it (the trainer's seed × 1,000,003 + step is, from run
  seed 2148 on) `[seed mod 2³¹, seed // 2³¹]`, whose key `fold_in(key(low), high)` is distinct per
  seed, while int32 seeds keep `key(seed)` and so every stream drawn before."""
  if -2**31 <= seed < 2**31:
    return [seed, 0]
  if not -2**61 <= seed < 2**61:
    raise ValueError(f"sampling seed {seed} is out of range: |seed| must be < 2^61")
  return [seed % 2**31, seed // 2**31]


@functools.lru_cache(maxsize=32)
def _state_maker(cfg, batch, slots, segment, num_stops, cache_dtype, mesh):
  """One jitted constructor per shape (a fresh closure per call would recompile every time)."""

  def make(words):  # seed_words(seed) + [row_offset]
    key = jax.lax.cond(words[1] == 0, lambda k: k, lambda k: jax.random.fold_in(k, words[1]),
                       jax.random.key(words[0]))
    rows_B = jnp.arange(batch, dtype=jnp.int32) + words[2]
    key_B = jax.vmap(jax.random.fold_in, (None, 0))(key, rows_B)
    zeros_B = jnp.zeros((batch,), jnp.int32)
    return SamplingState(
        cache=KVCache.init(cfg, batch, slots, cache_dtype),
        tokens_BxTs=jnp.zeros((batch, segment), jnp.int32),
        logp_BxTs=jnp.zeros((batch, segment), jnp.float32),
        num_B=zeros_B, limit_B=zeros_B, last_B=zeros_B, next_pos_B=zeros_B,
        done_B=jnp.ones((batch,), bool), stop_B=zeros_B,
        match_BxQ=jnp.zeros((batch, num_stops), jnp.int32), key_B=key_B)

  shardings = None
  if mesh is not None:
    shardings = state_shardings(jax.eval_shape(make, jax.ShapeDtypeStruct((3,), jnp.int32)), mesh)
  return jax.jit(make, out_shardings=shardings)


def state_shardings(shapes: SamplingState, mesh) -> SamplingState:
  """Every leaf's rows over (data, fsdp); K/V heads also over `tensor` where they divide.

  As the attention that writes them does: a rows-only cache would be replicated on every tensor
  shard, and its donated buffer could not be updated in place.
  """
  rows = jax.tree.map(lambda x: shd.batch_sharding(mesh, x.ndim), shapes)
  kv = lambda x: NamedSharding(mesh, shd.logical_to_spec(  # noqa: E731
      (None, "batch", "length", "kv_heads", "head_dim"), x.shape, mesh))  # layer axis whole
  return rows.replace(cache=KVCache(k=kv(shapes.cache.k), v=kv(shapes.cache.v),
                                    pos_BxS=rows.cache.pos_BxS, end_B=rows.cache.end_B))


def forward_block(model: Transformer, cache: KVCache, tokens_BxT, len_B, start_B, blocks=None):
  """Write each row's first `len_B` tokens at `start_B…`; logits of its last one, and the cache.

  A decode step is the case T = 1. Rows with `len_B == 0` write nothing (their logits are junk).
  `blocks`: the model's `stacked_blocks()` made once outside a decode loop (`scan_cache`).
  """
  ar_1xT = jnp.arange(tokens_BxT.shape[1], dtype=jnp.int32)[None]
  pos_BxT, mask_BxT = start_B[:, None] + ar_1xT, ar_1xT < len_B[:, None]
  h_BxTxD, cache = model.hidden(tokens_BxT, pos_BxT, mask_BxT, cache, blocks=blocks)
  rows_B = jnp.arange(tokens_BxT.shape[0])
  h_BxD = h_BxTxD[rows_B, jnp.maximum(len_B - 1, 0)]
  return model.logits(h_BxD[:, None])[:, 0], cache


def _sample(logits_BxV, key_B, pos_B, sample_cfg: SampleConfig):
  """Sampled ids and their temperature-1 log-probs."""
  logp_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
  if sample_cfg.temperature == 0:
    tok_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  else:
    x_BxV = logits_BxV / sample_cfg.temperature
    if sample_cfg.top_k:
      kth_Bx1 = lax.top_k(x_BxV, sample_cfg.top_k)[0][:, -1:]
      x_BxV = jnp.where(x_BxV < kth_Bx1, -jnp.inf, x_BxV)
    if sample_cfg.top_p < 1:
      desc_BxV = -jnp.sort(-x_BxV, axis=-1)
      p_BxV = jax.nn.softmax(desc_BxV, axis=-1)
      # Keep a token iff the mass strictly above it is < top_p (HF TopPLogitsWarper's rule).
      keep_BxV = jnp.cumsum(p_BxV, axis=-1) - p_BxV < sample_cfg.top_p
      cut_Bx1 = jnp.min(jnp.where(keep_BxV, desc_BxV, jnp.inf), axis=-1, keepdims=True)
      x_BxV = jnp.where(x_BxV < cut_Bx1, -jnp.inf, x_BxV)
    keys_B = jax.vmap(jax.random.fold_in)(key_B, pos_B)
    tok_B = jax.vmap(jax.random.categorical)(keys_B, x_BxV).astype(jnp.int32)
  return tok_B, logp_BxV[jnp.arange(tok_B.shape[0]), tok_B]


def _record(state: SamplingState, tok_B, logp_B, active_B, table_QxMxV,
            sample_cfg: SampleConfig):
  """Append the sampled token of active rows and update their stop status."""
  B, Ts = state.tokens_BxTs.shape
  # A one-hot select rather than a scatter: it stays row-local, so the compiler keeps the buffers
  # sharded by row (a scatter made them replicated, i.e. all-gathered on every decode step).
  write_BxTs = active_B[:, None] & (jnp.arange(Ts)[None, :] == state.num_B[:, None])
  num_B = state.num_B + active_B
  is_eos_B = jnp.zeros((B,), bool)
  if sample_cfg.eos_ids:
    is_eos_B = (tok_B[:, None] == jnp.asarray(sample_cfg.eos_ids, jnp.int32)[None]).any(-1)
  match_BxQ, hit_B = state.match_BxQ, jnp.zeros((B,), bool)
  if table_QxMxV.shape[0]:
    q_1xQ = jnp.arange(table_QxMxV.shape[0])[None]
    nxt_BxQ = table_QxMxV[q_1xQ, state.match_BxQ, tok_B[:, None]].astype(jnp.int32)
    hit_B = (nxt_BxQ < 0).any(-1)
    match_BxQ = jnp.where(active_B[:, None], jnp.maximum(nxt_BxQ, 0), state.match_BxQ)
  reason_B = jnp.select([is_eos_B, hit_B, num_B >= state.limit_B], [EOS, STOP_STRING, LENGTH],
                        RUNNING)
  return state.replace(
      tokens_BxTs=jnp.where(write_BxTs, tok_B[:, None], state.tokens_BxTs),
      logp_BxTs=jnp.where(write_BxTs, logp_B[:, None], state.logp_BxTs),
      num_B=num_B,
      last_B=jnp.where(active_B, tok_B, state.last_B),
      done_B=state.done_B | (active_B & (reason_B != RUNNING)),
      stop_B=jnp.where(active_B, reason_B, state.stop_B),
      match_BxQ=match_BxQ)


def _narrow(cache: KVCache, view: int | None) -> KVCache:
  """The first `view` slots: attention then costs O(view), not O(capacity)."""
  if view is None or view >= cache.slots:
    return cache
  return KVCache(k=cache.k[:, :, :view], v=cache.v[:, :, :view], pos_BxS=cache.pos_BxS[:, :view],
                 end_B=cache.end_B)


def _widen(full: KVCache, part: KVCache) -> KVCache:
  """Write a narrowed cache back into the full one (in place: the state is donated)."""
  if part.slots == full.slots:
    return part
  put = lambda f, x: lax.dynamic_update_slice(f, x, (0,) * f.ndim)  # noqa: E731
  return KVCache(k=put(full.k, part.k), v=put(full.v, part.v),
                 pos_BxS=put(full.pos_BxS, part.pos_BxS), end_B=part.end_B)


# OnMesh without a mesh: each call traces under the mesh its arrays are sharded on (none on one
# device), so the model keeps rows sharded in the rollout and in the dry run's `lower` alike.
@shd.OnMesh
@functools.partial(jax.jit, static_argnames=("graphdef", "sample_cfg", "view"),
                   donate_argnames=("state",))
def feed(graphdef, params, state: SamplingState, tokens_BxT, len_B, limit_B, table_QxMxV,
         sample_cfg: SampleConfig, view: int | None = None) -> SamplingState:
  """Append a block to the cache, open a segment of ≤ `limit_B` tokens, sample its first token.

  Rows with `len_B == 0` or `limit_B == 0` sample nothing in this segment. With `view`, only the
  first `view` slots are read or written: the caller ensures `end + len + limit ≤ view` per row.
  """
  model = nnx.merge(graphdef, params)
  logits_BxV, part = forward_block(model, _narrow(state.cache, view), tokens_BxT, len_B,
                                   state.next_pos_B)
  next_pos_B = state.next_pos_B + len_B
  active_B = (len_B > 0) & (limit_B > 0)
  state = state.replace(
      cache=_widen(state.cache, part), tokens_BxTs=jnp.zeros_like(state.tokens_BxTs),
      logp_BxTs=jnp.zeros_like(state.logp_BxTs), num_B=jnp.zeros_like(state.num_B), limit_B=limit_B,
      next_pos_B=next_pos_B, done_B=~active_B, stop_B=jnp.zeros_like(state.stop_B),
      match_BxQ=jnp.zeros_like(state.match_BxQ))
  tok_B, logp_B = _sample(logits_BxV, state.key_B, next_pos_B, sample_cfg)
  return _record(state, tok_B, logp_B, active_B, table_QxMxV, sample_cfg)


@shd.OnMesh
@functools.partial(jax.jit, static_argnames=("graphdef", "sample_cfg", "view"),
                   donate_argnames=("state",))
def decode(graphdef, params, state: SamplingState, table_QxMxV, sample_cfg: SampleConfig,
           view: int | None = None) -> SamplingState:
  """Sample until every row of the segment has stopped (EOS, stop string or limit)."""
  model = nnx.merge(graphdef, params)
  # Stack the scanned blocks' weights once per segment, not once per decoded token.
  blocks = model.stacked_blocks() if model.cfg.scan_cache else None

  def step(s: SamplingState) -> SamplingState:
    active_B = ~s.done_B
    logits_BxV, cache = forward_block(model, s.cache, s.last_B[:, None], active_B.astype(jnp.int32),
                                      s.next_pos_B, blocks)
    s = s.replace(cache=cache, next_pos_B=s.next_pos_B + active_B)
    tok_B, logp_B = _sample(logits_BxV, s.key_B, s.next_pos_B, sample_cfg)
    return _record(s, tok_B, logp_B, active_B, table_QxMxV, sample_cfg)

  out = lax.while_loop(lambda s: jnp.any(~s.done_B), step,
                       state.replace(cache=_narrow(state.cache, view)))
  return out.replace(cache=_widen(state.cache, out.cache))


# ---------------------------------------------------------------------------------------------
# Host API.

@dataclasses.dataclass
class Generation:
  """New tokens of each row (through its stop token), their log-probs and why each row stopped."""

  tokens: list[list[int]]
  logprobs: list[list[float]]
  stop_reason: list[str]


def sample(model: Transformer, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
           temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
           stop_token_ids: Sequence[int] = (), stop_strings: Sequence[str] = (), tokenizer=None,
           seed: int = 0, mesh=None, cache_dtype=None) -> Generation:
  """`generate` that also returns log-probs and stop reasons."""
  prompts = [[int(t) for t in p] for p in prompt_ids]
  if not prompts or min(map(len, prompts)) == 0:
    raise ValueError("generate: need at least one prompt and no empty prompt")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
  if stop_strings and tokenizer is None:
    raise ValueError("stop_strings need the tokenizer (to know each token's text)")
  cfg = model.cfg
  if stop_strings:
    table = stops.cached_stop_table(tokenizer, tuple(stop_strings), cfg.vocab_size)
  else:
    table = np.zeros((0, 1, cfg.vocab_size), np.int8)
  sample_cfg = SampleConfig(float(temperature), float(top_p), int(top_k),
                            tuple(int(t) for t in stop_token_ids))
  rows, width = hosts.agree_max(hosts.padded_rows(len(prompts), mesh),
                                bucket(max(map(len, prompts))))
  tokens_BxT = np.zeros((rows, width), np.int32)
  len_B = np.zeros((rows,), np.int32)
  for b, p in enumerate(prompts):
    tokens_BxT[b, :len(p)], len_B[b] = p, len(p)
  limit_B = np.where(len_B > 0, max_new_tokens, 0).astype(np.int32)
  graphdef, params = nnx.split(model)
  state = init_state(cfg, rows, width + max_new_tokens, max_new_tokens, table.shape[0], seed=seed,
                     cache_dtype=cache_dtype, mesh=mesh)
  table_QxMxV = hosts.put_replicated(table, mesh)
  put = functools.partial(hosts.put_rows, mesh=mesh)
  state = feed(graphdef, params, state, put(tokens_BxT), put(len_B), put(limit_B), table_QxMxV,
               sample_cfg)
  state = decode(graphdef, params, state, table_QxMxV, sample_cfg)
  toks, logps, num, stop = map(hosts.local_rows,
                               (state.tokens_BxTs, state.logp_BxTs, state.num_B, state.stop_B))
  n = range(len(prompts))
  return Generation(tokens=[toks[b, :num[b]].tolist() for b in n],
                    logprobs=[logps[b, :num[b]].tolist() for b in n],
                    stop_reason=[STOP_NAMES[stop[b]] for b in n])


def generate(model: Transformer, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             stop_token_ids: Sequence[int] = (), stop_strings: Sequence[str] = (), tokenizer=None,
             seed: int = 0, mesh=None, cache_dtype=None) -> list[list[int]]:
  """New tokens per ragged prompt, through its stop token or the token completing a stop string.

  `mesh` shards rows over (data, fsdp); `cache_dtype="bfloat16"` halves the cache.
  """
  return sample(model, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                top_p=top_p, top_k=top_k, stop_token_ids=stop_token_ids, stop_strings=stop_strings,
                tokenizer=tokenizer, seed=seed, mesh=mesh, cache_dtype=cache_dtype).tokens
