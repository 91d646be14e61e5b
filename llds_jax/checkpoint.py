"""Orbax checkpoints of the train state plus the host-side cursor (data position, step).

Saves are atomic (orbax writes to a temporary directory and renames) and may be asynchronous.
Restore targets the *current* mesh, so a run may resume on a different device layout. The frozen
reference model is not saved: it is reloaded from the base weights.

Every finished checkpoint is sealed with `MANIFEST` (size + sha256 of each of its files), written
once orbax has committed it. Restore trusts only a checkpoint whose manifest matches: one with a
missing manifest (killed before sealing) or a mismatching file is *moved aside* into
`<dir>.quarantine/` (never deleted) and the previous one is used; when none is left but one was
corrupt (not merely unsealed) the restore raises instead of starting over. Any other restore
failure (a config that does not match, out of memory, I/O) is raised and nothing is touched.
"""

from __future__ import annotations

import collections
import glob
import json
import logging
import os
import shutil
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from llds_jax import faults, file_io

MANIFEST = "llds_manifest.json"


class CorruptCheckpoint(Exception):
  """A checkpoint proven incomplete or corrupt (its manifest is missing or does not match)."""


class UnsealedCheckpoint(CorruptCheckpoint):
  """A checkpoint without a manifest: the run was killed between orbax's commit and the seal."""


def _files(step_dir: str) -> list[str]:
  out = []
  for root, _, names in os.walk(step_dir):
    # Orbax rewrites its step metadata (commit timestamps) and may write its commit marker after
    # the seal: neither holds data the restore needs.
    out += [os.path.relpath(os.path.join(root, n), step_dir) for n in names
            if n not in (MANIFEST, MANIFEST + ".tmp", "commit_success.txt")
            and not (root == step_dir and n == "_CHECKPOINT_METADATA")]
  return sorted(out)


def seal(step_dir: str) -> None:
  """Writes `step_dir/MANIFEST`: {relative path: [size, sha256]} of every file (atomic rename)."""
  files = {rel: [os.path.getsize(os.path.join(step_dir, rel)),
                 file_io.file_sha256(os.path.join(step_dir, rel))]
           for rel in _files(step_dir)}
  tmp = os.path.join(step_dir, MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"files": files}, f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(step_dir, MANIFEST))


_VERIFIED = set()  # (step_dir, manifest mtime) hashed clean in this process: resume checks twice


def verify(step_dir: str) -> None:
  """Raises CorruptCheckpoint naming the first file whose size or hash differs from the manifest."""
  path = os.path.join(step_dir, MANIFEST)
  if os.path.isfile(path) and (step_dir, os.path.getmtime(path)) in _VERIFIED:
    return
  if not os.path.isfile(path):
    raise UnsealedCheckpoint(f"{path}: missing (the checkpoint was never sealed: killed while "
                            "being written, or written before checksums existed)")
  try:
    with open(path) as f:
      files = json.load(f)["files"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise CorruptCheckpoint(f"{path}: unreadable manifest ({e})") from None
  for rel, (size, digest) in sorted(files.items()):
    full = os.path.join(step_dir, rel)
    if not os.path.isfile(full):
      raise CorruptCheckpoint(f"{full}: missing")
    if os.path.getsize(full) != size:
      raise CorruptCheckpoint(f"{full}: {os.path.getsize(full)} bytes, {size} when saved")
    if file_io.file_sha256(full) != digest:
      raise CorruptCheckpoint(f"{full}: sha256 differs from the one recorded at save")
  extra = sorted(set(_files(step_dir)) - set(files))
  if extra:
    raise CorruptCheckpoint(f"{os.path.join(step_dir, extra[0])}: not in the manifest")
  _VERIFIED.add((step_dir, os.path.getmtime(path)))


def _key_str(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return ".".join(parts)


def _leaves_by_path(tree) -> dict:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_key_str(p): v for p, v in leaves}


def mismatch(saved: dict, expected: dict, what: str) -> str | None:
  """First difference between two flat {name: value} dicts, as a message naming it; None if equal."""
  for key in sorted(set(saved) | set(expected)):
    if key not in saved:
      return f"{what} {key!r}: not in the checkpoint (now {expected[key]!r})"
    if key not in expected:
      return f"{what} {key!r}: in the checkpoint ({saved[key]!r}) but not in this config"
    if saved[key] != expected[key]:
      return f"{what} {key!r}: checkpoint has {saved[key]!r}, this config {expected[key]!r}"
  return None


class Checkpointer:
  """Keeps the newest `keep` checkpoints under `directory`."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.async_save = async_save
    self._pending = collections.deque()  # steps saved but not yet sealed, oldest first
    extra = {}
    if async_save:  # seal once orbax has committed the step (only async checkpointers call back)
      extra["async_options"] = ocp.AsyncOptions(post_finalization_callback=self._seal_pending)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save, **extra)
    # Handlers named up front so a new process can read a step's tree metadata before any
    # restore (a bare PyTreeCheckpointer on `<step>/state` looks there for the step-level
    # metadata file and logs a warning on every resume).
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def _seal_pending(self) -> None:
    # Orbax finishes saves in order, one at a time, so the oldest pending step is the one done.
    step = self._pending.popleft() if self._pending else None
    if step is None or jax.process_index() != 0:
      return
    final = os.path.join(self.directory, str(step))
    # Orbax calls back before it renames `<step>.orbax-checkpoint-tmp-*` into place (the manifest
    # moves with it); with commit-file atomicity (GCS) the files are already at `final`.
    tmp = sorted(glob.glob(glob.escape(final) + ".orbax-checkpoint-tmp*"))
    seal(final if os.path.isdir(final) else tmp[-1])

  def save(self, step: int, state, meta: dict) -> None:
    """Start saving `state` (a pytree of sharded arrays) and the JSON-able `meta` at `step`."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    self._pending.append(step)
    self.manager.save(step, args=args, force=True)
    faults.point("checkpoint", step)  # test-only: committed (sync) or in flight (async), unsealed
    if not self.async_save:
      self._seal_pending()

  def newest_intact(self) -> tuple[int | None, list[tuple[int, str, bool]]]:
    return newest_intact(self.directory)

  def _move_aside(self, step: int, reason: str) -> None:
    src = os.path.join(self.directory, str(step))
    dst = os.path.join(self.directory + ".quarantine", f"{step}-{int(time.time())}")
    logging.warning("checkpoint %s is incomplete or corrupt (%s); moving it to %s and using the "
                    "previous one", src, reason, dst)
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      shutil.move(src, dst)

  def restore_latest(self, abstract_state, fingerprint: dict | None = None):
    """(step, state, meta) from the newest intact checkpoint, or None when there is none.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with shardings: arrays are restored
    straight into those shards. The saved shapes/dtypes (and `fingerprint`, model fields saved in
    the meta) must equal this config's, else ValueError naming the first difference, before
    anything is touched. Newer checkpoints that fail their manifest are then moved aside (the run
    redoes those steps and must be able to save them again).
    """
    step, corrupt = self.newest_intact()
    if step is not None:
      if fingerprint is not None:
        check_compatible(self.directory, fingerprint)
      tree = self.manager.item_metadata(step)["state"]  # the tree's metadata, no arrays
      saved = _leaves_by_path(tree)
      saved = {k: (tuple(v.shape), np.dtype(v.dtype).name) for k, v in saved.items()}
      want = {k: (tuple(v.shape), np.dtype(v.dtype).name)
              for k, v in _leaves_by_path(abstract_state).items()}
      diff = mismatch(saved, want, "state leaf (shape, dtype)")
      if diff:
        raise ValueError(f"{self.directory}/{step} does not match this config: {diff}. Resume "
                         "with the run's own config, or use a new config.workdir (nothing touched)")
    if step is None and any(not unsealed for _, _, unsealed in corrupt):
      # Starting over would cut metrics.jsonl back to step 0: a person decides, not the trainer.
      raise ValueError(f"{self.directory}: no intact checkpoint; "
                       + "; ".join(reason for _, reason, _ in corrupt)
                       + ". Nothing was touched: restore the files, or move the checkpoints "
                       "away to start over")
    for bad, reason, _ in corrupt:
      self._move_aside(bad, reason)
    if corrupt:
      self.manager.reload()
    if step is None:
      return None
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              meta=ocp.args.JsonRestore())
    # Errors here (out of memory, I/O, an orbax bug) propagate: they do not prove corruption.
    restored = self.manager.restore(step, args=args)
    return step, restored["state"], dict(restored["meta"])

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def newest_intact(directory: str) -> tuple[int | None, list[tuple[int, str, bool]]]:
  """(newest step whose manifest matches or None, [(newer bad step, reason, unsealed?), ...])."""
  corrupt = []
  for step in reversed(saved_steps(directory)):
    try:
      verify(os.path.join(directory, str(step)))
      return step, corrupt
    except CorruptCheckpoint as e:
      corrupt.append((step, str(e), isinstance(e, UnsealedCheckpoint)))
  return None, corrupt


def model_fingerprint(c) -> dict:
  """The run config's fields that fix what a checkpoint holds: {dotted field: value}."""
  out = {f"model.{k}": c.model[k] for k in ("path", "param_dtype", "scan_layers")}
  if not c.model.path and "random" in c.model:
    out.update({f"model.random.{k}": v for k, v in c.model.random.to_dict().items()})
  return json.loads(json.dumps(out))  # as the JSON meta will hold it (tuples become lists)


def check_compatible(directory: str, fingerprint: dict) -> None:
  """Raises ValueError naming the model field in which the newest intact checkpoint differs."""
  step, _ = newest_intact(directory)
  if step is None:
    return
  with open(os.path.join(directory, str(step), "meta", "metadata")) as f:
    saved = json.load(f).get("fingerprint")
  if saved is None:  # saved before fingerprints existed; restore still checks shapes and dtypes
    return
  diff = mismatch(saved, fingerprint, "config field")
  if diff:
    raise ValueError(f"{directory}/{step} does not match this config: {diff}. Resume with the "
                     "run's own config, or train in a new config.workdir (nothing was touched)")


def saved_steps(directory: str) -> list[int]:
  """Steps with a committed checkpoint directory under `directory`, ascending.

  The one listing every reader uses (resume, `restore.load_run`, the resume=False guard). Orbax
  writes into `<step>.orbax-checkpoint-tmp-*` and renames when done, so a bare integer name is a
  committed checkpoint; whether it is intact is `verify`'s question.
  """
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def abstract_like(tree, shardings):
  """ShapeDtypeStructs (with shardings) of `tree`, the restore target."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
