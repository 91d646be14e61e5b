"""`bench/retriever.py --lucene`: ours vs Pyserini (Lucene) on the same passages and questions.

For each size: the `--scaling` passages and the 1,788 FanOutQA questions, top-10, k1 = 0.9, b = 0.4.
Three indexes are built, each by its own process (build wall time and that process's peak RSS):
ours (tools/build_index.py --variant lucene, which reproduces Lucene's BM25Similarity), Lucene with
Anserini's default analyzer (what Search-R1's Pyserini retriever uses) and Lucene over OUR tokens
(pre-tokenized, whitespace analyzer). Query rates are queries per CPU-second of the searching
process, one search thread. Ours and the pre-tokenized Lucene index must return the same top-10
lists up to float32 ties (Lucene adds float32 terms, we add float64 ones).

Pyserini is not a dependency of llds_jax: the Lucene side (bench/lucene_worker.py) runs in the
interpreter given by --lucene_python or $LLDS_LUCENE_PYTHON, with a JDK >= 21 as JAVA_HOME.
"""

import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llds_jax import retriever  # pylint: disable=g-import-not-at-top,wrong-import-position

K, K1, B = 10, 0.9, 0.4
HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "lucene_worker.py")
JVM_DIR = "/usr/lib/jvm"
SETUP = """\
Set up a separate interpreter with Pyserini (never in llds_jax's own environment):
  python3 -m venv /tmp/lucene_venv
  /tmp/lucene_venv/bin/pip install --no-deps pyserini==1.6.0
  /tmp/lucene_venv/bin/pip install pyjnius numpy scipy tqdm pandas
  export LLDS_LUCENE_PYTHON=/tmp/lucene_venv/bin/python   # or pass --lucene_python
and a JDK >= 21 under /usr/lib/jvm or in $JAVA_HOME (e.g. Temurin 21 or 25)."""


def lucene_python(path: str | None) -> str:
  """The Pyserini interpreter, checked to import pyserini.pyclass; exits with SETUP otherwise."""
  path = path or os.environ.get("LLDS_LUCENE_PYTHON")
  if not path:
    raise SystemExit("bench/retriever.py --lucene: no Pyserini interpreter given (--lucene_python "
                     f"or $LLDS_LUCENE_PYTHON).\n{SETUP}")
  if not (os.path.isfile(path) and os.access(path, os.X_OK)):
    raise SystemExit(f"bench/retriever.py --lucene: --lucene_python {path} is not an executable "
                     f"file.\n{SETUP}")
  return path


def java_version(home: str) -> int:
  """Major version from the JDK's `release` file (JAVA_VERSION="25.0.1"), 0 if unreadable."""
  try:
    with open(os.path.join(home, "release"), encoding="utf-8") as f:
      found = re.search(r'^JAVA_VERSION="(?:1\.)?(\d+)', f.read(), re.M)
  except OSError:
    return 0
  return int(found.group(1)) if found and os.path.isfile(os.path.join(home, "bin", "java")) else 0


def java_home() -> str:
  """$JAVA_HOME if it is a JDK >= 21 (Anserini 1.x needs 21), else the newest one under JVM_DIR."""
  homes = [os.environ["JAVA_HOME"]] if os.environ.get("JAVA_HOME") else []
  homes += sorted(glob.glob(os.path.join(JVM_DIR, "*")), key=java_version, reverse=True)
  for home in homes:
    if java_version(home) >= 21:
      return home
  raise SystemExit(f"bench/retriever.py --lucene: no JDK >= 21 in $JAVA_HOME or {JVM_DIR} "
                   f"(found {[f'{h}: {java_version(h)}' for h in homes]}).\n{SETUP}")


def check_interpreter(python: str, env: dict) -> None:
  probe = subprocess.run([python, "-c", "import pyserini.pyclass"], env=env, capture_output=True,
                         text=True, check=False)
  if probe.returncode:
    raise SystemExit(f"bench/retriever.py --lucene: {python} cannot import pyserini.pyclass:\n"
                     f"{probe.stderr[-2000:]}\n{SETUP}")


def measured(cmd: list[str], log: str, env: dict | None = None) -> tuple[float, float]:
  """Runs cmd to completion; wall seconds and peak RSS (MiB) of that process alone (wait4)."""
  with open(log, "w", encoding="utf-8") as out:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
  proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keeps Popen from waiting again
  if proc.returncode:
    with open(log, encoding="utf-8") as f:
      tail = f.read()[-3000:]
    raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); log {log}:\n{tail}")
  return wall, usage.ru_maxrss / 1024


def dir_mib(path: str) -> float:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 2**20


def write_pretokenized(src: str, dst: str) -> None:
  """The corpus as our analyzer's tokens joined by spaces, for Lucene's whitespace analyzer."""
  with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as out:
    for line in f:
      row = json.loads(line)
      out.write(json.dumps({"id": row["id"], "contents": " ".join(retriever.tokenize(row["contents"]))})
                + "\n")


def lucene_search(python: str, env: dict, index: str, queries: list[str], tmp: str,
                  pretokenized: bool) -> tuple[float, list]:
  qfile, hfile = os.path.join(tmp, "queries.json"), os.path.join(tmp, "hits.json")
  with open(qfile, "w", encoding="utf-8") as f:
    json.dump(queries, f)
  measured([python, WORKER, "search", "--index", index, "--queries", qfile, "--out", hfile,
            "--k", str(K), "--k1", str(K1), "--b", str(B)] + (["--pretokenized"] if pretokenized else []),
           os.path.join(tmp, "search.log"), env)
  with open(hfile, encoding="utf-8") as f:
    out = json.load(f)
  # write_passages gives row i the id str(i), so a Lucene id is our document index.
  return len(queries) / out["cpu_s"], [[(int(d), s) for d, s in h] for h in out["hits"]]


def agreement(ours: list, theirs: list) -> dict:
  """Top-10 lists equal, or equal up to float32 ties: same scores (rtol 1e-5) position by position,
  and every position whose id differs holds a score tied with a neighbour (or is the k-th, tied
  with a document just outside the list)."""
  counts = {"queries": len(ours), "identical": 0, "ties": 0, "differ": 0, "max_rel": 0.0}
  for mine, lucene in zip(ours, theirs):
    mine = [(d, s) for d, s in mine if s > 0]  # ours pads a short list with score-0 documents
    if len(mine) != len(lucene):
      counts["differ"] += 1
      continue
    s_mine, s_luc = np.array([s for _, s in mine]), np.array([s for _, s in lucene])
    if mine:
      counts["max_rel"] = max(counts["max_rel"], float(np.max(np.abs(s_mine - s_luc) / s_luc)))
    if [d for d, _ in mine] == [d for d, _ in lucene]:
      counts["identical"] += 1
      continue
    tol = 1e-5 * s_luc  # Lucene sums ~10 float32 terms: relative error well below 1e-5

    def tied(j):
      return j == K - 1 or any(abs(s_luc[j] - s_luc[i]) <= tol[j] for i in (j - 1, j + 1)
                               if 0 <= i < len(lucene))

    if (np.allclose(s_mine, s_luc, rtol=1e-5, atol=0)
        and all(tied(j) for j in range(len(mine)) if mine[j][0] != lucene[j][0])):
      counts["ties"] += 1
    else:
      counts["differ"] += 1
  return counts


def compare_size(n: int, python: str, env: dict, questions: list[str], write_passages, tmp: str):
  row = {"n": n}
  raw_dir, tok_dir = os.path.join(tmp, "raw"), os.path.join(tmp, "tok")
  os.makedirs(raw_dir)
  os.makedirs(tok_dir)
  corpus = os.path.join(raw_dir, "corpus.jsonl")
  write_passages(corpus, n)
  write_pretokenized(corpus, os.path.join(tok_dir, "corpus.jsonl"))

  ours_dir = os.path.join(tmp, "ours")
  tool = os.path.join(os.path.dirname(HERE), "tools", "build_index.py")
  row["ours_build_s"], row["ours_rss"] = measured(
      [sys.executable, tool, "--corpus", corpus, "--out", ours_dir, "--variant", "lucene", "--k1",
       str(K1), "--b", str(B), "--quiet"], os.path.join(tmp, "ours.log"))
  row["ours_mib"] = dir_mib(ours_dir)
  index = retriever.BM25Index.load(ours_dir)
  index.search(questions, K)  # steady state: pages in, common terms decoded (Lucene: JIT compiled)
  start = time.process_time()
  ours_hits = index.search(questions, K)
  row["ours_qpcs"] = len(questions) / (time.process_time() - start)
  del index

  for name, src, pretok, queries in (
      ("lucene", raw_dir, False, questions),
      ("pretok", tok_dir, True, [" ".join(retriever.tokenize(q)) for q in questions])):
    out = os.path.join(tmp, name)
    row[f"{name}_build_s"], row[f"{name}_rss"] = measured(
        [python, WORKER, "index", "--input", src, "--index", out] + (["--pretokenized"] if pretok else []),
        os.path.join(tmp, f"{name}.log"), env)
    row[f"{name}_mib"] = dir_mib(out)
    row[f"{name}_qpcs"], hits = lucene_search(python, env, out, queries, tmp, pretok)
    if pretok:
      row["agree"] = agreement(ours_hits, hits)
  os.remove(corpus)
  print(row, flush=True)
  return row


def table(rows: list[dict], command: str, machine: str) -> list[str]:
  n_questions = rows[0]["agree"]["queries"]
  lines = [f"`{command}` on {machine}. Passages as `--scaling` (a random summary title + 100 words "
           f"of real summary sentences); the {n_questions:,} FanOutQA questions; top-10, k1 = 0.9, b = 0.4. "
           "q/CPU-s: queries per CPU-second of the searching process, one search thread, after one "
           "untimed pass over the same questions (ours: pruned search of a `--variant lucene` index; Lucene: "
           "IndexSearcher + BM25Similarity over Anserini's bag-of-words query, whole-JVM CPU). "
           "Build: each index by its own process (Anserini IndexCollection, 1 thread, -storeRaw; "
           "JVM default heap), wall s and that process's peak RSS. Sizes are whole index "
           "directories, passage text included.\n",
           "| passages | system | build s | build peak RSS MiB | index on disk MiB | q/CPU-s |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    for key, name in (("ours", "ours (`lucene` variant)"), ("lucene", "Lucene, Anserini default analyzer"),
                      ("pretok", "Lucene, our tokens (pretokenized)")):
      lines.append(f"| {r['n']:,} | {name} | {r[f'{key}_build_s']:.1f} | {r[f'{key}_rss']:,.0f} | "
                   f"{r[f'{key}_mib']:,.0f} | {r[f'{key}_qpcs']:,.0f} |")
  lines.append("")
  for r in rows:
    a = r["agree"]
    lines.append(f"Top-10 agreement at {r['n']:,} passages, ours vs Lucene over our tokens: "
                 f"{a['identical']:,} of {a['queries']:,} lists identical, {a['ties']} more equal up "
                 f"to float32 ties, {a['differ']} differ; largest relative score difference "
                 f"{a['max_rel']:.1e}.")
  return lines


def main(sizes: list[int], python_arg: str | None, questions: list[str], write_passages,
         machine, results_path: str) -> None:
  python = lucene_python(python_arg)
  env = dict(os.environ, JAVA_HOME=java_home())
  check_interpreter(python, env)
  rows = []
  for n in sizes:
    with tempfile.TemporaryDirectory() as tmp:
      rows.append(compare_size(n, python, env, questions, write_passages, tmp))
  command = f"python bench/retriever.py --lucene {','.join(map(str, sizes))}"
  lines = ["", f"## Ours vs Lucene (Pyserini) — {time.strftime('%Y-%m-%d')}", ""]
  lines += table(rows, command, machine())
  with open(results_path, "a", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
