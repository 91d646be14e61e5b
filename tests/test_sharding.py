"""Activation sharding: on an fsdp mesh rows stay split and only weights are gathered."""

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llds_jax import sharding
from llds_jax.model import KVCache, ModelConfig, Transformer
from llds_jax.train_step import response_logprobs

# Weights small next to activations, so a full-batch activation in a collective stands out.
CFG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, rope_theta=1e4, tie_word_embeddings=True,
                  remat="full", attn_chunk=16)
B, L, R, C = 16, 48, 32, 16  # rows, tokens, response tokens, log-prob chunk
_COLLECTIVE = re.compile(r"=\s*\(?([a-z0-9]+)\[([\d,]*)\][^ ]*\s+(all-reduce|all-gather)(?:-start)?\(")


def _mesh():
  return sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})


def _collectives(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(m[3], tuple(int(d) for d in m[2].split(",") if d)) for m in _COLLECTIVE.finditer(hlo)]


def test_fsdp_mesh_gathers_weights_not_full_batch_activations():
  mesh = _mesh()
  graphdef, params = nnx.split(
      sharding.init_sharded(lambda: Transformer(CFG, rngs=nnx.Rngs(0)), mesh))

  def loss(p, batch):  # the train step's path: hidden states, then fused chunked log-probs
    logp, ent = response_logprobs(graphdef, p, batch, resp_len=R, chunk_size=C)
    return jnp.mean(logp) + jnp.mean(ent)

  ids = jax.device_put(jnp.zeros((B, L), jnp.int32), sharding.batch_sharding(mesh))
  batch = dict(input_ids=ids, positions=ids, attn_mask=ids)
  step = jax.jit(jax.value_and_grad(loss))
  # The smallest full-batch activation a collective could carry: a vocab-split logits chunk.
  # Row-sharded activations are 4× smaller, and gathered weights smaller still.
  too_big = B * C * CFG.vocab_size // 2
  before = _collectives(step.lower(params, batch).compile().as_text())
  after = _collectives(
      sharding.OnMesh(step, mesh).lower(params, batch).compile().as_text())
  # Without the mesh the embedding's D-sharding wins: full-batch logits cross devices.
  assert max(np.prod(s) for _, s in before) >= too_big, before
  assert max(np.prod(s) for _, s in after) < too_big / 2, after
  # FSDP proper: the MLP kernels (D × F/tensor) are all-gathered over fsdp.
  assert ("all-gather", (CFG.hidden_size, CFG.intermediate_size // 2)) in after, after


def test_constrained_forward_and_cache_equal_single_device():
  mesh = _mesh()
  single = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)))[1]
  graphdef, params = nnx.split(
      sharding.init_sharded(lambda: Transformer(CFG, rngs=nnx.Rngs(0)), mesh))

  def run(p, ids_BxT, cache):
    model = nnx.merge(graphdef, p)
    h, cache = model.hidden(ids_BxT, None, None, cache)
    return model.logits(h), cache

  fwd = sharding.OnMesh(jax.jit(run), mesh)
  # 16 rows split 4 ways; 1 row does not divide, so its constraint falls back to replicated rows.
  for rows in (B, 1):
    ids = jnp.asarray(np.random.RandomState(rows).randint(0, CFG.vocab_size, (rows, 20)))
    put = lambda x: jax.device_put(  # noqa: E731
        x, sharding.batch_sharding(mesh, x.ndim) if rows == B else sharding.replicated(mesh))
    logits, cache = fwd(params, put(ids), jax.tree.map(put, KVCache.init(CFG, rows, 24)))
    ref_logits, ref_cache = jax.jit(run)(single, ids, KVCache.init(CFG, rows, 24))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-5)
    np.testing.assert_allclose(np.asarray(cache.k[1]), np.asarray(ref_cache.k[1]), atol=1e-5)


def test_constrain_without_mesh_is_identity():
  x = jnp.ones((3, 5, 7))
  assert sharding.constrain(x, ("batch", "length", "act_embed")) is x
  assert sharding.mesh_of({"a": np.ones(2), "b": x}) is None


def test_prefill_cache_write_stays_within_row_shards():
  """Writing a block into the KV cache must not gather every row's new keys/values."""
  from llds_jax import hosts, sampler
  mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  cfg = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16)
  graphdef, params = nnx.split(sharding.init_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)),
                                                     mesh))
  rows, width = 16, 16
  put = lambda x: hosts.put_rows(x, mesh)  # noqa: E731
  args = (graphdef, params, sampler.init_state(cfg, rows, 64, 4, 0, mesh=mesh),
          put(np.ones((rows, width), np.int32)), put(np.full(rows, 9, np.int32)),
          put(np.full(rows, 3, np.int32)), hosts.put_replicated(np.zeros((0, 1, 256), np.int8), mesh),
          sampler.SampleConfig(1.0, 1.0, 0, ()))
  gathered = [shape for op, shape in _collectives(sampler.feed.lower(*args).compile().as_text())
              if op == "all-gather"]
  assert gathered  # the fsdp-sharded weights are gathered...
  kv_block = (rows, width, cfg.num_kv_heads, cfg.head_dim)
  assert kv_block not in gathered, gathered  # ...but not every row's new keys/values
