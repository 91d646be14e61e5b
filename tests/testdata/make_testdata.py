"""Regenerates the real-text fixtures from the fetched demo assets (run `tools/fetch_assets.py` first).

  python tests/testdata/make_testdata.py [--dest ASSET_DIR]

Writes, next to this file:
  wiki_sample.jsonl            300 Search-R1 corpus rows: the 66 gold pages of the 83 answerable FanOutQA
                               sub-questions plus evenly spaced other summaries, in corpus order, with
                               their corpus ids (CC BY-SA 4.0, see ATTRIBUTION.txt).
  fanoutqa_answerable.parquet  the 83 answerable sub-questions (Search-R1 parquet; CC BY-SA 4.0).
The outputs are committed; this script only documents and reproduces them.
"""

import argparse
import json
import os
import shutil
import sys

import numpy as np
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from llds_jax import assets  # pylint: disable=g-import-not-at-top,wrong-import-position

NUM_DOCS = 300


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--dest", default=None, help="asset root given to tools/fetch_assets.py")
  args = parser.parse_args()
  paths = assets.asset_paths(args.dest, require=("wiki_corpus", "fanoutqa_answerable"))
  with open(paths["wiki_corpus"], encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  table = pq.read_table(paths["fanoutqa_answerable"]).to_pylist()
  gold_titles = {f'"{r["extra_info"]["evidence_title"]}"' for r in table}
  keep = {i for i, r in enumerate(rows) if r["contents"].split("\n", 1)[0] in gold_titles}
  if len(keep) != len(gold_titles):
    raise SystemExit(f"found {len(keep)} of {len(gold_titles)} gold pages in {paths['wiki_corpus']}")
  others = [i for i in range(len(rows)) if i not in keep]
  picks = np.linspace(0, len(others) - 1, NUM_DOCS - len(keep)).round().astype(int)
  keep.update(others[p] for p in picks)
  with open(os.path.join(HERE, "wiki_sample.jsonl"), "w", encoding="utf-8") as f:
    for i in sorted(keep):
      f.write(json.dumps(rows[i], ensure_ascii=False) + "\n")
  shutil.copy(paths["fanoutqa_answerable"], os.path.join(HERE, "fanoutqa_answerable.parquet"))
  print(f"wrote {len(keep)} docs and {len(table)} questions to {HERE}")


if __name__ == "__main__":
  main()
