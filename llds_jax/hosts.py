"""Multi-host plumbing: each process owns a contiguous block of every batch's rows.

On a pod slice every host runs the same Python program (SPMD). The rollout is host-side work
(tokenizing, BM25, parsing actions), so each process handles only its rows: it puts them into the
global arrays with `jax.make_array_from_process_local_data` and reads back only its addressable
shards. Everything that decides a jitted call's shapes, or whether the call happens at all, must be
agreed across processes first (`agree_max`), or hosts would run different programs and deadlock.
With one process every helper here reduces to the plain single-host operation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import jax
import numpy as np

from llds_jax import sharding as shd


def split(items: Sequence, num: int | None = None, index: int | None = None) -> Sequence:
  """This process's contiguous share (a slice of `items`); `len(items)` must divide evenly.

  Contiguous (not strided) so that process p's rows are global rows [p·k, (p+1)·k): the global
  batch, its minibatches and every row's sampling key are then the same for any process count.
  """
  num = jax.process_count() if num is None else num
  index = jax.process_index() if index is None else index
  if len(items) % num:
    raise ValueError(f"{len(items)} items do not divide over {num} processes")
  k = len(items) // num
  return items[index * k:(index + 1) * k]


def local_batch_shards(mesh) -> int:
  """Row shards (data × fsdp) held by this process; the batch axes must spread over the hosts."""
  if mesh is None:
    return 1
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if shards % jax.process_count():
    raise ValueError(f"mesh data × fsdp = {shards} row shards cannot be split over "
                     f"{jax.process_count()} processes (make config.mesh.data or fsdp a multiple)")
  return shards // jax.process_count()


def padded_rows(n: int, mesh=None) -> int:
  """This process's rows rounded up to a multiple of its row shards (the extra rows stay idle)."""
  shards = local_batch_shards(mesh)
  return -(-n // shards) * shards


def put_rows(x, mesh=None) -> jax.Array:
  """This process's rows → the global array, rows sharded over the mesh's batch axes."""
  if mesh is None:
    return jax.device_put(x)
  x = np.asarray(x)
  return jax.make_array_from_process_local_data(shd.batch_sharding(mesh, x.ndim), x)


def put_replicated(x, mesh=None) -> jax.Array:
  """The same host value on every process → a replicated global array."""
  return jax.device_put(x, None if mesh is None else shd.replicated(mesh))


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a row-sharded global array, in global row order."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  blocks = {}
  for s in x.addressable_shards:  # replicas (e.g. over `tensor`) repeat a row block: keep one
    start = s.index[0].start or 0
    if start not in blocks:
      blocks[start] = np.asarray(s.data)
  rows = np.concatenate([blocks[k] for k in sorted(blocks)])
  # Rows replicated across processes would make "this process's rows" ambiguous (a jitted
  # function let the compiler pick a replicated output): fail rather than return others' rows.
  if rows.shape[0] * jax.process_count() != x.shape[0]:
    raise ValueError(f"local_rows: array {x.shape} with sharding {x.sharding} is not split by row "
                     f"over the {jax.process_count()} processes")
  return rows


def agree_max(*values: int) -> tuple[int, ...]:
  """Element-wise max of integers over all processes (identity with one process)."""
  if jax.process_count() == 1:
    return tuple(int(v) for v in values)
  from jax.experimental import multihost_utils

  got = multihost_utils.process_allgather(np.asarray(values, np.int64))
  return tuple(int(v) for v in np.max(got.reshape(jax.process_count(), -1), axis=0))


def gather_rows(x: np.ndarray) -> np.ndarray:
  """Concatenate every process's rows (same shape everywhere) in process order."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))


def gather_objects(objs: list) -> list:
  """Concatenate every process's list of JSON-serializable objects in process order."""
  if jax.process_count() == 1:
    return list(objs)
  raw = np.frombuffer(json.dumps(objs).encode(), np.uint8)
  (width,) = agree_max(len(raw))
  padded = np.zeros(width + 8, np.uint8)  # 8-byte length header, then the payload
  padded[:8] = np.frombuffer(np.int64(len(raw)).tobytes(), np.uint8)
  padded[8:8 + len(raw)] = raw
  out = []
  for row in gather_rows(padded[None]):
    size = int(np.frombuffer(row[:8].tobytes(), np.int64)[0])
    out += json.loads(row[8:8 + size].tobytes().decode())
  return out
