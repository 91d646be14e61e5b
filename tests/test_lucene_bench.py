"""bench/retriever.py --lucene: fails loud without Pyserini or a JDK >= 21; top-10 agreement rules.

No Java runs here: the Pyserini side itself is measured by the bench (bench/RESULTS.md).
"""

import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)
import lucene_compare  # pylint: disable=g-import-not-at-top,wrong-import-position


def run_bench(*args):
  env = {k: v for k, v in os.environ.items() if k != "LLDS_LUCENE_PYTHON"}
  results = os.path.join(BENCH, "RESULTS.md")
  before = open(results, encoding="utf-8").read()
  proc = subprocess.run([sys.executable, os.path.join(BENCH, "retriever.py"), "--lucene", "1000", *args],
                        env=env, capture_output=True, text=True, timeout=120, check=False)
  assert open(results, encoding="utf-8").read() == before  # nothing measured, nothing appended
  return proc


def test_lucene_without_interpreter_prints_setup_and_fails():
  proc = run_bench()
  assert proc.returncode != 0
  assert "no Pyserini interpreter given (--lucene_python or $LLDS_LUCENE_PYTHON)" in proc.stderr
  assert "pip install --no-deps pyserini" in proc.stderr  # how to set it up
  assert "export LLDS_LUCENE_PYTHON=" in proc.stderr


def test_lucene_with_missing_interpreter_names_it(tmp_path):
  missing = str(tmp_path / "no_such_python")
  proc = run_bench("--lucene_python", missing)
  assert proc.returncode != 0
  assert f"--lucene_python {missing} is not an executable file" in proc.stderr
  assert "pip install --no-deps pyserini" in proc.stderr


def fake_jdk(root, name, version):
  home = root / name
  (home / "bin").mkdir(parents=True)
  (home / "bin" / "java").write_text("")
  (home / "release").write_text(f'IMPLEMENTOR="x"\nJAVA_VERSION="{version}"\n')
  return str(home)


def test_java_home_takes_a_jdk_of_at_least_21(tmp_path, monkeypatch):
  monkeypatch.delenv("JAVA_HOME", raising=False)
  monkeypatch.setattr(lucene_compare, "JVM_DIR", str(tmp_path))
  fake_jdk(tmp_path, "java-17", "17.0.9")
  fake_jdk(tmp_path, "java-8", "1.8.0_392")
  with pytest.raises(SystemExit, match="no JDK >= 21"):
    lucene_compare.java_home()
  newest = fake_jdk(tmp_path, "temurin-25", "25.0.1")
  assert lucene_compare.java_home() == newest
  monkeypatch.setenv("JAVA_HOME", fake_jdk(tmp_path, "temurin-21", "21.0.5"))
  assert lucene_compare.java_home() == str(tmp_path / "temurin-21")  # $JAVA_HOME first if ≥ 21


def test_agreement_counts_float32_ties_but_not_other_differences():
  top = [(7, 5.0), (3, 4.0), (9, 2.5), (1, 2.5), (4, 1.0)]
  ours = [top + [(0, 0.0)] * 5,  # padded with score-0 documents: identical
          top,
          [(7, 5.0), (3, 4.0), (1, 2.5000001), (9, 2.5), (4, 1.0)],  # tied pair swapped
          [(7, 5.0), (4, 4.0), (9, 2.5), (1, 2.5), (3, 1.0)]]  # same scores, other documents
  counts = lucene_compare.agreement(ours, [top, top[:4], top, top])
  assert counts == {"queries": 4, "identical": 1, "ties": 1, "differ": 2,
                    "max_rel": pytest.approx(0.1 / 2.5e6, rel=1e-3)}
