"""metrics.jsonl on resume: cut back to the restored step, a torn last line dropped, bad lines named."""

import json
import logging

import pytest

from llds_jax import metrics as mlib


def _write(path, text):
  path.write_text(text)
  return path


def _lines(steps):
  return "".join(json.dumps({"step": s, "reward/mean": 0.5}) + "\n" for s in steps)


def test_resume_truncates_torn_last_line_with_warning(tmp_path, caplog):
  path = _write(tmp_path / "metrics.jsonl", _lines([1, 2]) + '{"step": 3, "rew')
  with caplog.at_level(logging.WARNING):
    mlib.MetricWriter(str(tmp_path), tensorboard=False, resume_step=2).close()
  assert f"{path}:3" in caplog.text and "torn" in caplog.text
  assert [r["step"] for r in mlib.read_metrics(str(path))] == [1, 2]


def test_resume_cuts_back_to_restored_step(tmp_path):
  path = _write(tmp_path / "metrics.jsonl", _lines([1, 2, 3]))
  w = mlib.MetricWriter(str(tmp_path), tensorboard=False, resume_step=1)
  w.write(2, {"reward/mean": 1.0})
  w.close()
  assert [r["step"] for r in mlib.read_metrics(str(path))] == [1, 2]


def test_complete_last_record_without_newline_is_kept(tmp_path):
  path = _write(tmp_path / "metrics.jsonl", _lines([1]) + json.dumps({"step": 2}))
  w = mlib.MetricWriter(str(tmp_path), tensorboard=False, resume_step=2)
  w.write(3, {"reward/mean": 1.0})
  w.close()
  assert [r["step"] for r in mlib.read_metrics(str(path))] == [1, 2, 3]


@pytest.mark.parametrize("bad", ['{"step": 2, "rew\n', '[1, 2]\n', '{"reward/mean": 1}\n'])
def test_malformed_line_before_the_last_names_file_and_line(tmp_path, bad):
  path = _write(tmp_path / "metrics.jsonl", _lines([1]) + bad + _lines([3]))
  with pytest.raises(ValueError, match=f"{path}:2: malformed"):
    mlib.MetricWriter(str(tmp_path), tensorboard=False, resume_step=3)
  assert path.read_text() == _lines([1]) + bad + _lines([3])  # nothing rewritten
