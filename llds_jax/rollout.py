"""Search-R1 multi-turn rollouts whose observations are appended into the live KV cache.

Dims (llds_jax/__init__.py): B rows = prompts × G group size (prompt-major: row b answers prompt
b // G; the sampler's rows are padded to the mesh's row shards), P prompt tokens, R response
tokens, T tokens of a fed block, Ts tokens sampled in one turn.

Per turn (PAPER.md §D.3): every live row samples ≤ `max_turn_tokens` tokens, stopping at EOS or
at the first `</search>` / `</answer>`; the turn's action is the first `<search>…</search>` or
`<answer>…</answer>` span of its text. An answer ends the row; a search is answered with
`\\n\\n<information>{top-k passages}</information>\\n\\n` (all searching rows in one retriever
call); anything else gets the fixed correction message. Observations are tokenized with
special-token parsing off, cut to `max_obs_tokens` (by default the passages are cut and the block
keeps its closing `</information>\n\n`; `obs_truncation="raw"` is Search-R1's cut of the
tokenized block), and fed with the row's pending token as one block at the row's own position:
each token is prefilled exactly once. After `max_turns` such
turns, rows still live get one final turn whose search is not executed.

Training data are the sampled ids (`loss_mask` = 1) and the observation ids (`loss_mask` = 0),
exactly what the model attended to. Deliberate differences from Search-R1 (which re-tokenizes
decoded text): a turn ends at whichever closing tag comes first (Search-R1 generates on and cuts
at `</search>` if present, else at `</answer>`); a sampled EOS ends the turn and is dropped from
response and context (Search-R1's `skip_special_tokens` decode drops it too); a row whose prompt +
response would pass `max_context` ends with `finish_reason="context"` (a KV cache cannot drop its
oldest tokens the way Search-R1 left-truncates); `valid_searches` counts searches whose results
entered the context (not the unexecuted final-turn search Search-R1 also counts).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import numpy as np
import tqdm
from flax import nnx

from llds_jax import hosts, rewards, stops
from llds_jax import sampler as smp
from llds_jax.observations import INVALID_ACTION, encode_observations, information_block

STOP_STRINGS = ("</search>", "</answer>")
MIN_VIEW = 256  # cache slots a turn attends to are a power of two ≥ this (few compiled shapes)


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """Search-R1 rollout settings (defaults: the official run's turn, token and context limits)."""

  max_turns: int = 3  # executed actions; then one final turn without search execution
  max_turn_tokens: int = 500  # sampled tokens per turn
  max_obs_tokens: int = 500  # observation tokens per turn, the whole block counted
  # passages: cut the passages and keep `</information>\n\n` | raw: Search-R1's right cut of the
  # tokenized block (the closing tag is lost whenever the passages are long).
  obs_truncation: str = "passages"
  max_context: int = 4096  # prompt + response tokens per row
  topk: int = 3  # passages per search
  temperature: float = 1.0
  top_p: float = 1.0  # paper 1.0; official yaml 0.95 (PAPER.md §F.8)
  top_k: int = 0
  cache_dtype: str | None = None  # e.g. "bfloat16"; None = model compute dtype


def rollout_config(c) -> RolloutConfig:
  """The rollout settings of a run config (`config.rollout`, passages from `config.retriever`)."""
  r = c.rollout
  return RolloutConfig(max_turns=r.max_turns, max_turn_tokens=r.max_turn_tokens,
                       max_obs_tokens=r.max_obs_tokens, obs_truncation=r.obs_truncation,
                       max_context=r.max_context,
                       topk=c.retriever.topk, temperature=r.temperature, top_p=r.top_p,
                       top_k=r.top_k, cache_dtype=r.cache_dtype or None)


# Sizing rules, shared with tools/dry_run.py (which compiles the programs these sizes give).

def worst_case_tokens(rollout_cfg: RolloutConfig) -> int:
  """Response tokens of a row whose every turn runs to its limit and every search is fed."""
  turns = rollout_cfg.max_turns
  return (turns + 1) * rollout_cfg.max_turn_tokens + turns * rollout_cfg.max_obs_tokens


def cache_capacity(rollout_cfg: RolloutConfig, longest_prompt: int) -> int:
  """Tokens per row, also the KV cache slots; the prompt is bucketed, so a new longest prompt
  does not recompile the sampler each step."""
  return min(rollout_cfg.max_context,
             smp.bucket(longest_prompt) + worst_case_tokens(rollout_cfg))


def turn_view(cap: int, need: int) -> int:
  """Cache slots a turn attends to (and writes): `need` rounded up to a power of two ≥ MIN_VIEW,
  at most `cap`, so cost follows the context and few shapes are compiled."""
  return min(cap, max(MIN_VIEW, 1 << (need - 1).bit_length()))


@dataclasses.dataclass
class Rollout:
  """One batch of trajectories as host arrays, right-padded."""

  prompt_ids: np.ndarray  # int32 [B, P]
  prompt_len: np.ndarray  # int32 [B]
  response_ids: np.ndarray  # int32 [B, R]: sampled and observation tokens, in context order
  response_len: np.ndarray  # int32 [B]
  loss_mask: np.ndarray  # float32 [B, R]: 1 exactly on model-sampled tokens
  answer_mask: np.ndarray  # float32 [B, R]: 1 on the model's answer span (`model_answer`)
  answer: list  # str | None per row: the model's own last complete answer (None: never answered)
  sample_logp: np.ndarray  # float32 [B, R]: sampler log-prob (temperature 1) if sampled, else 0
  valid_searches: np.ndarray  # int32 [B]: searches whose results entered the context
  turns: np.ndarray  # int32 [B]: generation turns
  invalid_actions: np.ndarray  # int32 [B]: turns whose text held no complete search/answer action
  finish_reason: np.ndarray  # str [B]: "answer" | "max_turns" | "context"
  response_text: list[str]  # decoded response, special tokens kept
  stats: dict[str, float]
  capacity: int = 0  # KV cache slots per row the sampler ran with (`cache_capacity`)


def _eos_ids(model, tokenizer) -> tuple[int, ...]:
  ids = {tokenizer.eos_token_id}
  cfg_eos = model.cfg.eos_token_id
  ids.update(cfg_eos if isinstance(cfg_eos, tuple) else (cfg_eos,))
  return tuple(sorted(int(i) for i in ids if i is not None))


def _pad(rows: Sequence[Sequence], width: int, dtype) -> np.ndarray:
  out = np.zeros((len(rows), width), dtype)
  for b, r in enumerate(rows):
    out[b, :len(r)] = r
  return out


@dataclasses.dataclass
class _Row:
  """Host bookkeeping of one rollout row.

  `total` counts prompt + response tokens, the pending one included."""

  prompt: list[int]
  block: list[int]  # what the next feed writes into the row's cache
  total: int
  response: list[int] = dataclasses.field(default_factory=list)
  mask: list[float] = dataclasses.field(default_factory=list)  # 1 sampled, 0 inserted
  logp: list[float] = dataclasses.field(default_factory=list)  # sampler log-prob; 0 if inserted
  live: bool = True
  finish: str = ""  # "answer" | "max_turns" | "context"
  turns: int = 0
  searches: int = 0  # searches whose results entered the context
  invalid: int = 0  # turns whose text held no complete action

  def end(self, reason: str) -> None:
    self.live, self.finish = False, reason

  def extend(self, ids: list[int], sampled: bool, logp: list[float] | None = None) -> None:
    self.response += ids
    self.mask += [1.0 if sampled else 0.0] * len(ids)
    self.logp += logp if logp is not None else [0.0] * len(ids)
    self.total += len(ids)


@dataclasses.dataclass
class _Loop:
  """What every turn of one `rollout` call shares: the compiled pieces and the running counts."""

  graphdef: object
  params: object
  sample_cfg: smp.SampleConfig
  table_QxMxV: object
  cap: int  # tokens per row, also the cache slots
  padded: int  # sampler rows (a multiple of the row shards)
  mesh: object
  count: dict = dataclasses.field(
      default_factory=lambda: dict(obs_tokens=0, prefill=0, reprefill=0))
  secs: dict = dataclasses.field(default_factory=lambda: dict(model=0.0, retrieval=0.0))


def _turn_limits(rows: list[_Row], loop: _Loop, max_turn_tokens: int) -> np.ndarray:
  """Tokens each live row may sample this turn; a row with no room left ends ("context")."""
  limit_B = np.zeros(loop.padded, np.int32)
  for b, row in enumerate(rows):
    if not row.live:
      continue
    if loop.cap - row.total < 1:
      row.end("context")
    else:
      limit_B[b] = min(max_turn_tokens, loop.cap - row.total)
  return limit_B


def _sample(loop: _Loop, state, rows: list[_Row], live: np.ndarray, limit_B: np.ndarray,
            first: bool):
  """Feeds every live row's pending block and decodes its turn; (state, tokens, log-probs, counts,
  stops) of this process's rows, or None when no process has a live row."""
  # Attend to (and write) only the slots this turn can reach: cost follows the context, not `cap`.
  any_live, width, need = hosts.agree_max(
      len(live) > 0, smp.bucket(max((len(rows[b].block) for b in live), default=1)),
      max((rows[b].total + int(limit_B[b]) for b in live), default=1))
  if not any_live:
    return None
  tokens_BxT = np.zeros((loop.padded, width), np.int32)
  len_B = np.zeros(loop.padded, np.int32)
  for b in live:
    block = rows[b].block
    tokens_BxT[b, :len(block)], len_B[b] = block, len(block)
    loop.count["prefill"] += len(block)
    loop.count["reprefill"] += len(block) if first else rows[b].total  # re-prefilling every turn
  view = turn_view(loop.cap, need)
  t0 = time.perf_counter()
  put = functools.partial(hosts.put_rows, mesh=loop.mesh)
  state = smp.feed(loop.graphdef, loop.params, state, put(tokens_BxT), put(len_B), put(limit_B),
                   loop.table_QxMxV, loop.sample_cfg, view)
  state = smp.decode(loop.graphdef, loop.params, state, loop.table_QxMxV, loop.sample_cfg,
                     view)
  out = tuple(map(hosts.local_rows, (state.tokens_BxTs, state.logp_BxTs, state.num_B,
                                     state.stop_B)))
  loop.secs["model"] += time.perf_counter() - t0
  return (state,) + out


def _take_actions(rows: list[_Row], live: np.ndarray, toks_BxTs, logp_BxTs, num_B, stop_B,
                  tokenizer, final: bool) -> tuple[dict[int, str], list[int], list[str]]:
  """Appends each live row's sampled turn and parses its action: an answer (or any action on the
  final turn) ends the row, a search is queued, anything else gets the correction message.

  Returns (observations so far, searching rows, their queries).
  """
  # The segment's last token is pending (not in the cache): it opens the next block, unless it is
  # an EOS, which is dropped from response and context alike.
  eos_B = stop_B == smp.EOS
  new_ids = [toks_BxTs[b, :num_B[b] - eos_B[b]].tolist() for b in live]
  texts = tokenizer.batch_decode(new_ids, skip_special_tokens=True)
  observations, searching, queries = {}, [], []
  for b, ids, text in zip(live, new_ids, texts):
    row = rows[b]
    row.turns += 1
    row.extend(ids, sampled=True, logp=logp_BxTs[b, :len(ids)].tolist())
    row.block = [] if eos_B[b] else ids[-1:]
    kind, content = rewards.parse_action(text)
    row.invalid += kind is None
    if kind == "answer" or final:
      row.end("answer" if kind == "answer" else "max_turns")
    elif kind == "search":
      searching.append(b)
      queries.append(content)
    else:
      observations[b] = INVALID_ACTION
  return observations, searching, queries


def _search(loop: _Loop, retriever, queries: list[str], searching: list[int], topk: int,
            observations: dict[int, str]) -> None:
  """All searching rows' queries in one retriever call; each gets its `<information>` block."""
  if not queries:
    return
  t0 = time.perf_counter()
  passages = retriever.retrieve_text(queries, topk)
  loop.secs["retrieval"] += time.perf_counter() - t0
  for b, text in zip(searching, passages):
    observations[b] = information_block(text)


def _insert_observations(loop: _Loop, rows: list[_Row], observations: dict[int, str],
                         searching: list[int], tokenizer, rollout_cfg: RolloutConfig) -> None:
  """Appends each observation to its row's response and next block (fed with the pending token);
  a row left without room to answer after it ends ("context")."""
  obs_rows = sorted(observations)
  obs_ids = encode_observations(tokenizer, [observations[b] for b in obs_rows],
                                rollout_cfg.max_obs_tokens, rollout_cfg.obs_truncation)
  for b, ids in zip(obs_rows, obs_ids):
    row = rows[b]
    if row.total + len(ids) + 1 > loop.cap:  # no room to answer after this observation
      row.end("context")
      continue
    row.extend(ids, sampled=False)
    row.block += ids
    loop.count["obs_tokens"] += len(ids)
    row.searches += b in searching  # a search counts once its result is in the context


def _stats(loop: _Loop, rows: list[_Row], loss_mask: np.ndarray) -> dict[str, float]:
  """rollout/* and time/rollout_* metrics over every process's rows."""
  per_row = hosts.gather_rows(np.array(
      [[r.searches, r.invalid, r.turns, r.finish == "answer"] for r in rows], np.int64))
  generated, obs_tokens, prefill, reprefill = hosts.gather_rows(np.array(
      [[loss_mask.sum(), loop.count["obs_tokens"], loop.count["prefill"],
        loop.count["reprefill"]]], np.int64)).sum(0).tolist()
  return {
      "rollout/searches_per_traj": float(per_row[:, 0].mean()),
      "rollout/invalid_action_rate": float(per_row[:, 1].sum() / per_row[:, 2].sum()),
      "rollout/turns": float(per_row[:, 2].mean()),
      "rollout/answered": float(per_row[:, 3].mean()),
      "rollout/generated_tokens": generated,
      "rollout/observation_tokens": obs_tokens,
      "rollout/tokens": generated + obs_tokens,
      "rollout/prefill_tokens": prefill,
      "rollout/reprefill_tokens": reprefill,
      "time/rollout_model_s": loop.secs["model"],
      "time/rollout_retrieval_s": loop.secs["retrieval"],
  }


def _collect(loop: _Loop, rows: list[_Row], longest: int, tokenizer, vocab_size: int) -> Rollout:
  """The rows as right-padded host arrays, with the model's own answers and the statistics."""
  width = smp.bucket(max(len(r.response) for r in rows), minimum=8)
  loss_mask = _pad([r.mask for r in rows], width, np.float32)
  tok_bytes = stops.cached_token_bytes(tokenizer, vocab_size)
  answers = [rewards.model_answer(r.response, r.mask, tok_bytes) for r in rows]
  return Rollout(
      prompt_ids=_pad([r.prompt for r in rows], longest, np.int32),
      prompt_len=np.array([len(r.prompt) for r in rows], np.int32),
      response_ids=_pad([r.response for r in rows], width, np.int32),
      response_len=np.array([len(r.response) for r in rows], np.int32),
      loss_mask=loss_mask,
      answer_mask=_pad([a[0] for a in answers], width, np.float32),
      answer=[a[1] for a in answers],
      sample_logp=_pad([r.logp for r in rows], width, np.float32),
      valid_searches=np.array([r.searches for r in rows], np.int32),
      turns=np.array([r.turns for r in rows], np.int32),
      invalid_actions=np.array([r.invalid for r in rows], np.int32),
      finish_reason=np.array([r.finish for r in rows]),
      response_text=[tokenizer.decode(r.response, skip_special_tokens=False) for r in rows],
      stats=_stats(loop, rows, loss_mask), capacity=loop.cap)


def rollout(model, tokenizer, retriever, prompts: Sequence[Sequence[int]], *, group_size: int = 1,
            rollout_cfg: RolloutConfig = RolloutConfig(), seed: int = 0, mesh=None,
            eos_ids: Sequence[int] | None = None, progress: bool = True,
            min_capacity: int = 0) -> Rollout:
  """Search-R1 episodes for every prompt × `group_size`; `retriever.retrieve_text(queries, k)`.

  `min_capacity`: cache slots of earlier rollouts. The capacity shapes every sampler program, so
  a batch of shorter prompts keeps the larger one rather than compiling them all again (at most
  `max_context`)."""
  prompt_rows = [[int(t) for t in p] for p in prompts for _ in range(group_size)]
  if not prompt_rows or min(map(len, prompt_rows)) == 0:
    raise ValueError("rollout: need at least one prompt and no empty prompt")
  # Shapes (and whether a jitted call happens at all) are agreed over processes: see hosts.py.
  (longest,) = hosts.agree_max(max(map(len, prompt_rows)))
  cap = max(cache_capacity(rollout_cfg, longest), min(min_capacity, rollout_cfg.max_context))
  if longest >= cap:
    raise ValueError(f"rollout: a prompt of {longest} tokens leaves no room under "
                     f"max_context={cap}")
  eos = tuple(eos_ids) if eos_ids is not None else _eos_ids(model, tokenizer)
  sample_cfg = smp.SampleConfig(rollout_cfg.temperature, rollout_cfg.top_p, rollout_cfg.top_k, eos)
  table_QxMxV = hosts.put_replicated(
      stops.cached_stop_table(tokenizer, STOP_STRINGS, model.cfg.vocab_size), mesh)
  graphdef, params = nnx.split(model)
  (padded,) = hosts.agree_max(hosts.padded_rows(len(prompt_rows), mesh))
  state = smp.init_state(model.cfg, padded, cap, rollout_cfg.max_turn_tokens, len(STOP_STRINGS),
                         seed=seed, cache_dtype=rollout_cfg.cache_dtype, mesh=mesh)
  loop = _Loop(graphdef, params, sample_cfg, table_QxMxV, cap, padded, mesh)
  rows = [_Row(prompt=p, block=list(p), total=len(p)) for p in prompt_rows]

  bar = tqdm.tqdm(range(rollout_cfg.max_turns + 1), desc="rollout turns", disable=not progress,
                  leave=False)
  for turn in bar:
    limit_B = _turn_limits(rows, loop, rollout_cfg.max_turn_tokens)
    live = np.flatnonzero([r.live for r in rows])
    sampled = _sample(loop, state, rows, live, limit_B, first=turn == 0)
    if sampled is None:
      break
    bar.set_postfix(live=len(live))
    state, toks_BxTs, logp_BxTs, num_B, stop_B = sampled
    observations, searching, queries = _take_actions(
        rows, live, toks_BxTs, logp_BxTs, num_B, stop_B, tokenizer,
        final=turn == rollout_cfg.max_turns)
    _search(loop, retriever, queries, searching, rollout_cfg.topk, observations)
    _insert_observations(loop, rows, observations, searching, tokenizer, rollout_cfg)
  bar.close()
  return _collect(loop, rows, longest, tokenizer, model.cfg.vocab_size)
