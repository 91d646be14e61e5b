"""Independent NumPy oracles for the LLDS penalty, written as plain loops (float64).

Dims: B batch rows, T response tokens.

`official_llds` transcribes the official PyTorch computation (PAPER.md §B.2: the LLDS repo's
`dp_actor.update_policy` with `chunk_sums_vectorized` / `expand_chunk_mask`) step by step, with
its conventions: token-level advantages (the row score times the response attention mask, so 0 on
padding), an answer mask that is 1 everywhere except 0 on the answer span, λ folded into the
coefficient map, and a token mean over all loss tokens. `paper_llds` follows the paper's
Eq. 4 / 9 / 10 (per-response normalizer, mean over Y_pre) with Eq. 5 weights. Neither shares
code with `llds_jax.losses`; loops over rows, tokens and chunks keep them obviously correct.
"""

import numpy as np


def _chunks(flags):
  """Lists of token indices, one per maximal run of truthy `flags`."""
  runs, current = [], []
  for t, f in enumerate(flags):
    if f:
      current.append(t)
    elif current:
      runs.append(current)
      current = []
  if current:
    runs.append(current)
  return runs


def official_llds(log_prob, old_log_prob, advantages, loss_mask, *, gate="action", lam=0.2,
                  answer_mask=None, mask_weight=0.0, mask_adaptive=False,
                  valid_search_stats=0.0):
  """(loss_noreduce incl. λ, mean_reduce_chunk) of one micro-batch, as the official actor.

  `gate`: "action" (chunk_noreduce=True), "response" (HEAD's R-gate), or "token" (not in the
  official code: every preserving token, the Eq. 9 variant with the official normalization).
  `answer_mask` None means MASK_ANS=false (all ones). mean_reduce_chunk is NaN when no row has
  a non-negative advantage sum (torch.mean of an empty tensor), and None unless gate="action".
  """
  lp = np.asarray(log_prob, np.float64)
  old = np.asarray(old_log_prob, np.float64)
  adv = np.asarray(advantages, np.float64)
  m = np.asarray(loss_mask, np.float64)
  b, t = lp.shape
  ans = np.ones((b, t)) if answer_mask is None else np.asarray(answer_mask, np.float64)

  w = mask_weight * max(valid_search_stats - 1.0, 0.0) if mask_adaptive else mask_weight
  coef = np.zeros((b, t))
  for i in range(b):
    for j in range(t):
      coef[i, j] = lam if ans[i, j] == 1 else min(w, lam)

  valid = np.zeros((b, t))
  reduce_chunks = []
  for i in range(b):
    penalty = [old[i, j] - lp[i, j] for j in range(t)]
    base = [max(0.0, p) for p in penalty]
    positive = [1.0 if adv[i, j] >= 0 else 0.0 for j in range(t)]
    if gate == "action":
      run_mask = [m[i, j] * positive[j] for j in range(t)]
      active = 0
      for chunk in _chunks(run_mask):
        chunk_sum = 0.0
        for j in chunk:
          chunk_sum += penalty[j] * run_mask[j]
        if chunk_sum > 0:
          active += 1
          for j in chunk:
            valid[i, j] = base[j]
      if sum(adv[i, j] for j in range(t)) >= 0:
        reduce_chunks.append(active)
    elif gate == "response":
      sentence = 0.0
      for j in range(t):
        sentence += (penalty[j] * positive[j]) * (m[i, j] * positive[j])
      sentence = 1.0 if max(0.0, sentence) > 0 else 0.0
      for j in range(t):
        valid[i, j] = sentence * base[j] * positive[j]
    elif gate == "token":
      for j in range(t):
        valid[i, j] = base[j] * positive[j]
    else:
      raise ValueError(gate)

  num, den = 0.0, 0.0
  for i in range(b):
    for j in range(t):
      num += valid[i, j] * coef[i, j] * m[i, j]
      den += m[i, j]
  loss = num / den if den > 0 else float("nan")
  if gate != "action":
    return loss, None
  mean_chunks = float(np.mean(reduce_chunks)) if reduce_chunks else float("nan")
  return loss, mean_chunks


def paper_llds(log_prob, old_log_prob, adv_rows, loss_mask, *, gate="action", weights=None):
  """Paper Eq. 4 (action gate), Eq. 10 (response gate) or Eq. 9 (no gate), weighted per Eq. 5.

  Actions are the maximal runs of model tokens (loss_mask = 1) of a preserving row (Â ≥ 0).
  Rows without model tokens are not counted in |Y_pre|; no preserving rows gives 0.
  """
  lp = np.asarray(log_prob, np.float64)
  old = np.asarray(old_log_prob, np.float64)
  m = np.asarray(loss_mask, np.float64)
  b, t = lp.shape
  wts = np.ones((b, t)) if weights is None else np.asarray(weights, np.float64)
  per_response = []
  for i in range(b):
    if adv_rows[i] < 0:
      continue
    actions = _chunks([m[i, j] > 0 for j in range(t)])
    num_tokens = sum(len(a) for a in actions)
    if num_tokens == 0:
      continue
    response_sum = sum(old[i, j] - lp[i, j] for a in actions for j in a)
    total = 0.0
    for action in actions:
      deltas = [old[i, j] - lp[i, j] for j in action]
      if gate == "action":
        on = sum(deltas) > 0
      elif gate == "response":
        on = response_sum > 0
      else:
        on = True
      if on:
        total += sum(wts[i, j] * max(0.0, dl) for j, dl in zip(action, deltas))
    per_response.append(total / num_tokens)
  return float(np.mean(per_response)) if per_response else 0.0
