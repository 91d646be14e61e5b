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

from llds_jax import checkpoint, hf_io, sharding as shd, tokenizer_check
from llds_jax.model import ModelConfig, Transformer


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


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps with a finished checkpoint under `workdir/checkpoints`, ascending."""
  root = epath.Path(workdir) / "checkpoints"
  if not root.exists():
    return []
  # Orbax writes into `<step>.orbax-checkpoint-tmp-*` and renames when done, so a bare integer
  # name is a committed checkpoint.
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "state").exists())


def policy_config(c, *, dtype: str | None = None):
  """(ModelConfig, tokenizer) of the run's policy, without reading its initial weights.

  `dtype` overrides the compute dtype (params keep the run's `param_dtype`, as checkpointed).
  """
  # For the hf_io loaders `dtype` is the compute dtype once `param_dtype` is overridden.
  overrides = dict(param_dtype=c.model.param_dtype, dtype=dtype or c.model.dtype, remat="none")
  path, tokenizer = c.model.path, None
  if path.endswith(".gguf"):
    # A GGUF keeps its architecture and tokenizer beside the weights; reading them dequantizes
    # the base weights once, which the caller then drops.
    _, cfg, tokenizer = hf_io.load_gguf(path, **overrides)
  elif path:
    cfg = hf_io.read_config(path, **overrides)
  elif "random" in c.model:
    cfg = ModelConfig.from_hf(c.model.random.to_dict(), **overrides)
  else:
    raise ValueError("run config has neither model.path nor model.random: cannot rebuild the model")
  if c.model.tokenizer and not os.path.exists(c.model.tokenizer):
    raise FileNotFoundError(f"run config model.tokenizer={c.model.tokenizer!r}: no such "
                            "directory (the run was made on another machine?)")
  tokenizer = tokenizer_check.policy_tokenizer(
      cfg, path, c.model.tokenizer, carried=tokenizer, field="run config model.tokenizer",
      allow_mismatch=c.model.get("allow_tokenizer_mismatch", False))
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
  steps = checkpoint_steps(workdir)
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
