"""What a user sees at start-up: no torch notice from transformers, our notes as INFO lines."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}
  env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                        env=env, timeout=120)


def test_transformers_torch_notice_is_silenced():
  # torch hidden as on a user's machine without it; the bare import shows the notice (control).
  hide = "import sys; sys.modules['torch'] = None; "
  bare = _python(hide + "import transformers")
  assert bare.returncode == 0 and "PyTorch was not found" in bare.stderr
  ours = _python(hide + "import llds_jax, transformers; "
                 "transformers.logging.get_logger('transformers').warning('other warnings still show')")
  assert ours.returncode == 0, ours.stderr
  assert "PyTorch was not found" not in ours.stderr
  assert "other warnings still show" in ours.stderr


def test_progress_notes_are_info_lines_libraries_stay_quiet():
  code = """
import logging
from absl import app
from llds_jax import main

def run(argv):
  main.setup_logging()
  logging.getLogger("llds_jax.trainer").info("wrote %d plots", 8)
  logging.getLogger("orbax").info("library chatter")
app.run(run)
"""
  out = _python(code)
  assert out.returncode == 0, out.stderr
  lines = [ln for ln in out.stderr.splitlines() if "wrote 8 plots" in ln]
  assert len(lines) == 1 and lines[0].startswith("I"), out.stderr
  assert "library chatter" not in out.stderr
