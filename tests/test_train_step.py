"""The jitted update: sharded == single device, non-finite guard, LLDS activity, learning."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from llds_jax import losses, sharding
from llds_jax.model import ModelConfig, Transformer
from llds_jax.train_step import (StepConfig, TrainState, Updater, apply_grads, lr_schedule,
                                  make_optimizer, update_phase)

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, rope_theta=1e4)
P, R, B = 6, 10, 8  # prompt and response tokens, rows


def _opt(lr=1e-3, warmup=0, eps=1e-8):
  return ml_collections.ConfigDict(dict(lr=lr, warmup_steps=warmup, b1=0.9, b2=0.999, eps=eps,
                                        weight_decay=0.01, grad_clip=1.0))


def fake_batch(seed=0, n=B):
  """Left-padded prompts, responses with two actions separated by an observation, padding."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(1, CFG.vocab_size, (n, P + R))
  attn = np.ones((n, P + R), np.int32)
  loss = np.zeros((n, R), np.int32)
  for i in range(n):
    attn[i, :rng.randint(0, 3)] = 0  # prompt left padding
    end = rng.randint(6, R + 1)
    attn[i, P + end:] = 0  # response right padding
    loss[i, :end] = 1
    loss[i, 2:4] = 0  # an observation between two actions
  pos = np.maximum(np.cumsum(attn, 1) - 1, 0)
  rewards = rng.randint(0, 2, n).astype(np.float32)
  adv = np.asarray(losses.grpo_advantages(jnp.asarray(rewards), jnp.arange(n) // 4))
  return dict(input_ids=ids, attn_mask=attn, positions=pos, loss_mask=loss, adv=adv,
              answer_weight=np.ones((n, R), np.float32))


def _updater(mesh_shape, lr=1e-3, num_micro=2, cfg=CFG, logprob_rows=0, eps=1e-8, **loss_kw):
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:int(np.prod(list(mesh_shape.values())))])
  model = sharding.init_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
  graphdef, params = nnx.split(model)
  step_cfg = StepConfig(loss=losses.LossConfig(**loss_kw), num_micro=num_micro, chunk_size=4,
                        logprob_rows=logprob_rows)
  up = Updater(graphdef, jax.eval_shape(lambda: params), opt=_opt(lr, eps=eps), step_cfg=step_cfg,
               mesh=mesh)
  return up, up.init_state(params), params


def _host(tree):
  return jax.tree.map(np.asarray, tree)


def test_sharded_equals_single_device():
  # λ = 0 here: on the first minibatch old_logp == logp up to float noise, and the LLDS gradient
  # (−λ on tokens whose Δ > 0) is decided by that noise, which differs between device layouts.
  # Adam's eps is raised for the same reason: Adam divides each update by the gradient's own
  # RMS, so a component that is 0 up to float noise (~1e-9, different in each layout) still
  # moves by ±lr, and the layouts then differ by up to 2·lr in it (seen: 2e-4 on one CPU kind).
  results = []
  for shape in ({"data": 1, "fsdp": 1, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2}):
    up, state, ref = _updater(shape, llds_lambda=0.0, eps=1e-3)
    for step in range(3):
      state, _, _ = update_phase(up, state, fake_batch(step), ref, minibatch=4)
    results.append(_host(state.params))
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_remat_and_blocked_logprobs_give_the_same_update():
  """Rematerialized blocks and a log-prob pass in row blocks change memory, not results."""
  import dataclasses
  shape = {"data": 2, "fsdp": 2, "tensor": 2}
  results = []
  for remat, rows in (("none", 0), ("full", 4), ("dots", 4)):
    up, state, ref = _updater(shape, cfg=dataclasses.replace(CFG, remat=remat), logprob_rows=rows,
                              llds_lambda=0.0)
    batch = fake_batch()
    placed = {k: jax.device_put(v, up.batch_shardings[k]) for k, v in batch.items()}
    results.append((_host(up.logprobs(state.params, placed)),
                    _host(update_phase(up, state, batch, ref, minibatch=4)[0].params)))
  for got in results[1:]:
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(got)):
      np.testing.assert_allclose(a, b, atol=1e-5)


def test_nonfinite_update_is_skipped_and_counted():
  up, state, ref = _updater({"data": 2, "fsdp": 2, "tensor": 2})
  before = _host(state)
  batch = fake_batch()
  batch["adv"] = batch["adv"].copy()
  batch["adv"][0] = np.nan
  state, metrics, _ = update_phase(up, state, batch, ref, minibatch=8)
  after = _host(state)
  for a, b in zip(jax.tree.leaves((before.params, before.opt_state)),
                  jax.tree.leaves((after.params, after.opt_state))):
    np.testing.assert_array_equal(a, b)
  assert int(after.skipped) == 1 and int(metrics[0]["skipped_nonfinite"]) == 1
  assert int(after.opt_step) == 0 and int(after.step) == 1


def test_finite_gradient_with_nonfinite_updated_params_is_skipped_and_counted():
  # lr overflows float32: the gradient and loss are finite, the updated weights are not.
  up, state, ref = _updater({"data": 2, "fsdp": 2, "tensor": 2}, lr=1e39)
  before = _host(state)
  state, metrics, _ = update_phase(up, state, fake_batch(), ref, minibatch=8)
  after = _host(state)
  assert np.isfinite(float(metrics[0]["grad_norm"])) and np.isfinite(
      float(metrics[0]["loss/total"]))
  for a, b in zip(jax.tree.leaves((before.params, before.opt_state)),
                  jax.tree.leaves((after.params, after.opt_state))):
    np.testing.assert_array_equal(a, b)
  assert int(after.skipped) == 1 and int(metrics[0]["skipped_nonfinite"]) == 1



def test_optimizer_update_program_grows_linearly_with_leaves():
  # The skip guard is one cond over the whole tree. A `where` per leaf let XLA fuse the flag's
  # reduction over every leaf into each leaf's select: the program grew with leaves² (3.0× the
  # lines for 2× the leaves; 88 s of the 24-layer update's CPU compile, bench/RESULTS.md).
  opt = _opt()
  tx, schedule = make_optimizer(opt), lr_schedule(opt)
  zero = jnp.zeros((), jnp.int32)

  def hlo_lines(leaves):
    params = {f"w{i}": jax.ShapeDtypeStruct((4, 8), jnp.float32) for i in range(leaves)}
    state = jax.eval_shape(lambda p: TrainState(step=zero, opt_step=zero, params=p,
                                                opt_state=tx.init(p), skipped=zero), params)
    step = jax.jit(lambda s, g, loss: apply_grads(s, g, {"loss/total": loss}, tx=tx,
                                                  schedule=schedule))
    compiled = step.lower(state, params, jax.ShapeDtypeStruct((), jnp.float32)).compile()
    return compiled.as_text().count("\n")

  assert hlo_lines(64) < 2.3 * hlo_lines(32)

def test_llds_zero_on_first_minibatch_positive_later():
  up, state, ref = _updater({"data": 2, "fsdp": 1, "tensor": 1}, lr=3e-2, llds_lambda=0.2)
  _, metrics, _ = update_phase(up, state, fake_batch(), ref, minibatch=2)
  llds = [float(m["loss/llds"]) for m in metrics]
  assert abs(llds[0]) < 1e-7, llds
  assert max(llds[1:]) > 1e-4, llds


def test_warmup_starts_at_zero_lr():
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  graphdef, params = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)))
  step_cfg = StepConfig(loss=losses.LossConfig(), num_micro=1, chunk_size=4)
  up = Updater(graphdef, jax.eval_shape(lambda: params), opt=_opt(1e-3, warmup=4),
               step_cfg=step_cfg, mesh=mesh)
  state = up.init_state(params)
  state, m0, _ = update_phase(up, state, fake_batch(), params, minibatch=8)
  state, m1, _ = update_phase(up, state, fake_batch(1), params, minibatch=8)
  assert float(m0[0]["lr"]) == 0.0 and float(m1[0]["lr"]) == pytest.approx(2.5e-4)


def test_updates_raise_likelihood_of_positive_responses():
  up, state, ref = _updater({"data": 1, "fsdp": 2, "tensor": 2}, lr=1e-2)
  batch = fake_batch(3)
  start = None
  for _ in range(4):
    state, _, stats = update_phase(up, state, batch, ref, minibatch=8)
    pos = float(stats["lld/preserving_logp"])
    start = pos if start is None else start
  assert pos > start + 0.1, (start, pos)
