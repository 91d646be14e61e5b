"""Tests for llds_jax.losses against loop-based NumPy oracles and hand-derived formulas.

Dims: B batch rows, T response tokens.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llds_jax import losses
import llds_reference as ref

LAM = 0.2
# Jitted once per static config: eager dispatch would compile every small op separately.
llds_loss = jax.jit(losses.llds_loss, static_argnames=("gate", "norm"))
llds_stats = jax.jit(losses.llds_stats)


def make_batch(seed, b=10, t=48, adv_choices=(-1.2, -0.3, 0.0, 0.0, 0.8, 1.5)):
  """Multi-turn rows: actions (mask 1) separated by observations (mask 0), then padding.

  Row 0 is all observation (fully masked), row 1 is all padding; the rest have several actions.
  `span` marks the last ≤ 3 model tokens of each row (the answer).
  """
  rng = np.random.default_rng(seed)
  mask = np.zeros((b, t), np.float32)
  attn = np.zeros((b, t), np.float32)
  span = np.zeros((b, t), np.float32)
  for i in range(b):
    length = t if i == 0 else (0 if i == 1 else int(rng.integers(t // 2, t + 1)))
    attn[i, :length] = 1
    pos = 0
    while i > 1 and pos < length:
      a = int(rng.integers(1, 7))
      mask[i, pos:min(pos + a, length)] = 1
      pos += a + int(rng.integers(1, 5))
    model_tokens = np.flatnonzero(mask[i])
    span[i, model_tokens[-3:]] = 1
  old = (-np.abs(rng.normal(1.0, 1.0, (b, t)))).astype(np.float32)
  # Row-level drift plus token noise: actions end up with both signs of ΣΔ.
  drift = rng.normal(0.0, 0.3, (b, 1))
  lp = (old + drift + rng.normal(0.0, 0.4, (b, t))).astype(np.float32)
  adv = rng.choice(np.asarray(adv_choices, np.float32), size=b).astype(np.float32)
  return dict(lp=lp, old=old, adv=adv, mask=mask, attn=attn, span=span)


def official(batch, **kw):
  """Oracle call with the official conventions (token advantages, inverted answer mask)."""
  adv_tok = batch["adv"][:, None] * batch["attn"]
  return ref.official_llds(batch["lp"], batch["old"], adv_tok, batch["mask"], lam=LAM, **kw)


WEIGHTINGS = ("none", "fixed", "adaptive")


def _beta(weighting):
  """(β for our answer_weights, oracle kwargs) for one LLDS-MA setting."""
  if weighting == "fixed":
    return losses.fixed_beta(0.05, LAM), dict(mask_weight=0.05)
  if weighting == "adaptive":
    beta = losses.adaptive_beta(1.6, formula="code", base_weight=LAM, lam=LAM)
    return beta, dict(mask_weight=LAM, mask_adaptive=True, valid_search_stats=1.6)
  return None, {}


@pytest.mark.parametrize("gate,weighting", list(itertools.product(losses.GATES, WEIGHTINGS)))
def test_llds_token_norm_matches_official(gate, weighting):
  beta, kw = _beta(weighting)
  for seed in range(4):
    batch = make_batch(seed)
    weights = None if beta is None else losses.answer_weights(batch["span"], beta)
    ours = LAM * llds_loss(batch["lp"], batch["old"], batch["adv"], batch["mask"], gate=gate,
                    answer_weight_BxT=weights, norm="token")
    answer_mask = None if beta is None else 1.0 - batch["span"]
    want, _ = official(batch, gate=gate, answer_mask=answer_mask, **kw)
    assert want > 0  # the batches do exercise the penalty
    np.testing.assert_allclose(float(ours), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("gate,weighting", list(itertools.product(losses.GATES, WEIGHTINGS)))
def test_llds_response_norm_matches_paper(gate, weighting):
  beta, _ = _beta(weighting)
  for seed in range(4):
    batch = make_batch(seed)
    weights = None if beta is None else losses.answer_weights(batch["span"], beta)
    ours = llds_loss(batch["lp"], batch["old"], batch["adv"], batch["mask"], gate=gate,
                     answer_weight_BxT=weights, norm="response")
    want = ref.paper_llds(batch["lp"], batch["old"], batch["adv"], batch["mask"], gate=gate,
                          weights=None if weights is None else np.asarray(weights))
    assert want > 0
    np.testing.assert_allclose(float(ours), want, rtol=1e-6, atol=1e-7)


def test_llds_gates_differ_and_order():
  # Token ≥ response-or-action on the same batch: the gates only remove terms.
  batch = make_batch(3)
  args = (batch["lp"], batch["old"], batch["adv"], batch["mask"])
  vals = {g: float(llds_loss(*args, gate=g)) for g in losses.GATES}
  assert vals["token"] > vals["action"] > 0 and vals["token"] > vals["response"] > 0
  assert len(set(vals.values())) == 3


@pytest.mark.parametrize("gate,norm", list(itertools.product(losses.GATES, losses.NORMS)))
def test_llds_no_preserving_rows_and_empty_mask(gate, norm):
  batch = make_batch(1, adv_choices=(-1.0, -0.5))
  args = (batch["lp"], batch["old"], batch["adv"], batch["mask"])
  assert float(llds_loss(*args, gate=gate, norm=norm)) == 0.0
  if norm == "token":
    assert official(batch, gate=gate)[0] == 0.0
  # Fully masked micro-batch: the official masked_mean is 0/0 = NaN; ours is 0 with 0 gradient.
  empty = np.zeros_like(batch["mask"])
  fn = lambda lp: llds_loss(lp, batch["old"], np.abs(batch["adv"]), empty, gate=gate,
                            norm=norm)
  val, grad = jax.value_and_grad(fn)(batch["lp"])
  assert float(val) == 0.0 and np.all(np.asarray(grad) == 0.0)
  assert np.isnan(official(dict(batch, mask=empty), gate=gate)[0])
  stats = llds_stats(batch["lp"], batch["old"], batch["adv"], empty)
  assert all(float(v) == 0.0 for v in stats.values())


def test_llds_zero_when_policy_unchanged():
  # First minibatch of an update: logp == old exactly, so every gate is closed.
  batch = make_batch(2)
  for gate, norm in itertools.product(losses.GATES, losses.NORMS):
    val, grad = jax.value_and_grad(llds_loss)(
        batch["old"], batch["old"], batch["adv"], batch["mask"], gate=gate, norm=norm)
    assert float(val) == 0.0 and np.all(np.asarray(grad) == 0.0)


def test_llds_hand_example():
  # One preserving row, two actions split by an observation token, one A<0 row.
  old = np.zeros((2, 7), np.float32)
  lp = np.array([[-0.5, 0.2, 0.0, -0.1, -0.3, 0.5, 0.0],
                 [-1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0]], np.float32)
  mask = np.array([[1, 1, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]], np.float32)
  adv = np.array([0.0, -1.0], np.float32)
  # Δ = −lp. Action 1: Δ = (0.5, −0.2), Σ = 0.3 > 0 → 0.5. Action 2: Δ = (0.1, 0.3, −0.5) < 0.
  # Response: ΣΔ = 0.2 > 0 → 0.5 + 0.1 + 0.3. Token: same 0.9. Official norm: / 12 tokens.
  args = (lp, old, adv, mask)
  np.testing.assert_allclose(llds_loss(*args, gate="action"), 0.5 / 12, rtol=1e-6)
  np.testing.assert_allclose(llds_loss(*args, gate="response"), 0.9 / 12, rtol=1e-6)
  np.testing.assert_allclose(llds_loss(*args, gate="token"), 0.9 / 12, rtol=1e-6)
  np.testing.assert_allclose(llds_loss(*args, gate="action", norm="response"), 0.5 / 5,
                             rtol=1e-6)
  w = losses.answer_weights(np.array([[0, 0, 0, 0, 0, 1, 1], [0] * 7]), 0.25)
  np.testing.assert_allclose(
      llds_loss(lp, old, adv, mask, gate="token", answer_weight_BxT=w), 0.9 / 12,
      rtol=1e-6)  # the weighted token (Δ = −0.5) contributes nothing either way
  w = losses.answer_weights(np.array([[1, 0, 0, 0, 0, 0, 0], [0] * 7]), 0.25)
  np.testing.assert_allclose(llds_loss(*args, gate="action", answer_weight_BxT=w),
                             0.125 / 12, rtol=1e-6)
  stats = llds_stats(*args)
  assert float(stats["llds/active_frac"]) == 0.5
  assert float(stats["llds/active_chunks"]) == 1.0
  assert float(stats["llds/actions_per_resp"]) == 2.0
  assert float(stats["llds/resp_active_frac"]) == 1.0


@pytest.mark.parametrize("gate", losses.GATES)
def test_llds_gradient_is_analytic(gate):
  batch = make_batch(5)
  span = batch["span"]
  weights = losses.answer_weights(span, 0.3)
  fn = lambda lp: llds_loss(lp, batch["old"], batch["adv"], batch["mask"], gate=gate,
                            answer_weight_BxT=weights)
  grad = np.asarray(jax.grad(fn)(batch["lp"]))
  # Each token's gate, recomputed with loops from the definitions; d/dlogp max(0, old − logp)
  # is −1 where Δ > 0, so the official-norm gradient is −gate·[Δ > 0]·w·mask / Σmask.
  delta = batch["old"].astype(np.float64) - batch["lp"]
  keep = batch["adv"] >= 0
  on = np.zeros_like(delta, bool)
  for i in range(delta.shape[0]):
    if not keep[i]:
      continue
    runs = ref._chunks(batch["mask"][i] > 0)
    row_sum = sum(delta[i, j] for r in runs for j in r)
    for r in runs:
      s = {"action": sum(delta[i, j] for j in r), "response": row_sum, "token": 1.0}[gate]
      for j in r:
        on[i, j] = s > 0
  active = (on & (delta > 0)).astype(np.float64)
  want = -active * np.asarray(weights) * batch["mask"] / batch["mask"].sum()
  np.testing.assert_allclose(grad, want, rtol=1e-6, atol=1e-9)
  # No gradient through the gate: inside an open gate, tokens with Δ ≤ 0 get exactly zero.
  assert np.any(on & (delta <= 0))
  assert np.all(grad[on & (delta <= 0)] == 0.0)
  assert np.all(grad[~on] == 0.0)


def test_llds_stats_match_official_mean_reduce_chunk():
  for seed in range(4):
    batch = make_batch(seed)
    # The official code averages over rows whose *token* advantage sum is ≥ 0, which also takes
    # in a row of pure padding with Â < 0 (sum 0); ours counts rows with Â ≥ 0. Real responses
    # are never empty, so give the padding row a non-negative advantage here.
    batch["adv"][1] = abs(batch["adv"][1])
    stats = llds_stats(batch["lp"], batch["old"], batch["adv"], batch["mask"])
    _, want = official(batch, gate="action")
    np.testing.assert_allclose(float(stats["llds/active_chunks"]), want, rtol=1e-6)
    assert 0.0 < float(stats["llds/active_frac"]) < 1.0


def test_action_sums_against_loops():
  rng = np.random.default_rng(0)
  run = rng.random((6, 33)) < 0.6
  run[0] = True
  run[1] = False
  x = rng.normal(size=(6, 33)).astype(np.float32)
  total, starts = jax.jit(losses._action_sums)(x, run)
  want = np.zeros_like(x)
  for i in range(6):
    for chunk in ref._chunks(run[i]):
      want[i, chunk] = sum(float(x[i, j]) for j in chunk)
  np.testing.assert_allclose(np.asarray(total), want, rtol=1e-5, atol=1e-6)
  assert np.array_equal(np.asarray(starts).sum(1), [len(ref._chunks(r)) for r in run])


# ----------------------------------------------------------------------------------------------
# GRPO advantages.


def numpy_advantages(r, g, eps=1e-6):
  out = np.zeros(len(r))
  for i in range(len(r)):
    members = [r[j] for j in range(len(r)) if g[j] == g[i]]
    if len(members) == 1:
      mean, std = 0.0, 1.0
    else:
      mean, std = np.mean(members), np.std(members, ddof=1)
    out[i] = (r[i] - mean) / (std + eps)
  return out


def test_grpo_advantages_vs_numpy_and_order():
  rng = np.random.default_rng(0)
  g = np.array([3, 3, 3, 3, 3, 7, 7, 7, 7, 7, 11, 42, 42, 42, 9, 9], np.int32)
  r = rng.integers(0, 2, len(g)).astype(np.float32)
  r[[14, 15]] = 1.0  # a constant group → advantages 0
  r[5:10] = [0.2, 0.9, 0.0, 1.0, 0.5]
  fn = jax.jit(losses.grpo_advantages)
  adv = np.asarray(fn(r, g))
  np.testing.assert_allclose(adv, numpy_advantages(r, g), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(adv[10], r[10] / (1 + 1e-6), rtol=1e-7)  # singleton group
  assert np.all(adv[14:] == 0.0)
  perm = rng.permutation(len(g))
  np.testing.assert_allclose(np.asarray(fn(r[perm], g[perm])), adv[perm], rtol=1e-6, atol=1e-7)


def test_grpo_advantages_groups_by_id_not_position():
  # The same group id at both ends of the batch, interleaved with other groups.
  g = np.array([5, 1, 1, 2, 2, 1, 5, 2, 5], np.int32)
  r = np.array([1, 0, 1, 0, 0, 1, 0, 1, 1], np.float32)
  adv = np.asarray(losses.grpo_advantages(r, g))
  np.testing.assert_allclose(adv, numpy_advantages(r, g), rtol=1e-5)
  assert adv[0] == adv[8] and adv[0] > 0 > adv[6]
  contiguous = np.asarray(losses.grpo_advantages(np.array([1, 0, 1], np.float32),
                                                 np.array([0, 0, 0])))
  np.testing.assert_allclose(adv[[0, 6, 8]], contiguous, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Policy-gradient surrogates, KL, aggregation.


def _pg_inputs(seed=0, b=6, t=9):
  rng = np.random.default_rng(seed)
  old = -np.abs(rng.normal(1, 1, (b, t))).astype(np.float32)
  lp = (old + rng.normal(0, 0.3, (b, t))).astype(np.float32)
  lp[0, 0] = old[0, 0] + 5.0  # ratio e^5 ≈ 148 > 100: hits the LLDS fork's clamp
  lp[1, 1] = old[1, 1] + 6.0
  adv = np.array([-1.0, 0.7, 0.0, 1.3, -0.4, 0.2], np.float32)[:b]
  mask = (rng.random((b, t)) < 0.8).astype(np.float32)
  mask[:2, :2] = 1
  mask[5] = 0  # one fully masked row
  return lp, old, adv, mask


def test_ppo_clip_loss_vs_numpy():
  lp, old, adv, mask = _pg_inputs()
  for clamp in (100.0, None, 0.0):
    loss, clipfrac, approx_kl = losses.ppo_clip_loss(lp, old, adv, mask, clip_low=0.2,
                                                     clip_high=0.28, ratio_clamp=clamp)
    ratio = np.exp(lp.astype(np.float64) - old)
    if clamp:
      ratio = np.minimum(ratio, clamp)
    a = adv[:, None].astype(np.float64)
    pg1, pg2 = -a * ratio, -a * np.clip(ratio, 0.8, 1.28)
    np.testing.assert_allclose(np.asarray(loss), np.maximum(pg1, pg2), rtol=1e-5)
    np.testing.assert_allclose(clipfrac, ((pg2 > pg1) * mask).sum() / mask.sum(), rtol=1e-6)
    np.testing.assert_allclose(approx_kl, ((old - lp) * mask).sum() / mask.sum(), rtol=1e-5)
  loss, _, _ = losses.ppo_clip_loss(lp, old, adv, mask)
  assert float(loss[0, 0]) == pytest.approx(100.0)  # A = −1: capped, no dual clip
  grad = jax.grad(lambda x: jnp.sum(losses.ppo_clip_loss(x, old, adv, mask)[0]))(lp)
  assert float(grad[0, 0]) == 0.0  # above the clamp
  # Inside the clip range the gradient is −A·γ.
  inside = np.abs(np.exp(lp - old) - 1) < 0.15
  np.testing.assert_allclose(np.asarray(grad)[inside],
                             (-adv[:, None] * np.exp(lp - old))[inside], rtol=1e-5)


def test_gspo_loss_vs_numpy_and_gradient():
  lp, old, adv, mask = _pg_inputs(1)
  lp[0, 0], lp[1, 1] = old[0, 0] + 0.05, old[1, 1] - 0.02
  loss, clipfrac, approx_kl = losses.gspo_loss(lp, old, adv, mask)
  n = np.maximum(mask.sum(1), 1)
  s = np.exp(((lp.astype(np.float64) - old) * mask).sum(1) / n)[:, None]
  a = adv[:, None].astype(np.float64)
  pg1, pg2 = -a * s, -a * np.clip(s, 0.8, 1.2)
  want = np.maximum(pg1, pg2) * np.ones_like(lp)
  np.testing.assert_allclose(np.asarray(loss), want, rtol=1e-5)
  np.testing.assert_allclose(clipfrac, ((pg2 > pg1) * mask).sum() / mask.sum(), rtol=1e-6)
  np.testing.assert_allclose(approx_kl, ((old - lp) * mask).sum() / mask.sum(), rtol=1e-5)
  fn = lambda x: losses.aggregate(losses.gspo_loss(x, old, adv, mask)[0], mask,
                                  "seq-mean-token-mean")
  rows = (mask.sum(1) > 0).sum()
  unclipped = (pg1 > pg2) | (np.abs(s - 1) < 0.2)  # inside the range both branches tie
  grad_want = np.where(unclipped, -a * s / n[:, None] / rows, 0.0) * mask
  np.testing.assert_allclose(np.asarray(jax.grad(fn)(lp)), grad_want, rtol=1e-5, atol=1e-8)
  # The log-ratio cap at 10 bounds the ratio at e^10.
  capped, _, _ = losses.gspo_loss(old + 30.0, old, -np.ones(6, np.float32), np.ones_like(mask))
  np.testing.assert_allclose(np.asarray(capped), np.exp(10.0), rtol=1e-5)


def test_kl_penalty_kinds():
  rng = np.random.default_rng(0)
  lp = rng.normal(-1, 1, (3, 5)).astype(np.float32)
  rf = rng.normal(-1, 1, (3, 5)).astype(np.float32)
  rf[0, 0] = lp[0, 0] + 4.0  # k3 = e^4 − 5 ≈ 49.6 > 10: low_var_kl clamps
  d = lp.astype(np.float64) - rf
  k3 = np.exp(-d) + d - 1
  want = dict(k1=d, k2=0.5 * d**2, k3=k3, low_var_kl=np.clip(k3, -10, 10))
  for kind in losses.KL_KINDS:
    np.testing.assert_allclose(np.asarray(losses.kl_penalty(lp, rf, kind)), want[kind],
                               rtol=1e-5, atol=1e-6)
  assert float(losses.kl_penalty(lp, rf, "low_var_kl")[0, 0]) == 10.0
  with pytest.raises(ValueError):
    losses.kl_penalty(lp, rf, "k4")


def test_aggregate_modes():
  x = np.arange(12, dtype=np.float32).reshape(3, 4)
  m = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], np.float32)
  assert float(losses.aggregate(x, m, "token-mean")) == pytest.approx((0 + 1 + 8 + 9 + 10 + 11) / 6)
  assert float(losses.aggregate(x, m, "seq-mean-token-mean")) == pytest.approx((0.5 + 9.5) / 2)
  for mode in losses.AGGS:
    assert float(losses.aggregate(x, np.zeros_like(m), mode)) == 0.0
  assert float(losses.entropy_bonus(x, m)) == pytest.approx(39 / 6)


def test_answer_betas():
  assert losses.fixed_beta(0.05, 0.2) == pytest.approx(0.25)
  assert losses.fixed_beta(0.2, 0.2) == 1.0  # MASK_WEIGHT = λ: LLDS-MA has no effect
  code = [float(losses.adaptive_beta(v, formula="code")) for v in (0.5, 1.0, 1.5, 2.0, 3.0)]
  np.testing.assert_allclose(code, [0, 0, 0.5, 1, 1], atol=1e-6)
  np.testing.assert_allclose(float(losses.adaptive_beta(1.5, base_weight=0.05, lam=0.2)),
                             0.125, rtol=1e-6)
  paper = [float(losses.adaptive_beta(v, formula="paper")) for v in (0.0, 1.0, 1.5, 3.0)]
  np.testing.assert_allclose(paper, [0, 0.5, 0.75, 1], atol=1e-6)
  w = losses.answer_weights(np.array([[0, 1, 1, 0]]), 0.25)
  np.testing.assert_array_equal(np.asarray(w), [[1, 0.25, 0.25, 1]])


# ----------------------------------------------------------------------------------------------
# The combined objective.


@pytest.mark.parametrize("loss_type", ["grpo", "gspo"])
def test_policy_loss_combines_parts(loss_type):
  batch = make_batch(7)
  rng = np.random.default_rng(7)
  ref_lp = (batch["old"] + rng.normal(0, 0.2, batch["old"].shape)).astype(np.float32)
  ent = rng.random(batch["old"].shape).astype(np.float32)
  w = losses.answer_weights(batch["span"], 0.5)
  cfg = losses.LossConfig(loss=loss_type, llds_gate="response", kl_coef=0.01, entropy_coef=0.1)
  args = (batch["lp"], batch["old"], batch["adv"], batch["mask"])
  fn = jax.jit(losses.policy_loss, static_argnums=4)
  total, metrics = fn(*args, cfg, ref_logp_BxT=ref_lp, entropy_BxT=ent, answer_weight_BxT=w)
  agg = "token-mean" if loss_type == "grpo" else "seq-mean-token-mean"
  surrogate = losses.ppo_clip_loss if loss_type == "grpo" else losses.gspo_loss
  pg = losses.aggregate(surrogate(*args)[0], batch["mask"], agg)
  kl = losses.masked_mean(losses.kl_penalty(batch["lp"], ref_lp, "low_var_kl"), batch["mask"])
  llds = llds_loss(*args, gate="response", answer_weight_BxT=w)
  h = losses.entropy_bonus(ent, batch["mask"])
  np.testing.assert_allclose(total, pg - 0.1 * h + 0.01 * kl + LAM * llds, rtol=1e-6)
  np.testing.assert_allclose(metrics["loss/llds"], LAM * llds, rtol=1e-6)
  np.testing.assert_allclose(metrics["loss/pg"], pg, rtol=1e-6)
  assert {"loss/total", "loss/kl", "loss/entropy", "pg/clipfrac", "pg/approx_kl",
          "llds/active_frac", "lld/preserving_logp", "lld/nonpreserving_logp",
          "lld/preserving_ref_logp"} <= set(metrics)
  assert all(np.shape(v) == () for v in metrics.values())
  keep = batch["adv"][:, None] >= 0
  pos = batch["mask"] * keep
  np.testing.assert_allclose(metrics["lld/preserving_logp"],
                             (batch["old"] * pos).sum() / pos.sum(), rtol=1e-6)
  # Fully masked micro-batch: everything finite.
  _, empty = fn(batch["lp"], batch["old"], batch["adv"], np.zeros_like(batch["mask"]), cfg,
                ref_logp_BxT=ref_lp, entropy_BxT=ent)
  assert all(np.isfinite(float(v)) for v in empty.values())


def test_loss_config_from_mapping():
  cfg = losses.LossConfig.from_config({"loss": "gspo", "llds_lambda": 0.3, "unrelated": 1})
  assert cfg.loss == "gspo" and cfg.llds_lambda == 0.3 and cfg.kl_kind == "low_var_kl"
  # configs/ spell "off" / "official default" as 0 and "".
  c = losses.LossConfig.from_config({"ratio_clamp": 0.0, "agg": ""})
  lp, old, adv, mask = _pg_inputs()
  _, metrics = losses.policy_loss(lp, old, adv, mask, c)
  want = losses.aggregate(losses.ppo_clip_loss(lp, old, adv, mask, ratio_clamp=None)[0], mask)
  np.testing.assert_allclose(metrics["loss/pg"], want, rtol=1e-6)
  hash(cfg)  # usable as a static jit argument
