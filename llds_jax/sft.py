"""Supervised format warm-up: teach a policy the Search-R1 action format before RL.

Dims (llds_jax/__init__.py): B rows (of the trajectory pool, or of one step), P prompt and R
response tokens.

A random (or weak) policy almost never emits a well-formed `<search>…</search>` or
`<answer>…</answer>`, so GRPO sees all-zero rewards and learns nothing. `format_warmup` builds
ideal trajectories from QA examples,

  <think> … </think>\\n<search> query </search>  + the real `<information>` observation
  … (one block per planned search)
  <think> … </think>\\n<answer> gold </answer>

and fits them with masked next-token NLL. Every token is laid out exactly as `rollout` would
produce it: the chat-templated prompt (`data.encode_prompt`), actions encoded as ordinary text
(`loss_mask` 1), observations from the same retriever and `observations.encode_observations`
(special tokens not parsed, cut to `max_obs_tokens`, `loss_mask` 0), in the `[left-padded prompt |
right-padded response]` layout of the RL batch (`batch_layout.row_layout`). So the warmed-up
policy starts RL on exactly the inputs it was fitted on, and the loss is the trainer's own fused
log-prob.

A fraction `direct_frac` of trajectories answers without searching, so the policy also knows that
action and RL has the search-or-answer choice to learn.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx

from llds_jax import batch_layout, data, faults, losses, observations, sharding as shd
from llds_jax.sampler import bucket
from llds_jax.train_step import response_logprobs

SEARCH_THINK = "<think> I need to search for {query}. </think>\n<search> {query} </search>"
ANSWER_THINK = "<think> The results give the answer. </think>\n<answer> {answer} </answer>"
DIRECT_THINK = "<think> I know the answer. </think>\n<answer> {answer} </answer>"
# Without the reasoning step (`think=False`): an action's first token is its choice of tool.
SEARCH_PLAIN = "<search> {query} </search>"
ANSWER_PLAIN = "<answer> {answer} </answer>"


@dataclasses.dataclass(frozen=True)
class Trajectory:
  """One ideal episode as token ids; `loss_mask` is 1 on action tokens, 0 on observations."""
  prompt_ids: list[int]
  response_ids: list[int]
  loss_mask: list[float]


def question_plan(example: data.Example) -> list[str]:
  """Default plan: one search whose query is the question itself (any Search-R1 dataset)."""
  if example.question:
    return [example.question.strip()]
  return [m["content"] for m in example.messages if m["role"] == "user"][-1:]


def build_trajectory(tokenizer, retriever, example: data.Example, queries: Sequence[str], *,
                     topk: int = 3, max_obs_tokens: int = 500, obs_truncation: str = "passages",
                     think: bool = True) -> Trajectory:
  """Searches `queries` in order (real observations), then answers with the first gold.

  `think=False` drops the `<think>` steps, so every action starts with its tag.
  """
  prompt = data.encode_prompt(example.messages, tokenizer)
  resp, mask = [], []

  def act(text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    resp.extend(ids)
    mask.extend([1.0] * len(ids))

  passages = retriever.retrieve_text(list(queries), topk) if queries else []
  blocks = [observations.information_block(p) for p in passages]
  obs = observations.encode_observations(tokenizer, blocks, max_obs_tokens, obs_truncation)
  for query, obs_ids in zip(queries, obs):
    act((SEARCH_THINK if think else SEARCH_PLAIN).format(query=query))
    resp.extend(obs_ids)
    mask.extend([0.0] * len(obs_ids))
  answer = (ANSWER_THINK if queries else DIRECT_THINK) if think else ANSWER_PLAIN
  act(answer.format(answer=example.golds[0]))
  return Trajectory(prompt, resp, mask)


def build_trajectories(tokenizer, retriever, examples: Sequence[data.Example], *,
                       plan: Callable[[data.Example], Sequence[str]] = question_plan,
                       direct_frac: float = 0.0, seed: int = 0, topk: int = 3,
                       max_obs_tokens: int = 500, obs_truncation: str = "passages",
                       think: bool = True) -> list[Trajectory]:
  """One ideal trajectory per example; a seeded `direct_frac` of them answer without searching."""
  direct = np.random.default_rng(seed).random(len(examples)) < direct_frac
  return [build_trajectory(tokenizer, retriever, ex, [] if d else plan(ex), topk=topk,
                           max_obs_tokens=max_obs_tokens, obs_truncation=obs_truncation,
                           think=think)
          for ex, d in zip(examples, direct)]


def layout(trajs: Sequence[Trajectory]) -> dict[str, np.ndarray]:
  """Trajectories as update-batch rows (`batch_layout.row_layout`) with their loss mask."""
  P = max(len(t.prompt_ids) for t in trajs)
  R = max(len(t.response_ids) for t in trajs)
  mask_BxR = np.zeros((len(trajs), R), np.float32)
  for b, t in enumerate(trajs):
    mask_BxR[b, :len(t.loss_mask)] = t.loss_mask
  return dict(batch_layout.row_layout([t.prompt_ids for t in trajs],
                                      [t.response_ids for t in trajs], P, R), loss_mask=mask_BxR)


def _nll(params, graphdef, batch: dict, chunk_size: int):
  logp_BxR, _ = response_logprobs(graphdef, params, batch, resp_len=batch["loss_mask"].shape[1],
                                  chunk_size=chunk_size, with_entropy=False)
  return -losses.masked_mean(logp_BxR, batch["loss_mask"])


def _sft_step(params, opt_state, batch: dict, *, graphdef, tx, chunk_size: int):
  loss, grads = jax.value_and_grad(_nll)(params, graphdef, batch, chunk_size)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def format_warmup(model: nnx.Module, tokenizer, retriever, examples: Sequence[data.Example], *,
                  steps: int = 300, lr: float = 1e-3, batch_size: int = 16, seed: int = 0,
                  mesh=None, plan: Callable[[data.Example], Sequence[str]] = question_plan,
                  direct_frac: float = 0.0, topk: int = 3, max_obs_tokens: int = 500,
                  obs_truncation: str = "passages", weight_decay: float = 0.0,
                  chunk_size: int = 256, think: bool = True,
                  trajectories: Sequence[Trajectory] | None = None,
                  progress: bool = False) -> tuple[nnx.Module, np.ndarray]:
  """AdamW on masked NLL of ideal trajectories; returns (trained model, per-step losses).

  The trajectories are `build_trajectories`' over `examples` (searching `retriever`), or
  `trajectories` when given (e.g. built over several corpora; `examples` is then unused).

  The lr warms up linearly over the first 10% of steps, then decays by cosine to lr/10. Batches
  are drawn uniformly with replacement from the pool (seeded), so the result is reproducible.
  """
  if steps < 1:
    raise ValueError(f"format_warmup needs steps ≥ 1, got {steps}")
  if trajectories is None:
    trajectories = build_trajectories(tokenizer, retriever, examples, plan=plan,
                                      direct_frac=direct_frac, seed=seed, topk=topk,
                                      max_obs_tokens=max_obs_tokens,
                                      obs_truncation=obs_truncation, think=think)
  if not trajectories:
    raise ValueError("format_warmup needs examples (or trajectories), got none")
  mesh = mesh if mesh is not None else shd.make_mesh()
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % shards:
    raise ValueError(f"batch_size={batch_size} must be a multiple of the mesh's {shards} row "
                     "shards")
  pool = layout(trajectories)
  keys = ("input_ids", "attn_mask", "positions", "loss_mask")
  graphdef, params = nnx.split(model)
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 10, 1), steps, lr / 10)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=weight_decay))
  p_sh = shd.state_shardings(jax.eval_shape(lambda: params), mesh)
  rep = shd.replicated(mesh)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, params), p_sh,
                                 transform_non_params=lambda _: rep)
  b_sh = {k: shd.batch_sharding(mesh, 2) for k in keys}
  init = jax.jit(tx.init, out_shardings=opt_sh)
  step = shd.OnMesh(jax.jit(lambda p, o, b: _sft_step(p, o, b, graphdef=graphdef, tx=tx,
                                                     chunk_size=chunk_size),
                           in_shardings=(p_sh, opt_sh, b_sh), out_shardings=(p_sh, opt_sh, rep),
                           donate_argnums=(0, 1)), mesh)
  # Training must not donate the caller's live buffers: start from a copy of the parameters.
  params = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=p_sh)(params)
  opt_state = init(params)
  rng = np.random.default_rng(seed)
  n, P = pool["input_ids"].shape[0], pool["input_ids"].shape[1] - pool["loss_mask"].shape[1]
  resp_len = pool["loss_mask"].shape[1] - np.argmax(pool["attn_mask"][:, ::-1] > 0, axis=1)
  out = []
  bar = tqdm.tqdm(range(steps), desc="format warm-up", disable=not progress, leave=False)
  for i in bar:
    rows = rng.integers(0, n, batch_size)
    # Responses are right-padded: cut the batch at a bucketed width (few compiled shapes).
    R = min(bucket(int(resp_len[rows].max())), pool["loss_mask"].shape[1])
    batch = {k: jax.device_put(pool[k][rows][:, :R if k == "loss_mask" else P + R], b_sh[k])
             for k in keys}
    params, opt_state, loss = step(params, opt_state, batch)
    if i == 0:
      faults.point("warmup")  # test-only crash injection (llds_jax/faults.py)
    out.append(loss)  # device scalars: fetched at the end, so the host runs ahead of the device
    if i >= 2:  # ...by two steps at most: hundreds of queued multi-device steps (simulated CPU
      out[i - 2].block_until_ready()  # devices) were seen to hang in XLA's collectives
    if progress and i % 25 == 24:  # ...except for an honest progress bar now and then
      bar.set_postfix(nll=f"{float(loss):.3f}")
  return nnx.merge(graphdef, params), np.asarray(jax.device_get(out), np.float32)


def warmup_from_config(c, model: nnx.Module, tokenizer, retriever,
                       examples: Sequence[data.Example], mesh,
                       progress: bool = False) -> tuple[nnx.Module, np.ndarray]:
  """`format_warmup` with a run config's settings (`c.model.format_warmup_*`, the seed, and the
  rollout's passages and observation cut, so warm-up and rollouts see the same observations)."""
  return format_warmup(
      model, tokenizer, retriever, examples, steps=c.model.format_warmup_steps,
      lr=c.model.format_warmup_lr, batch_size=c.model.format_warmup_batch, seed=c.seed,
      mesh=mesh, topk=c.retriever.topk, max_obs_tokens=c.rollout.max_obs_tokens,
      obs_truncation=c.rollout.obs_truncation, progress=progress)
