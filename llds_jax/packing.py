"""Packed rows: several trajectories per fixed-length sequence instead of one padded row each.

Dims (llds_jax/__init__.py): B rollout rows, L = P + R padded row (left-padded prompt of P,
right-padded response of R), A micro-batches per minibatch. Packed (this module's own): Bp packed
sequences of Lp tokens, Tk loss-token positions kept per sequence, Bm row slots per micro-batch.

A row's valid tokens `[prompt | response]` are contiguous in the padded layout (columns
`[P - p, P + r)`); packing copies them to `[o, o + p + r)` of one sequence, with positions
`0 .. p + r - 1` (the padded path's `cumsum(attn) - 1`, so RoPE sees the same numbers) and a
segment id (1, 2, ... within the sequence; 0 = padding). Attention only looks inside a segment
(`attention.attend`). The hidden state that predicts response token t of that row sits at
`o + p + t - 1`; for loss tokens (`loss_mask` = 1) that position is listed in the sequence's
`keep` row (only those get logits), and `gather_BxR` holds its flat index into the Bp×Tk grid, so
per-token log-probs come back to the row grid `B×R` where every loss already lives, and each
loss keeps its exact per-row meaning (GSPO's sequence ratio, LLDS's gates and norms,
seq-mean-token-mean).

Host side only (NumPy): the jitted passes that consume these layouts are in `packed_step.py`.
"""

from __future__ import annotations

import numpy as np

from llds_jax.sampler import bucket

SEQ_KEYS = ("input_ids", "positions", "segment_ids", "keep")  # per packed sequence


def row_extents(attn_BxL: np.ndarray, prompt_width: int) -> tuple[np.ndarray, np.ndarray]:
  """(prompt tokens p_B, response tokens r_B) of padded `[prompt | response]` rows."""
  attn_BxL = np.asarray(attn_BxL) > 0
  return attn_BxL[:, :prompt_width].sum(1), attn_BxL[:, prompt_width:].sum(1)


def first_fit(lengths_B: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, int]:
  """First-fit decreasing bin packing: (sequence of each row, its offset, sequences used).

  Longest rows first, each into the first sequence with room (ties keep row order, so the
  layout is deterministic). Within 11/9 of the optimum number of sequences plus one.
  """
  lengths_B = np.asarray(lengths_B, np.int64)
  too_long = np.flatnonzero(lengths_B > seq_len)
  if too_long.size:
    i = int(too_long[0])
    raise ValueError(f"packing: row {i} has {int(lengths_B[i])} tokens, more than the packed "
                     f"sequence length {seq_len} (config.rl.pack_len)")
  seq_B = np.zeros(len(lengths_B), np.int64)
  off_B = np.zeros(len(lengths_B), np.int64)
  free_Bp = np.zeros(0, np.int64)
  for i in np.argsort(-lengths_B, kind="stable"):
    fits = np.flatnonzero(free_Bp >= lengths_B[i])
    if fits.size:
      q = int(fits[0])
    else:
      q = len(free_Bp)
      free_Bp = np.append(free_Bp, seq_len)
    seq_B[i], off_B[i] = q, seq_len - free_Bp[q]
    free_Bp[q] -= lengths_B[i]
  return seq_B, off_B, len(free_Bp)


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def few_shapes(n: int) -> int:
  """n rounded up on `sampler.bucket`'s ladder (2, 3, 4, 6, 8, 12, ...): few compiled shapes."""
  return n if n <= 2 else bucket(n, minimum=2)


def pack_rows(batch: dict, rows: np.ndarray, seq_len: int, num_seqs: int | None = None,
              seq_multiple: int = 1) -> dict:
  """Packs `rows` of a padded host batch; returns the sequences and the way back to rows.

  `batch` holds `input_ids` / `attn_mask` (`B×L`) and `loss_mask` (`B×R`, R fixes P = L − R).
  Returns input_ids, positions, segment_ids (`Bp×Lp`, Bp = `num_seqs` or the sequences needed
  rounded up to `seq_multiple`), `keep` (`Bp×Tk`: per sequence, the positions whose hidden state
  predicts a loss token, Tk = the most in any sequence, bucketed; only these get logits),
  `gather` (`len(rows)×R` flat indices into `Bp×Tk`; a column without a loss token points at 0,
  whose value the loss mask then ignores), and each row's sequence `row_seq` and segment id
  `row_segment`.
  """
  ids_BxL, attn_BxL = np.asarray(batch["input_ids"]), np.asarray(batch["attn_mask"])
  R = np.asarray(batch["loss_mask"]).shape[1]
  P = ids_BxL.shape[1] - R
  rows = np.asarray(rows, np.int64)
  p_B, r_B = row_extents(attn_BxL[rows], P)
  loss_BxR = np.asarray(batch["loss_mask"])[rows] > 0
  empty = np.flatnonzero(p_B == 0)
  if empty.size:
    raise ValueError(f"packing: row {int(rows[empty[0]])} has no prompt token (its first "
                     "response token would be predicted from the previous segment)")
  seq_B, off_B, used = first_fit(p_B + r_B, seq_len)
  q = round_up(max(used, 1), seq_multiple) if num_seqs is None else num_seqs
  if used > q:
    raise ValueError(f"packing: {used} sequences needed, only {q} allowed")
  ids_BpxLp = np.zeros((q, seq_len), np.int32)
  pos_BpxLp = np.zeros((q, seq_len), np.int32)
  seg_BpxLp = np.zeros((q, seq_len), np.int32)
  slot_B = np.zeros(len(rows), np.int32)
  count_Bp = np.bincount(seq_B, weights=loss_BxR.sum(1), minlength=q).astype(np.int64)
  k = min(bucket(max(int(count_Bp.max(initial=0)), 1)), seq_len)
  keep_BpxTk = np.zeros((q, k), np.int32)
  gather_BxR = np.zeros((len(rows), R), np.int32)
  slot_Bp = np.zeros(q, np.int32)
  fill_Bp = np.zeros(q, np.int64)
  for j, i in enumerate(rows):
    p, r, s, o = int(p_B[j]), int(r_B[j]), int(seq_B[j]), int(off_B[j])
    n = p + r
    ids_BpxLp[s, o:o + n] = ids_BxL[i, P - p:P + r]
    pos_BpxLp[s, o:o + n] = np.arange(n)
    slot_Bp[s] += 1
    slot_B[j] = slot_Bp[s]
    seg_BpxLp[s, o:o + n] = slot_Bp[s]
    t_T = np.flatnonzero(loss_BxR[j])
    c = fill_Bp[s]
    keep_BpxTk[s, c:c + len(t_T)] = o + p + t_T - 1
    gather_BxR[j, t_T] = s * k + c + np.arange(len(t_T))
    fill_Bp[s] += len(t_T)
  return dict(input_ids=ids_BpxLp, positions=pos_BpxLp, segment_ids=seg_BpxLp, keep=keep_BpxTk,
              gather=gather_BxR, row_seq=seq_B, row_segment=slot_B)


def minibatch_layout(batch: dict, rows: np.ndarray, seq_len: int, micro_seqs: int) -> list[dict]:
  """One minibatch's rows packed, then cut into micro-batches of `micro_seqs` sequences.

  Returns per micro-batch: its sequences (`micro_seqs×Lp` and `keep`), `rows` (the batch rows it
  holds) and `gather` (those rows' indices into its own `micro_seqs×Tk` grid). Every row lies in
  exactly one micro-batch, whole.
  """
  pk = pack_rows(batch, rows, seq_len, seq_multiple=micro_seqs)
  k = pk["keep"].shape[1]
  out = []
  for a in range(pk["input_ids"].shape[0] // micro_seqs):
    sl = slice(a * micro_seqs, (a + 1) * micro_seqs)
    mine = np.flatnonzero((pk["row_seq"] >= sl.start) & (pk["row_seq"] < sl.stop))
    g = pk["gather"][mine]
    out.append({**{key: pk[key][sl] for key in SEQ_KEYS}, "rows": np.asarray(rows)[mine],
                "gather": np.where(g > 0, g - sl.start * k, 0)})
  return out


def stack_micro(layouts: list[list[dict]], num_rows: int, row_multiple: int,
                micro: int = 0) -> list[dict]:
  """Pads every minibatch's micro-batches to one shape (A micro-batches × Bm row slots × Tk).

  A (`micro`, or 0: the most of any minibatch) and Bm are bucketed (`sampler.bucket`) so few
  shapes compile; empty micro-batches and row slots are padding: their `rows` entry is
  `num_rows` (out of range, so the device gather fills it with zeros: no loss tokens).
  """
  most = max(len(mb) for mb in layouts)
  if micro and micro < most:
    raise ValueError(f"packing: a minibatch needs {most} micro-batches, only {micro} allowed")
  a = micro or few_shapes(most)
  m = round_up(few_shapes(max(len(u["rows"]) for mb in layouts for u in mb)), row_multiple)
  k = max(u["keep"].shape[1] for mb in layouts for u in mb)
  out = []
  for mb in layouts:
    qm, s = mb[0]["input_ids"].shape
    r = mb[0]["gather"].shape[1]
    st = {key: np.zeros((a, qm, s), np.int32) for key in ("input_ids", "positions", "segment_ids")}
    st.update(keep=np.zeros((a, qm, k), np.int32), rows=np.full((a, m), num_rows, np.int32),
              gather=np.zeros((a, m, r), np.int32))
    for j, u in enumerate(mb):
      for key in ("input_ids", "positions", "segment_ids"):
        st[key][j] = u[key]
      ku = u["keep"].shape[1]
      st["keep"][j, :, :ku] = u["keep"]
      st["rows"][j, :len(u["rows"])] = u["rows"]
      st["gather"][j, :len(u["rows"])] = u["gather"] // ku * k + u["gather"] % ku  # Tk → max Tk
    out.append(st)
  return out


def non_pad_fraction(attn_BxL: np.ndarray, seq_len: int | None = None) -> float:
  """Share of token slots holding a real token: padded rows as given, or packed at `seq_len`."""
  attn_BxL = np.asarray(attn_BxL) > 0
  tokens = int(attn_BxL.sum())
  if seq_len is None:
    return tokens / max(attn_BxL.size, 1)
  _, _, used = first_fit(attn_BxL.sum(1), seq_len)
  return tokens / max(used * seq_len, 1)


def recorded_rows(dist: dict, rows: int, prompt_width: int, response_width: int,
                  seed: int = 0) -> dict:
  """Padded host rows (input_ids all 0, attn_mask, loss_mask) of `rows` trajectories drawn from
  a recorded length distribution (`bench/packing.py --record`), stretched to other widths.

  For sizing packed programs of a longer context than the recording's (tools/dry_run.py): prompt
  lengths scale so the recording's longest prompt fills `prompt_width`, response and loss-token
  counts so its `max_context` minus that prompt fills `response_width`. Loss tokens sit at the
  head (reasoning + search call) and tail (answer) of a response; the observations between
  them are masked, as Search-R1 masks them.
  """
  p_all, r_all = np.asarray(dist["prompt_len"]), np.asarray(dist["response_len"])
  pick = np.random.default_rng(seed).integers(len(p_all), size=rows)
  p_scale = prompt_width / max(int(p_all.max()), 1)
  r_scale = response_width / max(int(dist["max_context"]) - int(p_all.max()), 1)
  p_B = np.clip(np.round(p_all[pick] * p_scale), 1, prompt_width).astype(np.int64)
  r_B = np.clip(np.round(r_all[pick] * r_scale), 1, response_width).astype(np.int64)
  l_B = np.minimum(np.round(np.asarray(dist["loss_tokens"])[pick] * r_scale), r_B).astype(np.int64)
  t_R = np.arange(response_width)[None]
  head_B, tail_B = -(-l_B // 2), l_B // 2
  loss_BxR = (t_R < head_B[:, None]) | ((t_R >= (r_B - tail_B)[:, None]) & (t_R < r_B[:, None]))
  t_L = np.arange(prompt_width + response_width)[None]
  attn_BxL = (t_L >= (prompt_width - p_B)[:, None]) & (t_L < (prompt_width + r_B)[:, None])
  return dict(input_ids=np.zeros(attn_BxL.shape, np.int32), attn_mask=attn_BxL.astype(np.int32),
              loss_mask=loss_BxR.astype(np.float32))
