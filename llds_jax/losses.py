"""GRPO / GSPO policy losses, KL, entropy bonus and the LLDS regularizer (pure jnp, float32).

Dims: B batch rows (rollouts), T response tokens.

Every array is over response positions; `mask_BxT` is 1 on model-generated tokens and 0 on tool
observations and padding (Search-R1 state masking). Advantages are one scalar per row (`adv_B`).
Equation numbers refer to arXiv 2512.04220v2; "official" means the LLDS repo's verl fork
(`dp_actor.update_policy`, `core_algos`), whose behaviour produced the paper's tables. Where the
official code divides by a zero mask count (→ NaN) we divide by max(count, 1) instead (→ 0).
Old, reference log-probs and advantages are constants here (stop_gradient), as in the official code.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

_sg = lax.stop_gradient

# The allowed values of the loss knobs; `config_check.validate` checks `config.rl` against these.
LOSSES = ("grpo", "gspo")
GATES = ("action", "response", "token")
NORMS = ("token", "response")
AGGS = ("token-mean", "seq-mean-token-mean")
KL_KINDS = ("k1", "k2", "k3", "low_var_kl")
BETA_FORMULAS = ("code", "paper")


def _f32(x) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def masked_mean(x_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  """Σ(x·mask) / max(Σmask, 1): verl's `masked_mean` without its empty-mask NaN."""
  m_BxT = _f32(mask_BxT)
  return jnp.sum(_f32(x_BxT) * m_BxT) / jnp.maximum(jnp.sum(m_BxT), 1.0)


def aggregate(loss_BxT: jax.Array, mask_BxT: jax.Array, mode: str = "token-mean") -> jax.Array:
  """Reduces a per-token loss to a scalar over the (micro-)batch.

  "token-mean" (official PPO loss): Σ(loss·mask) / Σmask over all rows.
  "seq-mean-token-mean" (official GSPO branch, paper Eq. 1's 1/|ŷ_i| normalizer): mean over
  rows of each row's masked token mean; rows without tokens are left out (verl would NaN).
  """
  if mode == "token-mean":
    return masked_mean(loss_BxT, mask_BxT)
  if mode != "seq-mean-token-mean":
    raise ValueError(f"aggregation {mode!r} not in {AGGS}")
  m_BxT = _f32(mask_BxT)
  n_B = jnp.sum(m_BxT, axis=1)
  row_B = jnp.sum(_f32(loss_BxT) * m_BxT, axis=1) / jnp.maximum(n_B, 1.0)
  has_B = n_B > 0
  return jnp.sum(jnp.where(has_B, row_B, 0.0)) / jnp.maximum(jnp.sum(has_B), 1)


def grpo_advantages(rewards_B: jax.Array, group_ids_B: jax.Array, eps: float = 1e-6) -> jax.Array:
  """GRPO outcome advantage (Eq. 1's Â_i): (r − mean_g) / (std_g + eps), unbiased std.

  Groups are rows with equal `group_ids_B` (integers; position does not matter). As in the
  official `compute_grpo_outcome_advantage`, a group of one gets mean 0 and std 1, so its
  advantage is r / (1 + eps), and a group with equal rewards gets 0. Sort-free: a B×B equality
  matrix, which is cheap for rollout-sized B and has static shapes under jit.
  """
  r_B = _f32(rewards_B)
  same_BxB = (group_ids_B[:, None] == group_ids_B[None, :]).astype(jnp.float32)
  n_B = jnp.sum(same_BxB, axis=1)  # ≥ 1: every row is in its own group
  # Elementwise sums, not a matmul: TPU f32 matmuls default to bf16 passes.
  mean_B = jnp.sum(same_BxB * r_B[None, :], axis=1) / n_B
  sq_BxB = same_BxB * jnp.square(r_B[None, :] - mean_B[:, None])
  std_B = jnp.sqrt(jnp.sum(sq_BxB, axis=1) / jnp.maximum(n_B - 1.0, 1.0))
  single_B = n_B == 1
  mean_B = jnp.where(single_B, 0.0, mean_B)
  std_B = jnp.where(single_B, 1.0, std_B)
  return (r_B - mean_B) / (std_B + eps)


def kl_penalty(logp_BxT: jax.Array, ref_logp_BxT: jax.Array, kind: str) -> jax.Array:
  """Per-token KL estimate of π_θ from π_ref, as verl's `kl_penalty` (Schulman's k1/k2/k3).

  k1 = logp − ref; k2 = ½(logp − ref)²; k3 = e^(ref−logp) − (ref − logp) − 1;
  low_var_kl = k3 clamped to [−10, 10] (the official KL loss, coefficient 0.001).
  """
  logp_BxT, ref_BxT = _f32(logp_BxT), _sg(_f32(ref_logp_BxT))
  if kind == "k1":
    return logp_BxT - ref_BxT
  if kind == "k2":
    return 0.5 * jnp.square(logp_BxT - ref_BxT)
  if kind not in ("k3", "low_var_kl"):
    raise ValueError(f"KL kind {kind!r} not in {KL_KINDS}")
  log_r_BxT = ref_BxT - logp_BxT
  k3_BxT = jnp.exp(log_r_BxT) - log_r_BxT - 1.0
  return jnp.clip(k3_BxT, -10.0, 10.0) if kind == "low_var_kl" else k3_BxT


def entropy_bonus(entropy_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  """Token-mean entropy (official `actor/entropy_loss`); the total loss subtracts coef × this."""
  return masked_mean(entropy_BxT, mask_BxT)


def _clipped_surrogate(ratio_BxT, adv_B, clip_low, clip_high):
  adv_Bx1 = _sg(_f32(adv_B))[:, None]
  pg1_BxT = -adv_Bx1 * ratio_BxT
  pg2_BxT = -adv_Bx1 * jnp.clip(ratio_BxT, 1.0 - clip_low, 1.0 + clip_high)
  return jnp.maximum(pg1_BxT, pg2_BxT), pg2_BxT > pg1_BxT


def ppo_clip_loss(logp_BxT, old_logp_BxT, adv_B, mask_BxT, *, clip_low: float = 0.2,
                  clip_high: float = 0.2, ratio_clamp: float | None = 100.0):
  """PPO-clip surrogate of Eq. 1 per token; returns (loss_BxT, clipfrac, approx_kl).

  loss = max(−A·γ, −A·clip(γ, 1−ε_low, 1+ε_high)), γ = exp(logp − old). The LLDS fork clamps
  γ ≤ `ratio_clamp` = 100 before clipping (`torch.clamp(ratio, -100, 100)`; the lower bound is
  moot for exp): for A < 0 this caps the unclipped branch at −100·A (no dual clip) and gives
  zero gradient above 100. We clamp the log-ratio at log(100) instead, which equals it in value
  and gradient but cannot form 0·inf = NaN when γ overflows. None or 0 = Search-R1's original
  (no clamp). clipfrac = masked mean of [clipped branch > unclipped]; approx_kl = masked mean of
  (old − logp), both over all masked tokens (official `pg_clipfrac`, `ppo_kl`).
  """
  log_ratio_BxT = _f32(logp_BxT) - _sg(_f32(old_logp_BxT))
  capped_BxT = log_ratio_BxT
  if ratio_clamp:
    cap = math.log(ratio_clamp)
    capped_BxT = jnp.where(log_ratio_BxT > cap, cap, log_ratio_BxT)  # torch.clamp: grad 1 at cap
  loss_BxT, clipped_BxT = _clipped_surrogate(jnp.exp(capped_BxT), adv_B, clip_low, clip_high)
  return loss_BxT, masked_mean(clipped_BxT, mask_BxT), masked_mean(-log_ratio_BxT, mask_BxT)


def gspo_loss(logp_BxT, old_logp_BxT, adv_B, mask_BxT, *, clip_low: float = 0.2,
              clip_high: float = 0.2, log_ratio_cap: float = 10.0):
  """GSPO surrogate per token (official `compute_policy_loss_gspo`); returns like ppo_clip_loss.

  Sequence ratio s_i = exp(Σ_t m·(logp − old) / Σ_t m); each token uses
  γ_t = exp(logp_t − sg(logp_t) + sg(log s_i)), whose value is s_i and whose gradient flows
  through its own logp_t. The log is clamped ≤ 10; the clip is 0.2 on both sides (the fork's
  `clip_ratio`, not GSPO's 3e-4/4e-4). Aggregate with "seq-mean-token-mean", as the fork does.
  """
  logp_BxT = _f32(logp_BxT)
  m_BxT = _f32(mask_BxT)
  log_ratio_BxT = logp_BxT - _sg(_f32(old_logp_BxT))
  seq_log_ratio_B = (jnp.sum(log_ratio_BxT * m_BxT, axis=1)
                     / jnp.maximum(jnp.sum(m_BxT, axis=1), 1.0))
  tok_log_BxT = logp_BxT - _sg(logp_BxT) + _sg(seq_log_ratio_B)[:, None]
  tok_log_BxT = jnp.where(tok_log_BxT > log_ratio_cap, log_ratio_cap, tok_log_BxT)
  loss_BxT, clipped_BxT = _clipped_surrogate(jnp.exp(tok_log_BxT), adv_B, clip_low, clip_high)
  return loss_BxT, masked_mean(clipped_BxT, m_BxT), masked_mean(-log_ratio_BxT, m_BxT)


# ----------------------------------------------------------------------------------------------
# LLDS (Eq. 4, 9, 10) and LLDS-MA (Eq. 5).


def _action_sums(x_BxT: jax.Array, run_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(Σx over each token's maximal run of `run`, run starts); the sum is 0 outside runs.

  Like the official `chunk_sums_vectorized`: runs get ids 1..K by a cumsum over run starts and
  are scatter-added into K slots (slot 0 collects everything outside runs). Mapped over rows so
  B stays a batch dim of the scatter/gather (shardable); K ≤ ⌈T/2⌉ is static.
  """
  t = x_BxT.shape[1]
  false_Bx1 = jnp.zeros_like(run_BxT[:, :1])
  starts_BxT = run_BxT & ~jnp.concatenate([false_Bx1, run_BxT[:, :-1]], axis=1)
  ids_BxT = jnp.where(run_BxT, jnp.cumsum(starts_BxT, axis=1, dtype=jnp.int32), 0)
  seg_sum = functools.partial(jax.ops.segment_sum, num_segments=(t + 1) // 2 + 1)
  sums_BxK = jax.vmap(seg_sum)(jnp.where(run_BxT, x_BxT, 0.0), ids_BxT)
  total_BxT = jnp.take_along_axis(sums_BxK, ids_BxT, axis=1)
  return jnp.where(run_BxT, total_BxT, 0.0), starts_BxT


def _llds_parts(logp_BxT, old_logp_BxT, adv_B, mask_BxT):
  """(Δ = old − logp, preserving model-token mask, preserving-row mask)."""
  delta_BxT = _sg(_f32(old_logp_BxT)) - _f32(logp_BxT)
  keep_B = _sg(_f32(adv_B)) >= 0  # Y_pre includes Â = 0 (§5.5; official `advantages >= 0`)
  pm_BxT = (_f32(mask_BxT) > 0) & keep_B[:, None]
  return delta_BxT, pm_BxT, keep_B


def llds_loss(logp_BxT, old_logp_BxT, adv_B, mask_BxT, *, gate: str = "action",
              answer_weight_BxT=None, norm: str = "token") -> jax.Array:
  """LLDS penalty on likelihood decreases of preserving (Â ≥ 0) responses, *not* times λ.

  Δ = old − logp; per-token term max(0, Δ) on preserving model tokens, kept by the gate:
    "action" (Eq. 4, official `chunk_noreduce`): an action is a maximal run of mask·[Â ≥ 0];
      its tokens count only if the action's signed ΣΔ > 0;
    "response" (Eq. 10, official R-gate at HEAD): one indicator per row on its masked signed ΣΔ;
    "token" (Eq. 9): no gate.
  Gates are computed from stop_gradient(Δ) and carry no gradient; the subgradient of max(0, Δ)
  at Δ = 0 is taken as 0. `answer_weight_BxT` (LLDS-MA, Eq. 5: β on answer tokens, 1 elsewhere)
  multiplies after gating. norm "token" = official: Σ(term·w·mask)/Σmask over ALL rows (λ·this
  is `actor/loss_noreduce`); norm "response" = Eq. 4: per preserving row Σ(term·w·mask)/Σmask_row,
  averaged over preserving rows that have tokens (0 if there are none).
  """
  if gate not in GATES or norm not in NORMS:
    raise ValueError(f"LLDS gate {gate!r} / norm {norm!r} not in {GATES} / {NORMS}")
  delta_BxT, pm_BxT, keep_B = _llds_parts(logp_BxT, old_logp_BxT, adv_B, mask_BxT)
  d_sg_BxT = _sg(delta_BxT)
  if gate == "action":
    total_BxT, _ = _action_sums(d_sg_BxT, pm_BxT)
    on_BxT = pm_BxT & (total_BxT > 0)
  elif gate == "response":
    sum_B = jnp.sum(jnp.where(pm_BxT, d_sg_BxT, 0.0), axis=1)
    on_BxT = pm_BxT & (sum_B > 0)[:, None]
  else:
    on_BxT = pm_BxT
  term_BxT = jnp.where(on_BxT & (delta_BxT > 0), delta_BxT, 0.0)
  if answer_weight_BxT is not None:
    term_BxT = term_BxT * _sg(_f32(answer_weight_BxT))
  if norm == "token":
    return masked_mean(term_BxT, mask_BxT)
  m_BxT = _f32(mask_BxT)
  n_B = jnp.sum(m_BxT, axis=1)
  row_B = jnp.sum(term_BxT * m_BxT, axis=1) / jnp.maximum(n_B, 1.0)
  rows_B = keep_B & (n_B > 0)
  return jnp.sum(jnp.where(rows_B, row_B, 0.0)) / jnp.maximum(jnp.sum(rows_B), 1)


def llds_stats(logp_BxT, old_logp_BxT, adv_B, mask_BxT) -> dict[str, jax.Array]:
  """Gate diagnostics, whatever gate is trained with (all 0 when nothing qualifies).

  llds/active_frac: share of preserving actions whose signed ΣΔ > 0;
  llds/active_chunks: active actions per preserving row (official `actor/mean_reduce_chunk`,
    which also counts an all-padding row with Â < 0, as its token advantages sum to 0);
  llds/actions_per_resp: actions per preserving row;
  llds/resp_active_frac: share of preserving rows with tokens whose signed ΣΔ > 0 (R-gate).
  """
  delta_BxT, pm_BxT, keep_B = _llds_parts(logp_BxT, old_logp_BxT, adv_B, mask_BxT)
  d_sg_BxT = _sg(delta_BxT)
  total_BxT, starts_BxT = _action_sums(d_sg_BxT, pm_BxT)
  n_act_B = jnp.sum(starts_BxT, axis=1).astype(jnp.float32)
  n_on_B = jnp.sum(starts_BxT & (total_BxT > 0), axis=1).astype(jnp.float32)
  n_keep = jnp.maximum(jnp.sum(keep_B), 1)
  has_B = keep_B & jnp.any(pm_BxT, axis=1)
  resp_on_B = has_B & (jnp.sum(jnp.where(pm_BxT, d_sg_BxT, 0.0), axis=1) > 0)
  return {
      "llds/active_frac": jnp.sum(n_on_B) / jnp.maximum(jnp.sum(n_act_B), 1.0),
      "llds/active_chunks": jnp.sum(n_on_B) / n_keep,  # rows with Â < 0 have no actions
      "llds/actions_per_resp": jnp.sum(n_act_B) / n_keep,
      "llds/resp_active_frac": jnp.sum(resp_on_B) / jnp.maximum(jnp.sum(has_B), 1),
  }


def answer_weights(answer_mask_BxT: jax.Array, beta) -> jax.Array:
  """LLDS-MA token weights (Eq. 5): β on the answer span (`answer_mask_BxT` = 1), 1 elsewhere.

  The official `answer_mask` is the complement (0 on the span); its coefficient map
  where(mask, λ, min(w, λ)) equals λ · answer_weights(1 − mask, min(w, λ)/λ).
  """
  return jnp.where(_f32(answer_mask_BxT) > 0, _f32(beta), jnp.float32(1.0))


def fixed_beta(base_weight: float, lam: float) -> float:
  """Non-adaptive LLDS-MA β of the official code: min(MASK_WEIGHT, λ) / λ (0.05, 0.2 → 0.25)."""
  if lam <= 0:
    raise ValueError(f"LLDS λ must be > 0 for answer weights, got {lam}")
  return min(base_weight, lam) / lam


def adaptive_beta(mean_valid_searches, *, formula: str = "code", base_weight: float = 0.2,
                  lam: float = 0.2) -> jax.Array:
  """Adaptive LLDS-MA β from V̄, the mean valid searches per rollout of the current batch.

  "code" (official `mask_adaptive`, what produced Table 1's LLDS-MA row):
    β = min(MASK_WEIGHT·max(V̄ − 1, 0), λ) / λ; with MASK_WEIGHT = λ: 0 at V̄ ≤ 1, 1 at V̄ ≥ 2.
  "paper" (App. B.2.1): β = min(V̄ / V_B, 1) with V_B = 2; 0.5 at V̄ = 1.
  """
  v = _f32(mean_valid_searches)
  if formula == "paper":
    return jnp.minimum(v / 2.0, 1.0)
  if formula != "code":
    raise ValueError(f"adaptive β formula {formula!r} not in {BETA_FORMULAS}")
  if lam <= 0:
    raise ValueError(f"LLDS λ must be > 0 for answer weights, got {lam}")
  return jnp.minimum(base_weight * jnp.maximum(v - 1.0, 0.0), lam) / lam


# ----------------------------------------------------------------------------------------------
# The full objective (Eq. 6) and its metrics.


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """RL loss knobs (frozen: a static jit argument). Defaults = the official LLDS GRPO script."""
  loss: str = "grpo"  # "grpo": PPO-clip token ratio (Eq. 1) | "gspo": sequence ratio
  clip_low: float = 0.2  # ε below 1
  clip_high: float = 0.2  # ε above 1
  ratio_clamp: float | None = 100.0  # γ ≤ 100 (LLDS fork, grpo only); None/0: Search-R1's
  agg: str | None = None  # None/"": official per loss (grpo token-mean, gspo seq-mean-token-mean)
  kl_kind: str = "low_var_kl"  # k1 | k2 | k3 | low_var_kl, vs the frozen reference policy
  kl_coef: float = 0.001
  entropy_coef: float = 0.001  # subtracted: rewards higher entropy
  llds_lambda: float = 0.2  # λ of Eq. 6 (0.3 for Qwen2.5-7B-Instruct); 0 = plain GRPO
  llds_gate: str = "action"  # action | response | token
  llds_norm: str = "token"  # token (official) | response (Eq. 4)

  @classmethod
  def from_config(cls, c) -> "LossConfig":
    """Picks this class's fields out of a dict / ConfigDict (e.g. `config.rl`)."""
    return cls(**{f.name: c[f.name] for f in dataclasses.fields(cls) if f.name in c})


def lld_stats(old_logp_BxT, adv_B, mask_BxT, ref_logp_BxT=None) -> dict[str, jax.Array]:
  """Token-mean log-probs of preserving (Â ≥ 0) / non-preserving rows under π_old (and π_ref).

  Proper means over each set's own tokens (the official pos/neg_avg_*_log_prob divide by all
  loss tokens instead). Tracked across steps they show the LLD trend of Fig. 2.
  """
  keep_Bx1 = (_sg(_f32(adv_B)) >= 0)[:, None]
  m_BxT = _f32(mask_BxT)
  pos_BxT, neg_BxT = m_BxT * keep_Bx1, m_BxT * ~keep_Bx1
  out = {"lld/preserving_logp": masked_mean(_sg(old_logp_BxT), pos_BxT),
         "lld/nonpreserving_logp": masked_mean(_sg(old_logp_BxT), neg_BxT)}
  if ref_logp_BxT is not None:
    out["lld/preserving_ref_logp"] = masked_mean(_sg(ref_logp_BxT), pos_BxT)
    out["lld/nonpreserving_ref_logp"] = masked_mean(_sg(ref_logp_BxT), neg_BxT)
  return out


def policy_loss(logp_BxT, old_logp_BxT, adv_B, mask_BxT, loss_cfg: LossConfig, *,
                ref_logp_BxT=None, entropy_BxT=None, answer_weight_BxT=None,
                scales: dict | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Eq. 6 as the official actor computes it, for one micro-batch; returns (total, metrics).

  total = pg − entropy_coef·H + kl_coef·KL + λ·L_LLDS. pg is aggregated per `loss_cfg.agg`;
  entropy and KL are token means (official). Metrics (flat, `/`-namespaced scalars): loss/pg,
  loss/entropy and loss/kl unscaled (0 when their input is None), loss/llds *including* λ (like
  `actor/loss_noreduce`), llds/unscaled, loss/total, pg/clipfrac, pg/approx_kl, llds_stats and
  lld_stats. The caller divides by the number of micro-batches when accumulating.

  `scales` (packed micro-batches, `packed_step.py`) turns each micro-batch mean into its share of
  the minibatch mean, so summing micro-batches gives the whole minibatch's loss exactly: every
  denominator here depends only on masks and advantages, so Σx/n_micro · n_micro/n_minibatch is
  Σx/n_minibatch. Keys: "token" (token means), "seq" (rows with tokens: seq-mean-token-mean),
  "resp" (preserving rows with tokens: LLDS norm "response"). The llds/* and lld/* diagnostics
  are only weighted by "resp" / "token" (approximately the minibatch value).
  """
  clip = dict(clip_low=loss_cfg.clip_low, clip_high=loss_cfg.clip_high)
  if loss_cfg.loss == "grpo":
    pg_BxT, clipfrac, approx_kl = ppo_clip_loss(logp_BxT, old_logp_BxT, adv_B, mask_BxT,
                                                ratio_clamp=loss_cfg.ratio_clamp, **clip)
    agg = loss_cfg.agg or "token-mean"
  elif loss_cfg.loss == "gspo":
    pg_BxT, clipfrac, approx_kl = gspo_loss(logp_BxT, old_logp_BxT, adv_B, mask_BxT, **clip)
    agg = loss_cfg.agg or "seq-mean-token-mean"
  else:
    raise ValueError(f"policy loss {loss_cfg.loss!r} not in {LOSSES}")
  scale = (lambda x, _: x) if scales is None else (lambda x, kind: x * scales[kind])  # noqa: E731
  zero = jnp.float32(0.0)
  pg = scale(aggregate(pg_BxT, mask_BxT, agg), "token" if agg == "token-mean" else "seq")
  ent = zero if entropy_BxT is None else scale(entropy_bonus(entropy_BxT, mask_BxT), "token")
  kl = zero if ref_logp_BxT is None else scale(masked_mean(
      kl_penalty(logp_BxT, ref_logp_BxT, loss_cfg.kl_kind), mask_BxT), "token")
  llds = scale(llds_loss(logp_BxT, old_logp_BxT, adv_B, mask_BxT, gate=loss_cfg.llds_gate,
                         answer_weight_BxT=answer_weight_BxT, norm=loss_cfg.llds_norm),
               "token" if loss_cfg.llds_norm == "token" else "resp")
  total = pg - loss_cfg.entropy_coef * ent + loss_cfg.kl_coef * kl + loss_cfg.llds_lambda * llds
  metrics = {"loss/total": total, "loss/pg": pg, "loss/entropy": ent, "loss/kl": kl,
             "loss/llds": loss_cfg.llds_lambda * llds, "llds/unscaled": llds,
             "pg/clipfrac": scale(clipfrac, "token"), "pg/approx_kl": scale(approx_kl, "token")}
  metrics.update({k: scale(v, "resp") for k, v in
                  llds_stats(logp_BxT, old_logp_BxT, adv_B, mask_BxT).items()})
  metrics.update({k: scale(v, "token") for k, v in
                  lld_stats(old_logp_BxT, adv_B, mask_BxT, ref_logp_BxT).items()})
  return total, {k: _sg(v) for k, v in metrics.items()}
