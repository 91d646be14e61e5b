"""The retrieval corpus: Search-R1 jsonl rows in, (id, contents) pairs out.

Corpus rows are `{"id": ..., "contents": "\\"Title\\"\\ntext"}` (DESIGN.md §Retrieval). The index
keeps the documents in its own compressed passage store (passage_store.py).
"""

from collections.abc import Iterator

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
