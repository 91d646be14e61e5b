"""Exact-match evaluation of the search agent: the training rollout, greedy by default.

Returns a per-`data_source` table (EM, F1, searches, invalid-action and answer rates) and the
per-question records it was computed from, so any number in the table can be re-derived.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
import tqdm

from llds_jax import data, hosts, rewards
from llds_jax.rollout import RolloutConfig, rollout

# Table columns: record field averaged per source, or (numerator, denominator) summed per source.
COLUMNS = {"em": "em", "f1": "f1", "searches": "searches",
           "invalid_action_rate": ("invalid_actions", "turns"), "answer_rate": "answered",
           "turns": "turns"}  # invalid_action_rate: per turn, as the training metric


def evaluate(model, tokenizer, retriever, examples: Sequence[data.Example], *,
             rollout_cfg: RolloutConfig, batch_size: int = 64, mesh=None, seed: int = 0,
             progress: bool = True, reward_scope: str = "sampled",
             ) -> tuple[dict[str, dict[str, float]], list[dict]]:
  """(table, records): metrics per data source (plus "all") and one record per question.

  `reward_scope` picks the scored answer (rewards.REWARD_SCOPES; default: the model's own).
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size={batch_size} must be positive")
  if not examples:
    raise ValueError("evaluate: no questions to evaluate (empty file, or eval limit 0 of them)")
  if reward_scope not in rewards.REWARD_SCOPES:
    raise ValueError(f"reward_scope={reward_scope!r} not in {rewards.REWARD_SCOPES}")
  records = []
  bar = tqdm.tqdm(total=len(examples), desc="evaluate", unit="q", disable=not progress)
  for start in range(0, len(examples), batch_size):
    chunk = list(examples[start:start + batch_size])
    # Each process rolls out a contiguous share; a short chunk is padded with repeats of its last
    # question so it divides over the processes, and the repeats' records are dropped.
    mine = hosts.split(chunk + chunk[-1:] * (-len(chunk) % jax.process_count()))
    prompts = [data.encode_prompt(ex.messages, tokenizer) for ex in mine]
    ro = rollout(model, tokenizer, retriever, prompts, group_size=1, rollout_cfg=rollout_cfg,
                 seed=seed + start, mesh=mesh, progress=progress)
    local = []
    for i, ex in enumerate(mine):
      text = ro.response_text[i]
      answer = rewards.scored_answer(ro.answer[i], text, reward_scope)
      local.append({
          "data_source": ex.data_source, "index": ex.index, "question": ex.question,
          "golds": list(ex.golds), "response": text, "answer": answer,
          "answered": bool(ro.finish_reason[i] == "answer"),
          "em": rewards.em_of(answer, ex.golds), "f1": rewards.f1_of(answer, ex.golds),
          "searches": int(ro.valid_searches[i]), "turns": int(ro.turns[i]),
          "invalid_actions": int(ro.invalid_actions[i]), "finish_reason": str(ro.finish_reason[i]),
      })
    records += hosts.gather_objects(local)[:len(chunk)]
    bar.update(len(chunk))
    em = np.mean([r["em"] for r in records])
    bar.set_postfix(em=f"{em:.3f}")
  bar.close()
  return summarize(records), records


def summarize(records: Sequence[dict]) -> dict[str, dict[str, float]]:
  """The `COLUMNS` per data source (sorted) and over all questions ("all", last)."""
  groups = collections.defaultdict(list)
  for r in records:
    groups[r["data_source"]].append(r)
  ordered = [(s, groups[s]) for s in sorted(groups)] + [("all", list(records))]
  table = {}
  for source, rows in ordered:
    row = {"n": len(rows)}
    for col, field in COLUMNS.items():
      if isinstance(field, tuple):
        num, den = (sum(r[f] for r in rows) for f in field)
        row[col] = float(num / max(den, 1))
      else:
        row[col] = float(np.mean([r[field] for r in rows]))
    table[source] = row
  return table


def markdown_table(table: dict[str, dict[str, float]]) -> str:
  """GitHub Markdown: one row per data source, EM/F1 and rates to three decimals."""
  cols = ["n", *COLUMNS]
  lines = ["| data_source | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
  for source, row in table.items():
    cells = [str(row["n"])] + [f"{row[c]:.3f}" for c in cols[1:]]
    lines.append(f"| {source} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def take_per_source(examples: Sequence[data.Example], limit: int) -> list[data.Example]:
  """The first `limit` questions of every data source (all when `limit` is 0), in file order."""
  if limit <= 0:
    return list(examples)
  seen = collections.Counter()
  out = []
  for ex in examples:
    if seen[ex.data_source] < limit:
      seen[ex.data_source] += 1
      out.append(ex)
  return out


def eval_rollout_config(rollout_cfg: RolloutConfig, *, max_turns: int,
                        greedy: bool = True) -> RolloutConfig:
  """The paper's evaluation: same rollout, `max_turns` (4), greedy unless sampling is asked for."""
  greedy_kw = {"temperature": 0.0} if greedy else {}
  return dataclasses.replace(rollout_cfg, max_turns=max_turns, **greedy_kw)
