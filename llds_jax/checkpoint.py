"""Orbax checkpoints of the train state plus the host-side cursor (data position, step).

Saves are atomic (orbax writes to a temporary directory and renames) and may be asynchronous.
Restore targets the *current* mesh, so a run may resume on a different device layout. The frozen
reference model is not saved: it is reloaded from the base weights.
"""

from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Keeps the newest `keep` checkpoints under `directory`."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state, meta: dict) -> None:
    """Start saving `state` (a pytree of sharded arrays) and the JSON-able `meta` at `step`."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    self.manager.save(step, args=args, force=True)

  def restore_latest(self, abstract_state):
    """(step, state, meta) from the newest readable checkpoint, or None when there is none.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with shardings: arrays are restored
    straight into those shards. An unreadable newest checkpoint (e.g. a crash mid-write on a
    filesystem without atomic rename, or a corrupted file) is skipped with a warning.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                  meta=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return step, restored["state"], dict(restored["meta"])
      except Exception as e:  # noqa: BLE001  (any failure to read means: try the previous one)
        logging.warning("checkpoint %d in %s is unreadable (%s: %s); deleting it and trying the "
                        "previous one", step, self.directory, type(e).__name__, str(e)[:200])
        # The run will redo this step and must be able to save it again.
        self.manager.delete(step)
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def saved_steps(directory: str) -> list[int]:
  """Steps with a checkpoint directory under `directory` (orbax names them by step), sorted."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def abstract_like(tree, shardings):
  """ShapeDtypeStructs (with shardings) of `tree`, the restore target."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
