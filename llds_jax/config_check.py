"""The run config's checks: every field the run would trip over, named before any expensive work.

One home for what a config value may be: the allowed values themselves live with the code that
uses them (`losses.GATES`, `rewards.REWARD_SCOPES`, `observations.OBS_TRUNCATION`,
`sharding.WEIGHT_LAYOUTS`); this module checks a run config (`c`, configs/*.py) against them, and
the sizes against each other and the mesh. `trainer.train` calls `validate` first.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from llds_jax import checkpoint, hosts, losses, rewards
from llds_jax import sharding as shd
from llds_jax.observations import OBS_TRUNCATION


def validate(c) -> None:
  """Fail loud, naming the offending field, before any expensive work."""
  if not c.workdir:
    raise ValueError("config.workdir is required (--config.workdir=DIR)")
  for field in ("rollout.prompts", "rollout.group_size", "total_steps", "ckpt.every",
                "ckpt.keep", "rollout.max_turn_tokens", "rollout.max_prompt_tokens"):
    value = c[field.split(".")[0]][field.split(".")[1]] if "." in field else c[field]
    if value <= 0:
      raise ValueError(f"config.{field}={value} must be > 0")
  if c.rl.reward_scope not in rewards.REWARD_SCOPES:
    raise ValueError(f"config.rl.reward_scope={c.rl.reward_scope!r} not in "
                     f"{rewards.REWARD_SCOPES}")
  rows = c.rollout.prompts * c.rollout.group_size
  if c.rl.minibatch_size <= 0 or rows % c.rl.minibatch_size:
    raise ValueError(f"config.rl.minibatch_size={c.rl.minibatch_size} must divide the rollout rows "
                     f"rollout.prompts × group_size = {rows}")
  if c.rl.micro_batch_size <= 0 or c.rl.minibatch_size % c.rl.micro_batch_size:
    raise ValueError(f"config.rl.micro_batch_size={c.rl.micro_batch_size} must divide "
                     f"rl.minibatch_size={c.rl.minibatch_size}")
  # "" = the official default per loss (agg) / a fixed β (adaptive_beta).
  for field, allowed in (("llds_gate", losses.GATES), ("llds_norm", losses.NORMS),
                         ("loss", losses.LOSSES), ("kl_kind", losses.KL_KINDS),
                         ("agg", ("",) + losses.AGGS),
                         ("adaptive_beta", ("",) + losses.BETA_FORMULAS)):
    if c.rl[field] not in allowed:
      raise ValueError(f"config.rl.{field}={c.rl[field]!r} not in {allowed}")
  if c.rollout.obs_truncation not in OBS_TRUNCATION:
    raise ValueError(f"config.rollout.obs_truncation={c.rollout.obs_truncation!r} not in "
                     f"{OBS_TRUNCATION}")
  if c.rollout.weight_sharding not in shd.WEIGHT_LAYOUTS:
    raise ValueError(f"config.rollout.weight_sharding={c.rollout.weight_sharding!r} not in "
                     f"{tuple(shd.WEIGHT_LAYOUTS)}")
  if c.rl.mask_answer and c.rl.llds_lambda <= 0:
    raise ValueError("config.rl.mask_answer=True needs config.rl.llds_lambda > 0")
  for field in ("data.train", "retriever.index") + (("data.val",) if c.data.val else ()):
    section, key = field.split(".")
    path = c[section][key]
    for p in str(path).split(","):
      if not p or not os.path.exists(p):
        raise FileNotFoundError(f"config.{field}={path!r}: no such file or directory")
  if c.model.path and not os.path.exists(c.model.path):
    raise FileNotFoundError(f"config.model.path={c.model.path!r}: no such file or directory")
  if not c.model.path and not c.model.tokenizer:
    raise ValueError("config.model.tokenizer is required when config.model.path is empty")
  mesh_devices = np.prod([v for v in c.mesh.values() if v != -1])
  if jax.device_count() % mesh_devices:
    raise ValueError(f"config.mesh={dict(c.mesh)} does not fit {jax.device_count()} devices")
  mesh = shd.make_mesh(dict(c.mesh))
  row_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  per_micro = c.rl.micro_batch_size
  if per_micro % row_shards:
    raise ValueError(f"config.rl.micro_batch_size={per_micro} must be a multiple of the mesh's "
                     f"data × fsdp = {row_shards} row shards")
  lp_rows = c.rl.logprob_micro_batch_size
  if c.rl.pack:
    validate_packing(c, row_shards)
  elif lp_rows < 0 or (lp_rows and (rows % lp_rows or lp_rows % row_shards)):
    raise ValueError(f"config.rl.logprob_micro_batch_size={lp_rows} must divide the rollout rows "
                     f"({rows}) and be a multiple of the mesh's {row_shards} row shards (0 = off)")
  nproc = jax.process_count()  # every host rolls out an equal, contiguous share of the prompts
  if c.rollout.prompts % nproc:
    raise ValueError(f"config.rollout.prompts={c.rollout.prompts} must divide over {nproc} hosts")
  hosts.local_batch_shards(mesh)  # each host must hold whole row shards; raises naming the mesh
  if c.rl.filter_zero_variance and nproc > 1:  # hosts would keep different row counts
    raise ValueError("config.rl.filter_zero_variance=True is single-process for now")
  if not c.resume and checkpoint.saved_steps(os.path.join(c.workdir, "checkpoints")):
    raise ValueError(f"config.resume=False but {c.workdir}/checkpoints already holds checkpoints: "
                     "use a new config.workdir or delete that directory (nothing is overwritten)")


def validate_packing(c, row_shards: int) -> None:
  """The `config.rl` packing sizes against the mesh's row shards (with `rl.pack`)."""
  if c.rl.pack_len and c.rl.pack_len < c.rollout.max_context:
    raise ValueError(f"config.rl.pack_len={c.rl.pack_len} must be 0 or ≥ rollout.max_context="
                     f"{c.rollout.max_context} (a row must fit one packed sequence)")
  seqs = c.rl.pack_micro_seqs or c.rl.micro_batch_size
  if seqs <= 0 or seqs % row_shards:
    raise ValueError(f"config.rl.pack_micro_seqs={c.rl.pack_micro_seqs} (0 = micro_batch_size) "
                     f"must give a multiple of the mesh's {row_shards} row shards")
  lp = c.rl.logprob_micro_batch_size
  if lp < 0 or lp % row_shards:
    raise ValueError(f"config.rl.logprob_micro_batch_size={lp} must be a multiple of the mesh's "
                     f"{row_shards} row shards (0 = off)")
