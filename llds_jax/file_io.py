"""Reading files loudly: jsonl values with file:line errors, and sha256 digests.

Shared by the corpus reader (corpus.py), the metrics reader (metrics.py), the checkpoint checksums
(checkpoint.py) and the asset downloads (tools/fetch_assets.py).
"""

import hashlib
import json
from collections.abc import Iterator
from typing import Any


def iter_jsonl(path: str) -> Iterator[tuple[int, Any]]:
  """(1-based line number, value) per non-blank line; invalid JSON raises naming file and line."""
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{line_no}: not UTF-8 (byte {raw[e.start]:#04x} at column "
                         f"{e.start + 1})") from None
      if not line.strip():
        continue
      try:
        yield line_no, json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_no}: invalid JSON: {e.msg} (column {e.colno})") from None


def file_sha256(path: str) -> str:
  """Hex sha256 of a file, read in 16 MiB blocks (assets, checkpoint manifests)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
      h.update(block)
  return h.hexdigest()
