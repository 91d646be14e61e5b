"""Activation sharding: on an fsdp mesh rows stay split and only weights are gathered.

The rollout's tensor-only weight layout: decode then gathers no weights at all, same tokens.
"""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llds_jax import hosts, policy, sampler, sharding
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
    cache = KVCache.init(CFG, rows, 24)
    # Keys/values [L, B, S, K, Dh]: rows are their second axis (the layer axis stays whole).
    layer_rows = lambda x: jax.device_put(x, NamedSharding(  # noqa: E731
        mesh, P(None, ("data", "fsdp")) if rows == B else P()))
    cache = cache.replace(k=layer_rows(cache.k), v=layer_rows(cache.v),
                          pos_BxS=put(cache.pos_BxS), end_B=put(cache.end_B))
    logits, cache = fwd(params, put(ids), cache)
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


def _rollout_copy(params, mesh, layout: str):
  """policy.compute_dtype_weights in `layout` (float32 compute, so only the layout changes)."""
  c = ml_collections.ConfigDict({"model": {"dtype": "float32", "param_dtype": "float32"},
                                 "rollout": {"weight_sharding": layout}})
  return policy.compute_dtype_weights(c, jax.eval_shape(lambda: params), mesh)(params)


@pytest.fixture(scope="module")
def fsdp_model():
  mesh = _mesh()
  graphdef, params = nnx.split(
      sharding.init_sharded(lambda: Transformer(CFG, rngs=nnx.Rngs(0)), mesh))
  return mesh, graphdef, params


def test_tensor_layout_decode_gathers_no_weights(fsdp_model):
  mesh, graphdef, params = fsdp_model
  copies = {k: _rollout_copy(params, mesh, k) for k in sharding.WEIGHT_LAYOUTS}
  assert copies["train"] is params  # same dtype and layout: no copy
  # What a device holds of each matrix in the tensor layout: what the train layout must gather.
  weights = {x.sharding.shard_shape(x.shape) for x in jax.tree.leaves(copies["tensor"])
             if x.ndim >= 2 and x.size >= CFG.hidden_size * CFG.head_dim}
  table = hosts.put_replicated(np.zeros((0, 1, CFG.vocab_size), np.int8), mesh)
  gathered = {}
  for layout, p in copies.items():
    state = sampler.init_state(CFG, 8, 32, 4, 0, mesh=mesh)
    hlo = sampler.decode.lower(graphdef, p, state, table,
                               sampler.SampleConfig(0.0, 1.0, 0, ())).compile().as_text()
    gathered[layout] = {shape for op, shape in _collectives(hlo) if op == "all-gather"}
  # Training shards: every decoded token all-gathers the MLP kernels (and every other matrix).
  assert {(CFG.hidden_size, CFG.intermediate_size // 2),
          (CFG.intermediate_size // 2, CFG.hidden_size)} <= gathered["train"], gathered["train"]
  assert not gathered["tensor"] & weights, gathered["tensor"]


def test_greedy_sampling_is_the_same_in_both_layouts(fsdp_model):
  mesh, graphdef, params = fsdp_model
  prompts = [list(np.random.RandomState(i).randint(0, CFG.vocab_size, 3 + 2 * i)) for i in range(6)]
  out = {k: sampler.sample(nnx.merge(graphdef, _rollout_copy(params, mesh, k)), prompts,
                           max_new_tokens=8, mesh=mesh) for k in sharding.WEIGHT_LAYOUTS}
  assert out["tensor"].tokens == out["train"].tokens
  np.testing.assert_allclose(np.concatenate(out["tensor"].logprobs),
                             np.concatenate(out["train"].logprobs), atol=1e-5)


def test_tensor_only_rules_differ_from_training_only_in_embed():
  rules, tensor_only = dict(sharding.DEFAULT_RULES), dict(sharding.TENSOR_ONLY_RULES)
  assert tensor_only.pop("embed") is None and rules.pop("embed") == "fsdp"
  assert tensor_only == rules
