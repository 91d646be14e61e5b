"""Rebuild a trained policy from a run directory: `config.json` → architecture, orbax → params.

Read-only: unlike `Checkpointer.restore_latest` (which moves a corrupt newest checkpoint aside so
a resumed run can rewrite it), nothing here touches the run directory, and an unreadable or
corrupt checkpoint (its checksum manifest differs) is an error naming it. Only the policy parameters are read (an orbax partial restore),
so the optimizer state never occupies memory.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, NamedTuple

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from llds_jax import checkpoint, policy, sharding as shd
from llds_jax.model import Transformer
from llds_jax.model_config import ModelConfig


class Run(NamedTuple):
  """A restored policy and where it came from."""
  model: Transformer
  cfg: ModelConfig
  tokenizer: Any
  config: ml_collections.ConfigDict  # the run's config.json
  step: int


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's ConfigDict, as the trainer wrote it to `workdir/config.json`."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path}: missing (not a llds_jax run directory; --workdir and "
                            "--checkpoint take the directory given as --config.workdir)")
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON ({e})") from e


def policy_config(c, *, dtype: str | None = None):
  """(ModelConfig, tokenizer) of the run's policy (`policy.load` without its initial weights).

  `dtype` overrides the compute dtype (params keep the run's `param_dtype`, as checkpointed).
  """
  if c.model.tokenizer and not os.path.exists(c.model.tokenizer):
    raise FileNotFoundError(f"run config model.tokenizer={c.model.tokenizer!r}: no such "
                            "directory (the run was made on another machine?)")
  _, cfg, tokenizer = policy.load(c, dtype=dtype, remat="none", weights=False,
                                  field="run config model.tokenizer")
  return cfg, tokenizer


def restore_params(workdir: str, step: int, abstract_params, shardings):
  """The policy's nnx State at `step`, each array restored straight into `shardings`."""
  path = epath.Path(workdir) / "checkpoints" / str(step) / "state"
  target = {"params": jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params, shardings)}
  args = ocp.args.PyTreeRestore(item=target,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                partial_restore=True)
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      return ckptr.restore(path, args=args)["params"]
  except Exception as e:  # noqa: BLE001  (orbax raises many types; all mean "cannot read this")
    raise ValueError(f"{path}: cannot restore the policy parameters ({type(e).__name__}: "
                     f"{str(e)[:300]}); does the checkpoint belong to this config.json?") from e


def load_run(workdir: str, step: int | None = None, mesh=None, *, dtype: str | None = None) -> Run:
  """The policy at `step` (default: newest) of a training run.

  Params are placed by the logical-axis rules on `mesh`, or on one device when `mesh` is None.
  """
  workdir = os.path.abspath(workdir)  # orbax refuses relative paths with a misleading message
  c = run_config(workdir)
  steps = checkpoint.saved_steps(os.path.join(workdir, "checkpoints"))
  if not steps:
    raise FileNotFoundError(f"{workdir}/checkpoints: no finished checkpoint")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ValueError(f"step {step}: no checkpoint in {workdir}/checkpoints (have {steps})")
  step_dir = os.path.join(workdir, "checkpoints", str(step))
  if os.path.exists(os.path.join(step_dir, checkpoint.MANIFEST)):
    try:
      checkpoint.verify(step_dir)
    except checkpoint.CorruptCheckpoint as e:
      raise ValueError(f"step {step} of {workdir} is corrupt: {e}") from None
  else:
    logging.warning("%s: no %s (never sealed, or written before checksums): unverified", step_dir,
                    checkpoint.MANIFEST)
  cfg, tokenizer = policy_config(c, dtype=dtype)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  if mesh is None:
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: one, abstract)
  else:
    shardings = shd.state_shardings(abstract, mesh)
  params = restore_params(workdir, step, abstract, shardings)
  return Run(nnx.merge(graphdef, params), cfg, tokenizer, c, step)
