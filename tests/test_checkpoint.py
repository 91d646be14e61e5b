"""Checkpoints: sealed with checksums, corrupt ones moved aside (never deleted), mismatches refused."""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llds_jax import checkpoint

FINGERPRINT = {"model.path": "", "model.random.hidden_size": 32}


def _state(seed):
  rng = np.random.default_rng(seed)
  return {"params": {"w": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32),
                     "b": jnp.asarray(rng.normal(size=(32,)), jnp.float32)},
          "step": jnp.asarray(seed, jnp.int32)}


def _abstract(state):
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return checkpoint.abstract_like(state, jax.tree.map(lambda _: one, state))


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def saved(request, tmp_path):
  """Checkpoints 1 and 2 of a tiny state under tmp_path/ckpt."""
  ck = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=5, async_save=request.param)
  for step in (1, 2):
    ck.save(step, _state(step), {"step": step, "fingerprint": FINGERPRINT})
  ck.close()
  return tmp_path / "ckpt"


def _biggest_array_file(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir / "state") for f in fs
           if "/d/" in os.path.join(r, f) + "/" or os.path.basename(r) == "d"]
  return max(files, key=os.path.getsize)


def _garble(step_dir):
  path = _biggest_array_file(step_dir)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    f.write(b"\xff" * 64)
  return path


def _truncate(step_dir):
  path = _biggest_array_file(step_dir)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  return path


def _remove_array_file(step_dir):
  path = _biggest_array_file(step_dir)
  os.remove(path)
  return path


def _remove_metadata(step_dir):
  path = str(step_dir / "state" / "_METADATA")
  os.remove(path)
  return path


def _garble_meta(step_dir):
  path = str(step_dir / "meta" / "metadata")
  with open(path, "w") as f:
    f.write('{"step": 7}')
  return path


def _remove_manifest(step_dir):  # a kill after orbax's commit, before the seal
  path = str(step_dir / checkpoint.MANIFEST)
  os.remove(path)
  return path


def _garble_manifest(step_dir):
  path = str(step_dir / checkpoint.MANIFEST)
  with open(path, "w") as f:
    f.write('{"files": ')
  return path


def _extra_file(step_dir):
  path = str(step_dir / "state" / "d" / "stray")
  with open(path, "wb") as f:
    f.write(b"x")
  return path


@pytest.mark.parametrize("corrupt", [_garble, _truncate, _remove_array_file, _remove_metadata,
                                     _garble_meta, _remove_manifest, _garble_manifest,
                                     _extra_file])
def test_corrupt_newest_is_moved_aside_and_previous_restored(saved, corrupt, caplog):
  bad = corrupt(saved / "2")
  ck = checkpoint.Checkpointer(str(saved), keep=5)
  with caplog.at_level(logging.WARNING):
    step, state, meta = ck.restore_latest(_abstract(_state(1)), FINGERPRINT)
  ck.close()
  assert step == 1 and meta["step"] == 1
  np.testing.assert_array_equal(state["params"]["w"], _state(1)["params"]["w"])
  assert bad in caplog.text  # the warning names the file
  assert not (saved / "2").exists()
  moved = os.listdir(str(saved) + ".quarantine")
  assert len(moved) == 1 and moved[0].startswith("2-")  # moved aside, not deleted


@pytest.mark.parametrize("damage", ["none", "delete", "garble"])
def test_intact_newest_restores_bitwise(saved, damage):
  # Orbax's step-level metadata (timestamps) is rewritten at commit, so not sealed; the restore
  # does not need it, and the sealed data still restores exactly without it.
  step_meta = saved / "2" / "_CHECKPOINT_METADATA"
  if damage == "delete":
    os.remove(step_meta)
  elif damage == "garble":
    step_meta.write_text("{garbage")
  ck = checkpoint.Checkpointer(str(saved), keep=5)
  step, state, _ = ck.restore_latest(_abstract(_state(2)), FINGERPRINT)
  ck.close()
  assert step == 2
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(_state(2))):
    np.testing.assert_array_equal(a, b)


def test_resume_logs_no_warning(saved, caplog):
  # A healthy resume is silent: reading the tree metadata from `<step>/state` with a bare
  # checkpointer made orbax warn on every resume that the step's metadata file was missing there.
  caplog.set_level(logging.WARNING)
  ck = checkpoint.Checkpointer(str(saved), keep=5)
  step, _, _ = ck.restore_latest(_abstract(_state(2)), FINGERPRINT)
  ck.close()
  assert step == 2
  assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def _tree_of(directory):
  return sorted(os.path.relpath(os.path.join(r, f), directory) for r, _, fs in os.walk(directory)
                for f in fs)


def test_shape_mismatch_refused_naming_leaf_nothing_touched(saved):
  _garble(saved / "2")  # even a corrupt newer checkpoint stays where it is
  before = _tree_of(saved)
  other = _state(1)
  other["params"]["w"] = jnp.zeros((64, 16), jnp.float32)
  ck = checkpoint.Checkpointer(str(saved), keep=5)
  with pytest.raises(ValueError, match=r"params\.w.*\(64, 32\).*\(64, 16\)"):
    ck.restore_latest(_abstract(other), FINGERPRINT)
  ck.close()
  assert _tree_of(saved) == before and not os.path.exists(str(saved) + ".quarantine")


def test_dtype_mismatch_refused(saved):
  other = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x,
                       _state(1))
  ck = checkpoint.Checkpointer(str(saved), keep=5)
  with pytest.raises(ValueError, match="bfloat16"):
    ck.restore_latest(_abstract(other), FINGERPRINT)
  ck.close()
  assert checkpoint.saved_steps(str(saved)) == [1, 2]


def test_model_field_mismatch_refused_naming_field(saved):
  ck = checkpoint.Checkpointer(str(saved), keep=5)
  with pytest.raises(ValueError, match="model.random.hidden_size.*32.*64"):
    checkpoint.check_compatible(str(saved), dict(FINGERPRINT, **{"model.random.hidden_size": 64}))
  ck.close()
  assert checkpoint.saved_steps(str(saved)) == [1, 2]


def test_restore_errors_are_raised_not_treated_as_corruption(saved, monkeypatch):
  ck = checkpoint.Checkpointer(str(saved), keep=5)

  def oom(*a, **k):
    raise MemoryError("RESOURCE_EXHAUSTED: out of memory")

  monkeypatch.setattr(ck.manager, "restore", oom)
  with pytest.raises(MemoryError):
    ck.restore_latest(_abstract(_state(1)), FINGERPRINT)
  ck.close()
  assert checkpoint.saved_steps(str(saved)) == [1, 2]


def test_every_checkpoint_sealed_after_save(saved):
  for step in (1, 2):
    checkpoint.verify(str(saved / str(step)))  # raises if a file differs from its manifest


def test_no_intact_checkpoint_left_raises_and_touches_nothing(saved):
  _garble(saved / "1")
  _remove_manifest(saved / "2")
  before = _tree_of(saved)
  ck = checkpoint.Checkpointer(str(saved), keep=5)
  with pytest.raises(ValueError, match="no intact checkpoint; .*sha256 differs.*Nothing was touched"):
    ck.restore_latest(_abstract(_state(1)), FINGERPRINT)
  ck.close()
  assert _tree_of(saved) == before


def test_only_unsealed_checkpoints_start_over(saved):
  for step in ("1", "2"):
    _remove_manifest(saved / step)  # killed after each commit, before its seal
  ck = checkpoint.Checkpointer(str(saved), keep=5)
  assert ck.restore_latest(_abstract(_state(1)), FINGERPRINT) is None
  ck.close()
  assert checkpoint.saved_steps(str(saved)) == []
  assert len(os.listdir(str(saved) + ".quarantine")) == 2
