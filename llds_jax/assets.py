"""Where the demo assets live (tools/fetch_assets.py writes them; tests and configs read them)."""

import os
from collections.abc import Sequence

QWEN_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
_ASSET_LAYOUT = {
    "qwen_gguf": "models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    "smollm_gguf": "models/smollm2-135m-instruct.q4_1.gguf",
    "wiki_corpus": "data/wiki_summaries/corpus.jsonl",
    "wiki_index": "data/wiki_summaries/bm25_okapi",
    "fanoutqa_train": "data/fanoutqa/train.parquet",
    "fanoutqa_test": "data/fanoutqa/test.parquet",
    "fanoutqa_answerable": "data/fanoutqa/answerable.parquet",
}


def default_asset_dir() -> str:
  """$LLDS_ASSETS, else ~/.cache/llds_jax."""
  home_cache = os.path.join(os.path.expanduser("~"), ".cache", "llds_jax")
  return os.environ.get("LLDS_ASSETS") or home_cache


def asset_paths(dest: str | None = None, *, require: Sequence[str] | None = None) -> dict[str, str]:
  """Absolute paths of the demo assets; missing required ones (default: all) raise with the fix."""
  root = os.path.abspath(dest or default_asset_dir())
  paths = {name: os.path.join(root, rel) for name, rel in _ASSET_LAYOUT.items()}
  unknown = set(require or ()) - set(paths)
  if unknown:
    raise KeyError(f"unknown assets {sorted(unknown)}; known: {sorted(paths)}")
  # An index directory only counts once its meta.json (written last) exists.
  present = lambda n: os.path.exists(os.path.join(paths[n], "meta.json") if n.endswith("_index")
                                     else paths[n])
  missing = [n for n in (paths if require is None else require) if not present(n)]
  if missing:
    raise FileNotFoundError(f"demo assets missing under {root}: {', '.join(missing)}; run "
                            f"`python tools/fetch_assets.py --dest {root}` first")
  return paths
