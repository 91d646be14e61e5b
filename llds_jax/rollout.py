"""Search-R1 multi-turn rollouts whose observations are appended into the live KV cache.

Dims: B prompts, G group size, N = B·G rows (prompt-major: row n answers prompt n // G), P prompt
tokens, R response tokens, T tokens of a fed block.

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
import re
import time
from collections.abc import Sequence

import numpy as np
import tqdm
from flax import nnx

from llds_jax import hosts, rewards, stops
from llds_jax import sampler as smp

STOP_STRINGS = ("</search>", "</answer>")
MIN_VIEW = 256  # cache slots a turn attends to are a power of two ≥ this (few compiled shapes)
_ANSWER_SPAN = re.compile(rb"<answer>.*?</answer>", re.DOTALL)  # as rewards.extract_answer
INFO_OPEN, INFO_CLOSE = "\n\n<information>", "</information>\n\n"
OBS_TRUNCATION = ("passages", "raw")
INVALID_ACTION = ("\nMy previous action is invalid. If I want to search, I should put the query "
                  "between <search> and </search>. If I want to give the final answer, I should "
                  "put the answer between <answer> and </answer>. Let me try again.\n")


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

def worst_case_tokens(cfg: RolloutConfig) -> int:
  """Response tokens of a row whose every turn runs to its limit and every search is fed."""
  return (cfg.max_turns + 1) * cfg.max_turn_tokens + cfg.max_turns * cfg.max_obs_tokens


def cache_capacity(cfg: RolloutConfig, longest_prompt: int) -> int:
  """Tokens per row, also the KV cache slots; the prompt is bucketed, so a new longest prompt
  does not recompile the sampler each step."""
  return min(cfg.max_context, smp.bucket(longest_prompt) + worst_case_tokens(cfg))


def turn_view(cap: int, need: int) -> int:
  """Cache slots a turn attends to (and writes): `need` rounded up to a power of two ≥ MIN_VIEW,
  at most `cap`, so cost follows the context and few shapes are compiled."""
  return min(cap, max(MIN_VIEW, 1 << (need - 1).bit_length()))


@dataclasses.dataclass
class Rollout:
  """One batch of trajectories as host arrays, right-padded."""

  prompt_ids: np.ndarray  # int32 [N, P]
  prompt_len: np.ndarray  # int32 [N]
  response_ids: np.ndarray  # int32 [N, R]: sampled and observation tokens, in context order
  response_len: np.ndarray  # int32 [N]
  loss_mask: np.ndarray  # float32 [N, R]: 1 exactly on model-sampled tokens
  answer_mask: np.ndarray  # float32 [N, R]: 1 on the model's answer span (`model_answer`)
  answer: list  # str | None per row: the model's own last complete answer (None: never answered)
  sample_logp: np.ndarray  # float32 [N, R]: sampler log-prob (temperature 1) if sampled, else 0
  valid_searches: np.ndarray  # int32 [N]: searches whose results entered the context
  turns: np.ndarray  # int32 [N]: generation turns
  invalid_actions: np.ndarray  # int32 [N]: turns whose text held no complete search/answer action
  finish_reason: np.ndarray  # str [N]: "answer" | "max_turns" | "context"
  response_text: list[str]  # decoded response, special tokens kept
  stats: dict[str, float]


def encode_observations(tokenizer, texts: Sequence[str], max_tokens: int,
                        truncation: str = "passages") -> list[list[int]]:
  """Observation ids (at most `max_tokens` each) with special-token parsing off.

  Special tokens are never parsed, so document text never becomes a control id. An information
  block longer than `max_tokens` keeps its closing `</information>\n\n` under
  `truncation="passages"`: the passages are cut to the room left after the closing tag's tokens.
  Why: a block that stops mid-document teaches the model to continue writing documents (Search-R1's
  raw cut, `truncation="raw"`, loses the tag for most long top-3 results). Other texts (the
  invalid-action message) are cut raw.
  """
  if truncation not in OBS_TRUNCATION:
    raise ValueError(f"observation truncation {truncation!r} not in {OBS_TRUNCATION} "
                     "(config.rollout.obs_truncation)")
  if not texts:
    return []
  encode = lambda xs: tokenizer(list(xs), add_special_tokens=False,  # noqa: E731
                                split_special_tokens=True)["input_ids"]
  out = [[int(t) for t in ids] for ids in encode(texts)]
  cut = [i for i, (text, ids) in enumerate(zip(texts, out))
         if len(ids) > max_tokens and truncation == "passages" and text.endswith(INFO_CLOSE)]
  if cut:
    open_ids, close_ids = encode([INFO_OPEN, INFO_CLOSE])
    room = max_tokens - len(close_ids)
    if room < len(open_ids):
      raise ValueError(f"max_obs_tokens={max_tokens} cannot hold the <information> tags "
                       f"({len(open_ids) + len(close_ids)} tokens) (config.rollout.max_obs_tokens)")
    heads = encode([texts[i][:-len(INFO_CLOSE)] for i in cut])
    for i, head in zip(cut, heads):
      out[i] = [int(t) for t in head[:room]] + [int(t) for t in close_ids]
  return [ids[:max_tokens] for ids in out]


def information_block(passages: str) -> str:
  """Search-R1 observation around the retrieved passages."""
  return f"{INFO_OPEN}{passages.strip()}{INFO_CLOSE}"


def answer_span_mask(ids: Sequence[int], tok_bytes: Sequence[bytes]) -> np.ndarray:
  """float32: 1 on tokens overlapping the last complete `<answer>…</answer>` (tags included).

  The span `rewards.extract_answer` reads, found in O(T) on token bytes (special tokens are empty,
  and never contain the tags) instead of by decoding token by token.
  """
  lens = np.array([len(tok_bytes[t]) for t in ids], np.int64)
  ends = np.cumsum(lens)
  spans = list(_ANSWER_SPAN.finditer(b"".join(tok_bytes[t] for t in ids)))
  if not spans:
    return np.zeros(len(ids), np.float32)
  lo, hi = spans[-1].span()
  return ((ends > lo) & (ends - lens < hi)).astype(np.float32)


def model_answer(ids: Sequence[int], mask: Sequence[float],
                 tok_bytes: Sequence[bytes]) -> tuple[np.ndarray, str | None]:
  """(answer_mask, answer) of the last complete answer span inside one run of sampled tokens.

  Only the model's own text counts (DESIGN.md §Rewards): each maximal run of `mask` = 1 is one
  turn's sampled tokens, searched on its own, so a span quoted in a retrieved document, or one
  joined across an inserted observation or the invalid-action message, is never the answer.
  answer_mask is 1 on that span's tokens; answer is its stripped text (None: never answered).
  """
  mask_T = np.asarray(mask, np.float32)
  edges = np.flatnonzero(np.diff(np.concatenate([[0], (mask_T > 0).astype(np.int8), [0]])))
  out_T = np.zeros(len(ids), np.float32)
  for start, stop in reversed(list(zip(edges[::2], edges[1::2]))):
    run = [int(t) for t in ids[start:stop]]
    out_T[start:stop] = answer_span_mask(run, tok_bytes)
    if out_T.any():
      text = b"".join(tok_bytes[t] for t in run)
      span = list(_ANSWER_SPAN.finditer(text))[-1].group()
      return out_T, span[len(b"<answer>"):-len(b"</answer>")].decode("utf-8", "replace").strip()
  return out_T, None


def _eos_ids(model, tokenizer) -> tuple[int, ...]:
  ids = {tokenizer.eos_token_id}
  cfg_eos = model.cfg.eos_token_id
  ids.update(cfg_eos if isinstance(cfg_eos, tuple) else (cfg_eos,))
  return tuple(sorted(int(i) for i in ids if i is not None))


def _pad(rows: Sequence[Sequence], width: int, dtype) -> np.ndarray:
  out = np.zeros((len(rows), width), dtype)
  for n, r in enumerate(rows):
    out[n, :len(r)] = r
  return out


def rollout(model, tokenizer, retriever, prompts: Sequence[Sequence[int]], *, group_size: int = 1,
            cfg: RolloutConfig = RolloutConfig(), seed: int = 0, mesh=None,
            eos_ids: Sequence[int] | None = None, progress: bool = True) -> Rollout:
  """Search-R1 episodes for every prompt × `group_size`; `retriever.retrieve_text(queries, k)`."""
  prompt_rows = [[int(t) for t in p] for p in prompts for _ in range(group_size)]
  if not prompt_rows or min(map(len, prompt_rows)) == 0:
    raise ValueError("rollout: need at least one prompt and no empty prompt")
  n_rows = len(prompt_rows)
  # Shapes (and whether a jitted call happens at all) are agreed over processes: see hosts.py.
  (longest,) = hosts.agree_max(max(map(len, prompt_rows)))
  cap = cache_capacity(cfg, longest)
  if longest >= cap:
    raise ValueError(f"rollout: a prompt of {longest} tokens leaves no room under "
                     f"max_context={cap}")
  scfg = smp.SampleConfig(cfg.temperature, cfg.top_p, cfg.top_k,
                          tuple(eos_ids) if eos_ids is not None else _eos_ids(model, tokenizer))
  table_QxMxV = hosts.put_replicated(
      stops.cached_stop_table(tokenizer, STOP_STRINGS, model.cfg.vocab_size), mesh)
  graphdef, params = nnx.split(model)
  (padded,) = hosts.agree_max(hosts.padded_rows(n_rows, mesh))
  state = smp.init_state(model.cfg, padded, cap, cfg.max_turn_tokens, len(STOP_STRINGS), seed=seed,
                         cache_dtype=cfg.cache_dtype, mesh=mesh)

  # Host bookkeeping per row. `total` counts prompt + response tokens, the pending one included.
  resp = [[] for _ in range(n_rows)]
  mask = [[] for _ in range(n_rows)]
  logp = [[] for _ in range(n_rows)]
  block = [list(p) for p in prompt_rows]  # what the next feed writes into the row's cache
  total = [len(p) for p in prompt_rows]
  live = [True] * n_rows
  finish = [""] * n_rows
  turns = np.zeros(n_rows, np.int32)
  searches = np.zeros(n_rows, np.int32)
  invalid = np.zeros(n_rows, np.int32)
  count = dict(obs_tokens=0, prefill=0, reprefill=0)
  secs = dict(model=0.0, retrieval=0.0)

  bar = tqdm.tqdm(range(cfg.max_turns + 1), desc="rollout turns", disable=not progress, leave=False)
  for turn in bar:
    final = turn == cfg.max_turns
    limit_B = np.zeros(padded, np.int32)
    for n in np.flatnonzero(live):
      if cap - total[n] < 1:
        live[n], finish[n] = False, "context"
      else:
        limit_B[n] = min(cfg.max_turn_tokens, cap - total[n])
    rows = np.flatnonzero(live)
    # Attend to (and write) only the slots this turn can reach: cost follows the context, not `cap`.
    any_live, width, need = hosts.agree_max(
        len(rows) > 0, smp.bucket(max((len(block[n]) for n in rows), default=1)),
        max((total[n] + int(limit_B[n]) for n in rows), default=1))
    if not any_live:
      break
    bar.set_postfix(live=len(rows))
    tokens_BxT = np.zeros((padded, width), np.int32)
    len_B = np.zeros(padded, np.int32)
    for n in rows:
      tokens_BxT[n, :len(block[n])], len_B[n] = block[n], len(block[n])
      count["prefill"] += len(block[n])
      count["reprefill"] += total[n] if turn else len(block[n])  # re-prefilling every turn

    view = turn_view(cap, need)
    t0 = time.perf_counter()
    put = functools.partial(hosts.put_rows, mesh=mesh)
    state = smp.feed(graphdef, params, state, put(tokens_BxT), put(len_B), put(limit_B),
                     table_QxMxV, scfg, view)
    state = smp.decode(graphdef, params, state, table_QxMxV, scfg, view)
    toks_BxN, logp_BxN, num_B, stop_B = map(
        hosts.local_rows, (state.tokens_BxN, state.logp_BxN, state.num_B, state.stop_B))
    secs["model"] += time.perf_counter() - t0

    # The segment's last token is pending (not in the cache): it opens the next block, unless it is
    # an EOS, which is dropped from response and context alike.
    eos_B = stop_B == smp.EOS
    new_ids = [toks_BxN[n, :num_B[n] - eos_B[n]].tolist() for n in rows]
    texts = tokenizer.batch_decode(new_ids, skip_special_tokens=True)
    observations, queries, searching = {}, [], []
    for n, ids, text in zip(rows, new_ids, texts):
      turns[n] += 1
      resp[n] += ids
      mask[n] += [1.0] * len(ids)
      logp[n] += logp_BxN[n, :len(ids)].tolist()
      total[n] += len(ids)
      block[n] = [] if eos_B[n] else ids[-1:]
      kind, content = rewards.parse_action(text)
      invalid[n] += kind is None
      if kind == "answer" or final:
        live[n], finish[n] = False, "answer" if kind == "answer" else "max_turns"
      elif kind == "search":
        queries.append(content)
        searching.append(n)
      else:
        observations[n] = INVALID_ACTION
    if queries:
      t0 = time.perf_counter()
      passages = retriever.retrieve_text(queries, cfg.topk)
      secs["retrieval"] += time.perf_counter() - t0
      for n, text in zip(searching, passages):
        observations[n] = information_block(text)
    obs_rows = sorted(observations)
    obs_ids = encode_observations(tokenizer, [observations[n] for n in obs_rows],
                                  cfg.max_obs_tokens, cfg.obs_truncation)
    for n, ids in zip(obs_rows, obs_ids):
      if total[n] + len(ids) + 1 > cap:  # no room to answer after this observation
        live[n], finish[n] = False, "context"
        continue
      resp[n] += ids
      mask[n] += [0.0] * len(ids)
      logp[n] += [0.0] * len(ids)
      total[n] += len(ids)
      block[n] += ids
      count["obs_tokens"] += len(ids)
      searches[n] += n in searching  # a search counts once its result is in the context
  bar.close()

  width = smp.bucket(max(map(len, resp)), minimum=8)
  loss_mask = _pad(mask, width, np.float32)
  tok_bytes = stops.cached_token_bytes(tokenizer, model.cfg.vocab_size)
  answers = [model_answer(r, m, tok_bytes) for r, m in zip(resp, mask)]
  answer_mask = _pad([a[0] for a in answers], width, np.float32)
  # Statistics over every process's rows (each process returns only its own rows).
  per_row = hosts.gather_rows(np.stack([searches, invalid, turns,
                                        [f == "answer" for f in finish]], 1).astype(np.int64))
  generated, obs_tokens, prefill, reprefill = hosts.gather_rows(np.array(
      [[loss_mask.sum(), count["obs_tokens"], count["prefill"], count["reprefill"]]],
      np.int64)).sum(0).tolist()
  stats = {
      "rollout/searches_per_traj": float(per_row[:, 0].mean()),
      "rollout/invalid_action_rate": float(per_row[:, 1].sum() / per_row[:, 2].sum()),
      "rollout/turns": float(per_row[:, 2].mean()),
      "rollout/answered": float(per_row[:, 3].mean()),
      "rollout/generated_tokens": generated,
      "rollout/observation_tokens": obs_tokens,
      "rollout/tokens": generated + obs_tokens,
      "rollout/prefill_tokens": prefill,
      "rollout/reprefill_tokens": reprefill,
      "time/rollout_model_s": secs["model"],
      "time/rollout_retrieval_s": secs["retrieval"],
  }
  return Rollout(
      prompt_ids=_pad(prompt_rows, longest, np.int32),
      prompt_len=np.array([len(p) for p in prompt_rows], np.int32),
      response_ids=_pad(resp, width, np.int32),
      response_len=np.array([len(r) for r in resp], np.int32),
      loss_mask=loss_mask,
      answer_mask=answer_mask,
      answer=[a[1] for a in answers],
      sample_logp=_pad(logp, width, np.float32),
      valid_searches=searches,
      turns=turns,
      invalid_actions=invalid,
      finish_reason=np.array(finish),
      response_text=[tokenizer.decode(r, skip_special_tokens=False) for r in resp],
      stats=stats)
