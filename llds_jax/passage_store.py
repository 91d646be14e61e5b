"""Compressed document store: passages in zlib blocks of ~BLOCK_BYTES, memory-mapped, random access.

Dims: N documents, B blocks. A block holds consecutive documents; uncompressed it is a uint32
header [n, |id_0|…|id_n−1|, |contents_0|…|contents_n−1|] followed by the ids' and the contents'
utf-8 bytes. Files: passages.bin (the compressed blocks back to back), passages_offsets.npy (int64
[B+1] byte offsets) and passages_first.npy (int64 [B+1] first document of each block, then N).
Reading one passage inflates its block (~0.1 ms for 32 KiB); the last block read is cached, so
the top-k of one query, often in different blocks, costs at most k inflations.
"""

import io
import os
import zlib

import numpy as np

BLOCK_BYTES = 1 << 15  # uncompressed bytes per block: 2.5× smaller than raw text at zlib level 6
LEVEL = 6
FILES = ("passages.bin", "passages_offsets.npy", "passages_first.npy")


def _pack(ids: list[bytes], contents: list[bytes]) -> bytes:
  header = np.array([len(ids)] + [len(x) for x in ids] + [len(x) for x in contents], "<u4")
  return zlib.compress(header.tobytes() + b"".join(ids) + b"".join(contents), LEVEL)


class PassageStore:
  """Read side: `get(i)` → (id, contents)."""

  def __init__(self, blob: np.ndarray, offsets_B1: np.ndarray, first_B1: np.ndarray):
    self._blob = blob
    self._offsets_B1, self._first_B1 = np.asarray(offsets_B1), np.asarray(first_B1)
    self._cached = (-1, None)  # (block, its decoded (ids, contents)); replaced as a whole

  def __len__(self) -> int:
    return int(self._first_B1[-1])

  def _block(self, b: int) -> tuple[list[str], list[str]]:
    cached_b, docs = self._cached
    if cached_b == b:
      return docs
    raw = zlib.decompress(bytes(self._blob[self._offsets_B1[b]:self._offsets_B1[b + 1]]))
    n = int(np.frombuffer(raw, "<u4", 1)[0])
    lens = np.frombuffer(raw, "<u4", 2 * n, 4).astype(np.int64)
    ends = 4 * (1 + 2 * n) + np.cumsum(lens)
    starts = ends - lens
    text = [raw[s:e].decode("utf-8") for s, e in zip(starts.tolist(), ends.tolist())]
    docs = (text[:n], text[n:])
    self._cached = (b, docs)
    return docs

  def get(self, i: int) -> tuple[str, str]:
    """(id, contents) of document i."""
    if not 0 <= i < len(self):
      raise IndexError(f"document {i} out of range [0, {len(self)})")
    b = int(np.searchsorted(self._first_B1, i, "right")) - 1
    ids, contents = self._block(b)
    j = i - int(self._first_B1[b])
    return ids[j], contents[j]

  @classmethod
  def load(cls, index_dir: str, mmap: bool = True) -> "PassageStore":
    path = os.path.join(index_dir, FILES[0])
    # np.memmap refuses empty files (a store of zero blocks), so those are read instead.
    blob = (np.memmap(path, np.uint8, mode="r") if mmap and os.path.getsize(path) else
            np.fromfile(path, np.uint8))
    mode = "r" if mmap else None
    return cls(blob, np.load(os.path.join(index_dir, FILES[1]), mmap_mode=mode),
               np.load(os.path.join(index_dir, FILES[2]), mmap_mode=mode))

  def save(self, out_dir: str):
    with open(os.path.join(out_dir, FILES[0]), "wb") as f:
      f.write(memoryview(np.ascontiguousarray(self._blob)))
    np.save(os.path.join(out_dir, FILES[1]), self._offsets_B1)
    np.save(os.path.join(out_dir, FILES[2]), self._first_B1)


class PassageStoreWriter:
  """Streams documents into a PassageStore: compressed blocks to `out_dir`, or to memory."""

  def __init__(self, out_dir: str | None = None):
    self.out_dir = out_dir
    self._file = open(os.path.join(out_dir, FILES[0]), "wb") if out_dir else io.BytesIO()
    self._ids, self._contents, self._pending = [], [], 0
    self._offsets, self._first, self._n = [0], [0], 0

  def add(self, doc_id: str, contents: str):
    """Appends one document."""
    self._ids.append(doc_id.encode("utf-8"))
    self._contents.append(contents.encode("utf-8"))
    self._pending += len(self._ids[-1]) + len(self._contents[-1])
    self._n += 1
    if self._pending >= BLOCK_BYTES:
      self._flush()

  def _flush(self):
    if self._ids:
      self._offsets.append(self._offsets[-1] + self._file.write(_pack(self._ids, self._contents)))
      self._first.append(self._n)
      self._ids, self._contents, self._pending = [], [], 0

  def close(self) -> PassageStore:
    """Finishes writing and returns the store (memory-mapped when written to disk)."""
    self._flush()
    offsets, first = np.array(self._offsets, np.int64), np.array(self._first, np.int64)
    if self.out_dir is None:
      return PassageStore(np.frombuffer(self._file.getvalue(), np.uint8), offsets, first)
    self._file.close()
    np.save(os.path.join(self.out_dir, FILES[1]), offsets)
    np.save(os.path.join(self.out_dir, FILES[2]), first)
    return PassageStore.load(self.out_dir)
