"""The training loop: rollout with search → EM rewards → GRPO advantages → minibatch updates.

Dims (llds_jax/__init__.py): B rows (this step's prompts × G group size), P prompt and R
response tokens.

The loop only: what it runs is built elsewhere (the policy and the rollout's weight copy in
`policy`, the retriever in `search_pool`, the update rows in `batch_layout`) and everything
numeric happens in `rollout`, `losses` and `train_step`. The loop is a straight `for step` with
`if step % every` blocks, in the style of nanodo / big_vision trainers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from flax import nnx
from jax.sharding import Mesh

from llds_jax import checkpoint, config_check, data, evaluation, faults, hosts, losses, plots
from llds_jax import metrics as mlib, policy, rewards, sft
from llds_jax import sharding as shd
from llds_jax.batch_layout import build_batch, widths as batch_widths
from llds_jax.rollout import RolloutConfig, rollout, rollout_config
from llds_jax.search_pool import load_retriever
from llds_jax.train_step import Updater, step_config, update_phase

# Progress notes a user should see are INFO on this logger (main.py shows the "llds_jax" tree at
# INFO); WARNING is kept for things that need action.
_log = logging.getLogger(__name__)


def zero_variance_filter(reward_B: np.ndarray, group_B: np.ndarray,
                         minibatch: int) -> tuple[np.ndarray, dict]:
  """(rows to train on, filter/* metrics) for `rl.filter_zero_variance` (DAPO dynamic sampling).

  Groups whose rewards are all equal have Â = 0 for every row, so no policy-gradient signal.
  Rows of the other groups are kept in order and cut to whole minibatches (no refill), so the
  optimizer steps per rollout can fall, to none.
  """
  informative = {g for g in np.unique(group_B) if np.ptp(reward_B[group_B == g]) > 0}
  keep = np.flatnonzero([g in informative for g in group_B])
  used = keep[:len(keep) // minibatch * minibatch]
  return used, {"filter/zero_variance_frac": 1.0 - len(keep) / max(len(group_B), 1),
                "filter/rows_used": float(len(used))}


def answer_beta(c, mean_valid_searches: float) -> float:
  """LLDS-MA β for this step (PAPER.md §B.4); 1.0 (no effect) when mask_answer is off."""
  if not c.rl.mask_answer:
    return 1.0
  if not c.rl.adaptive_beta:
    return losses.fixed_beta(c.rl.answer_weight, c.rl.llds_lambda)
  return float(losses.adaptive_beta(mean_valid_searches, formula=c.rl.adaptive_beta,
                                    base_weight=c.rl.answer_weight, lam=c.rl.llds_lambda))


@dataclasses.dataclass
class _Run:
  """What every step of one training run reads."""

  c: ml_collections.ConfigDict
  mesh: Mesh
  show: bool  # progress bars (process 0 only)
  tokenizer: Any
  retriever: Any
  graphdef: Any
  updater: Updater
  sampling_weights: Callable  # params → the rollout's compute-dtype copy (policy.py)
  ref_params: Any  # the frozen KL reference, or None without a KL term
  rollout_cfg: RolloutConfig

  def sampling_model(self, state) -> nnx.Module:
    return nnx.merge(self.graphdef, self.sampling_weights(state.params))


def _load_data(c) -> tuple[list, list, data.PromptIterator]:
  """Train and validation questions and the prompt iterator; errors name a file and row."""
  examples = data.load_examples(c.data.train.split(","))
  val = data.load_examples(c.data.val.split(",")) if c.data.val else []
  if c.log.eval_limit:
    val = val[:c.log.eval_limit]
  if c.rollout.prompts > len(examples):
    raise ValueError(f"config.rollout.prompts={c.rollout.prompts} exceeds the {len(examples)} "
                     f"questions of config.data.train={c.data.train!r}")
  return examples, val, data.PromptIterator(examples, c.rollout.prompts, seed=c.seed,
                                            shuffle=c.data.shuffle)


def _build_run(c, mesh, examples: list, val: list) -> tuple[_Run, Any]:
  """The policy (format-warmed-up if asked), its updater and the retriever; (run, state)."""
  show = c.log.progress and jax.process_index() == 0  # one set of progress bars per job
  retriever = load_retriever(c.retriever.index, c.retriever.workers, c.retriever.build_memory_mb)
  model, _, tokenizer = policy.load(c, mesh)
  for field, exs in (("config.data.train", examples), ("config.data.val", val)):
    data.check_prompt_lengths(exs, tokenizer, c.rollout.max_prompt_tokens, field)
  if c.model.format_warmup_steps:
    model, sft_losses = sft.warmup_from_config(c, model, tokenizer, retriever, examples, mesh,
                                               progress=show)
    _log.info("format warm-up: NLL %.3f -> %.3f over %d steps", sft_losses[0],
              sft_losses[-1], len(sft_losses))
  graphdef, params = nnx.split(model)
  # The frozen reference of the KL term is the policy RL starts from.
  ref_params = jax.tree.map(lambda x: x.copy(), params) if c.rl.kl_coef else None
  abstract = jax.eval_shape(lambda: params)
  updater = Updater(graphdef, abstract, opt=c.opt, step_cfg=step_config(c), mesh=mesh)
  state = updater.init_state(params)
  run = _Run(c, mesh, show, tokenizer, retriever, graphdef, updater,
             policy.compute_dtype_weights(c, abstract, mesh), ref_params, rollout_config(c))
  return run, state


def _roll_out(run: _Run, state, batch: list, step: int, min_capacity: int):
  """This process's prompts of the step, each `group_size` times, through the search rollout
  (its KV cache no smaller than `min_capacity`, so earlier steps' sampler programs serve)."""
  c = run.c
  # Lengths were checked for every question at start-up (`data.check_prompt_lengths`).
  prompts = [data.encode_prompt(ex.messages, run.tokenizer) for ex in batch]
  # The compute-dtype copy of the weights lives only for the rollout, not during the update.
  return rollout(run.sampling_model(state), run.tokenizer, run.retriever, prompts,
                 group_size=c.rollout.group_size, rollout_cfg=run.rollout_cfg,
                 seed=c.seed * 1_000_003 + step, mesh=run.mesh, progress=run.show,
                 min_capacity=min_capacity)


def _score(c, ro, batch: list) -> dict:
  """EM rewards of this process's rows and GRPO advantages from every process's groups."""
  rows, group_B = data.repeat_groups(batch, c.rollout.group_size)
  reward_B = np.array([rewards.em_of(rewards.scored_answer(a, t, c.rl.reward_scope), ex.golds)
                       for a, t, ex in zip(ro.answer, ro.response_text, rows)], np.float32)
  # Batch statistics over every host's rows; this host keeps its own slice of the advantages.
  reward_all, group_all = hosts.gather_rows(reward_B), hosts.gather_rows(group_B)
  adv_B = hosts.split(np.asarray(losses.grpo_advantages(reward_all, group_all)))
  return dict(reward_B=reward_B, group_B=group_B, reward_all=reward_all, group_all=group_all,
              adv_B=adv_B)


def _update_rows(c, ro, scored: dict, floor: tuple[int, int]) -> tuple[dict, float, dict]:
  """(host batch, LLDS-MA β, filter/* metrics): the rows the update trains on, no narrower
  than `floor` (the widths of earlier steps, so shorter rows reuse compiled programs)."""
  beta = answer_beta(c, float(hosts.gather_rows(ro.valid_searches).mean()))
  answer_w = np.where(ro.answer_mask > 0, beta, 1.0)
  host_batch = build_batch(ro, scored["adv_B"], answer_w, max_len=c.rollout.max_context,
                           floor=floor)
  filtered = {}
  if c.rl.filter_zero_variance:
    used, filtered = zero_variance_filter(scored["reward_B"], scored["group_B"],
                                          c.rl.minibatch_size)
    host_batch = {k: v[used] for k, v in host_batch.items()}
  return host_batch, beta, filtered


def _update(run: _Run, state, host_batch: dict, step: int) -> tuple[Any, dict]:
  """The minibatch updates of one rollout; (state, loss and LLD metrics)."""
  c = run.c
  if not len(host_batch["adv"]):  # every group filtered: no update; zeros keep every metric key
    m = {k: 0.0 for k in ("loss/total", "loss/pg", "loss/llds", "loss/kl", "entropy",
                          "grad_norm", "skipped_nonfinite")}
    m.update({"update/optimizer_steps": 0, "lld/preserving_logp": float("nan")})  # no π_old pass
    return run.updater.advance(state), m
  progress = (lambda s: tqdm.tqdm(s, desc="update", leave=False)) if run.show else None
  shuffle = c.seed * 7919 + step if c.rl.shuffle_minibatches else None
  state, per_mb, batch_stats = update_phase(run.updater, state, host_batch, run.ref_params,
                                            minibatch=c.rl.minibatch_size,
                                            ppo_epochs=c.rl.ppo_epochs, shuffle_seed=shuffle,
                                            progress=progress)
  m = mlib.summarize_minibatches(per_mb)
  m.update({k: float(v) for k, v in jax.device_get(batch_stats).items()})
  return state, m


def _step_metrics(ro, scored: dict, beta: float, t_roll: float) -> dict:
  """reward/*, llds/answer_beta and the rollout's timing and length over every process."""
  reward_all, group_all = scored["reward_all"], scored["group_all"]
  return {"reward/mean": float(reward_all.mean()), "reward/max_group_std": float(
      max(np.std(reward_all[group_all == g]) for g in np.unique(group_all))),
          "llds/answer_beta": beta, "time/rollout_s": t_roll,
          "rollout/response_tokens_mean": float(hosts.gather_rows(ro.response_len).mean())}


def _validation(run: _Run, state, val: list) -> dict:
  """val/<data_source>/* of the current policy on the held-out questions."""
  c = run.c
  table, _ = evaluation.evaluate(
      run.sampling_model(state), run.tokenizer, run.retriever, val,
      rollout_cfg=evaluation.eval_rollout_config(run.rollout_cfg,
                                                 max_turns=c.log.eval_max_turns),
      batch_size=max(c.rollout.prompts, 1), mesh=run.mesh, seed=c.seed, progress=run.show,
      reward_scope=c.rl.reward_scope)
  return {f"val/{src}/{k}": v for src, row in table.items() for k, v in row.items()}


def _lld_watch(monitor: mlib.LLDMonitor, done: int, ro, m: dict) -> dict:
  """The LLD monitor's metrics: a sustained fall of preserving log-probs, repeated responses."""
  same, both = hosts.gather_rows(np.array([mlib.repeat_counts(ro.response_ids, ro.loss_mask)
                                           ])).sum(0)
  return monitor.update(done, m["lld/preserving_logp"], float(same / max(both, 1)))


def train(c) -> list[dict]:
  """Runs `c.total_steps` training steps in `c.workdir`; returns the metric records written."""
  config_check.validate(c)
  fingerprint = checkpoint.model_fingerprint(c)
  if c.resume:  # a run resumed with another model is refused before anything is touched
    checkpoint.check_compatible(os.path.join(c.workdir, "checkpoints"), fingerprint)
  os.makedirs(c.workdir, exist_ok=True)
  mesh = shd.make_mesh(dict(c.mesh))
  # Data and corpus first: their errors name a file and row before anything is compiled.
  examples, val, it = _load_data(c)
  run, state = _build_run(c, mesh, examples, val)
  ckpt = checkpoint.Checkpointer(os.path.join(c.workdir, "checkpoints"), keep=c.ckpt.keep,
                                 async_save=c.ckpt.async_save)
  start = 0
  # The widest (P, R) update batch and the largest rollout KV cache so far. A changed width
  # compiles new log-prob and update programs (~35 s a step for a 24-layer model on one H200,
  # bench/RESULTS.md), a changed cache every sampler program, so both only grow; the checkpoint
  # keeps them, so a resumed run pads exactly as the uninterrupted one.
  widths, capacity = (0, 0), 0
  if c.resume:
    restored = ckpt.restore_latest(
        checkpoint.abstract_like(state, run.updater.state_shardings), fingerprint)
    if restored is not None:
      start, state, meta = restored
      it.restore(meta["data"])
      widths, capacity = tuple(meta.get("widths", widths)), meta.get("capacity", capacity)
      _log.info("resumed from step %d", start)
  # Written once the checkpoint is known to match, so a refused resume leaves the run's own.
  if jax.process_index() == 0:
    with open(os.path.join(c.workdir, "config.json"), "w") as f:
      f.write(c.to_json_best_effort(indent=2))
  writer = mlib.MetricWriter(c.workdir, tensorboard=c.log.tensorboard,
                             resume_step=start if c.resume else 0)
  records = []
  monitor = mlib.LLDMonitor(patience=c.log.lld_patience)
  if start and os.path.exists(writer.path):  # continue the streak an uninterrupted run would see
    monitor.restore(mlib.read_metrics(writer.path))
  bar = tqdm.tqdm(range(start, c.total_steps), desc="train", initial=start, total=c.total_steps,
                  disable=not run.show)
  for step in bar:
    t0 = time.perf_counter()
    batch = hosts.split(next(it))  # this process's prompts: a contiguous share
    ro = _roll_out(run, state, batch, step, capacity)
    capacity = max(capacity, ro.capacity)
    faults.point("rollout", step + 1)  # test-only crash injection (llds_jax/faults.py)
    t_roll = time.perf_counter() - t0
    scored = _score(c, ro, batch)
    host_batch, beta, filtered = _update_rows(c, ro, scored, widths)
    widths = tuple(max(a, b) for a, b in zip(widths, batch_widths(host_batch)))
    state, m = _update(run, state, host_batch, step)
    faults.point("update", step + 1)
    m.update(filtered)
    m.update(ro.stats)
    m.update(_step_metrics(ro, scored, beta, t_roll))
    done = step + 1
    if val and c.log.eval_every and (done % c.log.eval_every == 0 or done == c.total_steps):
      m.update(_validation(run, state, val))
      faults.point("validation", done)
    m.update(_lld_watch(monitor, done, ro, m))
    m["time/step_s"] = time.perf_counter() - t0
    rec = writer.write(done, m)
    # The checkpoint follows its step's record, so after a kill anywhere they agree: a restored
    # checkpoint's records are all on disk, and records past it are cut and redone on resume.
    if done % c.ckpt.every == 0 or done == c.total_steps:
      ckpt.save(done, state, {"data": it.state(), "step": done, "fingerprint": fingerprint,
                              "widths": list(widths), "capacity": capacity})
    records.append(rec)
    bar.set_postfix(reward=f"{rec['reward/mean']:.3f}", llds=f"{rec['loss/llds']:.2e}")
  ckpt.close()
  writer.close()
  if c.log.plots and jax.process_index() == 0 and records:
    written = plots.plot(writer.path, os.path.join(c.workdir, "plots"))
    _log.info("wrote %d plots to %s", len(written), os.path.join(c.workdir, "plots"))
  return records
