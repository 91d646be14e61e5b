"""The retrieval corpus: Search-R1 jsonl in, document id/contents blobs out.

Corpus rows are `{"id": ..., "contents": "\\"Title\\"\\ntext"}` (DESIGN.md §Retrieval). The index
(retriever.py) keeps its documents in a `DocStore`: utf-8 blobs plus int64 offsets, memory-mapped
when loaded, so a large corpus costs page cache rather than Python objects.
"""

import array
import io
import os
from collections.abc import Iterator

import numpy as np

from llds_jax.file_io import iter_jsonl


def read_corpus(path: str) -> Iterator[tuple[str, str]]:
  """Streams (id, contents) from a Search-R1 corpus jsonl; bad rows raise naming file and line.

  Duplicate ids raise too: a retrieved passage must name one document.
  """
  seen = {}
  for line_no, row in iter_jsonl(path):
    if not isinstance(row, dict) or "contents" not in row:
      raise ValueError(f"{path}:{line_no}: row has no 'contents' field")
    if not isinstance(row["contents"], str):
      raise ValueError(f"{path}:{line_no}: 'contents' is {type(row['contents']).__name__}, not str")
    # A missing id falls back to the 0-based line number (Search-R1 corpora always have one).
    doc_id = str(row.get("id", line_no - 1))
    first = seen.setdefault(doc_id, line_no)
    if first != line_no:
      raise ValueError(f"{path}:{line_no}: duplicate document id {doc_id!r} (first at line {first})")
    yield doc_id, row["contents"]


class DocStore:
  """Document ids and contents as utf-8 blobs + int64 offsets; memory-mapped when loaded from disk."""
  NAMES = ("ids", "contents")

  def __init__(self, blobs: dict, offsets: dict):
    self._blobs, self._offsets = blobs, offsets

  def __len__(self) -> int:
    return len(self._offsets["ids"]) - 1

  def _get(self, name: str, i: int) -> str:
    lo, hi = self._offsets[name][i], self._offsets[name][i + 1]
    return bytes(self._blobs[name][lo:hi]).decode("utf-8")

  def get(self, i: int) -> tuple[str, str]:
    """(id, contents) of document i."""
    return self._get("ids", i), self._get("contents", i)

  def save(self, out_dir: str):
    """Writes the blobs and offsets into `out_dir`."""
    for name in self.NAMES:
      with open(os.path.join(out_dir, f"doc_{name}.bin"), "wb") as f:
        f.write(memoryview(np.ascontiguousarray(self._blobs[name])))
      np.save(os.path.join(out_dir, f"doc_{name}_offsets.npy"), np.asarray(self._offsets[name]))

  @classmethod
  def load(cls, index_dir: str, mmap: bool = True) -> "DocStore":
    """Opens the store saved in `index_dir` (memory-mapped unless `mmap=False`)."""
    blobs, offsets = {}, {}
    for name in cls.NAMES:
      path = os.path.join(index_dir, f"doc_{name}.bin")
      # np.memmap refuses empty files (all strings empty), so those are read instead.
      use_mmap = mmap and os.path.getsize(path)
      blobs[name] = np.memmap(path, np.uint8, mode="r") if use_mmap else np.fromfile(path, np.uint8)
      offsets[name] = np.load(path.replace(".bin", "_offsets.npy"), mmap_mode="r" if mmap else None)
    return cls(blobs, offsets)


class DocStoreWriter:
  """Streams documents into a DocStore: files in `out_dir` (text never held in memory), or memory."""

  def __init__(self, out_dir: str | None = None):
    self.out_dir = out_dir
    self._files = {n: open(os.path.join(out_dir, f"doc_{n}.bin"), "wb") if out_dir else io.BytesIO()
                   for n in DocStore.NAMES}
    self._offsets = {n: array.array("q", [0]) for n in DocStore.NAMES}

  def add(self, doc_id: str, contents: str):
    """Appends one document."""
    for name, value in (("ids", doc_id), ("contents", contents)):
      written = self._files[name].write(value.encode("utf-8"))
      self._offsets[name].append(self._offsets[name][-1] + written)

  def close(self) -> DocStore:
    """Finishes writing and returns the store (memory-mapped when written to disk)."""
    offsets = {n: np.asarray(o) for n, o in self._offsets.items()}
    if self.out_dir is None:
      blobs = {n: np.frombuffer(f.getvalue(), np.uint8) for n, f in self._files.items()}
      return DocStore(blobs, offsets)
    for name, f in self._files.items():
      f.close()
      np.save(os.path.join(self.out_dir, f"doc_{name}_offsets.npy"), offsets[name])
    return DocStore.load(self.out_dir)
