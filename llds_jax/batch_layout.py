"""The update batch's row layout: `[left-padded prompt | right-padded response]`.

Dims (llds_jax/__init__.py): B rows, P prompt and R response tokens, L = P + R.

Left-padding the prompt puts every response at the fixed slice `[P, L)`, so the loss lives on one
`B×R` grid (train_step.py). The RL batch (`build_batch`, from a rollout) and the format warm-up's
batch (`sft.layout`, from ideal trajectories) share `row_layout`, so a warmed-up policy starts RL
on exactly the inputs it was fitted on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from llds_jax import hosts
from llds_jax.sampler import bucket


def row_layout(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], P: int,
               R: int) -> dict[str, np.ndarray]:
  """input_ids, attn_mask and positions (0 from each row's first real token) of B rows."""
  ids_BxL = np.zeros((len(prompts), P + R), np.int32)
  attn_BxL = np.zeros_like(ids_BxL)
  for b, (prompt, response) in enumerate(zip(prompts, responses)):
    p, r = len(prompt), len(response)
    ids_BxL[b, P - p:P], ids_BxL[b, P:P + r] = prompt, response
    attn_BxL[b, P - p:P + r] = 1
  return dict(input_ids=ids_BxL, attn_mask=attn_BxL,
              positions=np.maximum(np.cumsum(attn_BxL, 1) - 1, 0))


def response_width(P: int, R: int, longest: int, max_len: int | None) -> int:
  """R, cut back when the bucketed P + R would pass `max_len`.

  Bucketing both widths could make rows longer than the rollout's `max_len` (e.g. 384 + 4096 for
  a 4096 context); then R is cut to `max_len − P`, or to the longest response rounded up to 64 if
  that is longer (a row is never cut).
  """
  if max_len and P + R > max_len:
    return max(max_len - P, -(-longest // 64) * 64)
  return R


def build_batch(ro, adv_B: np.ndarray, answer_weight_BxR: np.ndarray,
                max_len: int | None = None, floor: tuple[int, int] = (0, 0)) -> dict:
  """A rollout's rows in the update layout; P and R bucketed to bound recompiles.

  P and R are agreed over processes: every host's rows go into one global array. `floor` =
  (P, R) of earlier batches: widths never shrink below it, so a rollout of shorter rows reuses
  the compiled log-prob and update programs instead of compiling new ones (`widths`).
  """
  longest = max(int(ro.response_len.max()), 1)
  P, R, longest = hosts.agree_max(bucket(int(ro.prompt_len.max())), bucket(longest), longest)
  P, R = max(P, floor[0]), max(R, floor[1])
  R = response_width(P, R, longest, max_len)
  rows = range(len(adv_B))
  out = row_layout([ro.prompt_ids[b, :ro.prompt_len[b]] for b in rows],
                   [ro.response_ids[b, :ro.response_len[b]] for b in rows], P, R)
  pad = lambda x: np.pad(x[:, :R], ((0, 0), (0, R - min(x.shape[1], R))))  # noqa: E731
  return dict(out, loss_mask=pad(ro.loss_mask).astype(np.float32), adv=adv_B.astype(np.float32),
              answer_weight=pad(answer_weight_BxR).astype(np.float32))


def widths(batch: dict) -> tuple[int, int]:
  """(P, R) of an update batch from `build_batch`."""
  R = batch["loss_mask"].shape[1]
  return batch["input_ids"].shape[1] - R, R
