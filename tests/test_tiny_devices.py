"""README command 1 (configs/tiny.py) on the 8 simulated devices, as on a v5e-8 / v6e-8 VM."""

import logging
import os
import sys

import jax
import pytest

from llds_jax import metrics as mlib
from llds_jax import config_check, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny():
  sys.path.insert(0, ROOT)
  from configs import tiny
  return tiny.get_config()


@pytest.mark.parametrize("devices", [1, 2, 4, 8])
def test_tiny_sizes_fit_any_row_shard_count(devices, tmp_path):
  # On an n-device host the default mesh (data=-1) has n row shards; here the other 8/n devices go
  # to the tensor axis, which leaves the row arithmetic of an n-device host.
  c = _tiny()
  c.workdir = str(tmp_path)
  c.mesh.update(data=devices, fsdp=1, tensor=8 // devices)
  config_check.validate(c)


def test_tiny_config_trains_end_to_end_on_8_devices(tmp_path, caplog):
  assert jax.device_count() == 8
  c = _tiny()
  c.workdir = str(tmp_path)
  # Only the length is cut (warm-up steps, training steps, no validation pass: its other batch
  # size compiles the sampler again); every size is the file's own.
  c.model.format_warmup_steps = 2
  c.total_steps = 1
  c.log.eval_every = 0
  c.log.progress = False
  caplog.set_level(logging.INFO, logger="llds_jax")
  records = trainer.train(c)
  assert [r["step"] for r in records] == [1]
  for key in mlib.REQUIRED_KEYS:
    assert key in records[0], key
  assert records[0]["skipped_nonfinite"] == 0
  assert os.listdir(tmp_path / "checkpoints") == ["1"]
  assert os.listdir(tmp_path / "plots")
  # The user-facing notes are INFO lines, not warnings (main.py shows llds_jax at INFO).
  notes = {r.getMessage().split(":")[0].split(" ")[0]: r.levelno for r in caplog.records
           if r.name == "llds_jax.trainer"}
  assert notes == {"format": logging.INFO, "wrote": logging.INFO}, notes
