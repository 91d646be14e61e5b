"""Host-sharding logic of llds_jax/hosts.py, in one process (the two-process run is in test_trainer)."""

import jax
import numpy as np
import pytest

from llds_jax import hosts, sharding


def test_split_is_contiguous_and_must_divide():
  items = list(range(6))
  assert [hosts.split(items, 3, i) for i in range(3)] == [[0, 1], [2, 3], [4, 5]]
  assert hosts.split(items) == items  # one process owns everything
  with pytest.raises(ValueError, match="do not divide over 4"):
    hosts.split(items, 4, 0)


def test_rows_round_trip_through_a_sharded_global_array():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert hosts.padded_rows(5, mesh) == 8 and hosts.padded_rows(8, mesh) == 8
  x = np.arange(16, dtype=np.int32).reshape(8, 2)
  arr = hosts.put_rows(x, mesh)
  assert arr.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_array_equal(hosts.local_rows(arr), x)
  assert hosts.agree_max(3, 7) == (3, 7)
  np.testing.assert_array_equal(hosts.gather_rows(x), x)
  assert hosts.gather_objects([{"a": 1}]) == [{"a": 1}]


def test_local_rows_refuses_rows_replicated_over_processes(monkeypatch):
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  # Pretend the array spans two processes whose devices all hold every row.
  replicated = jax.device_put(np.arange(8), sharding.replicated(mesh))
  monkeypatch.setattr(type(replicated), "is_fully_addressable", property(lambda self: False))
  with pytest.raises(ValueError, match="not split by row"):
    hosts.local_rows(replicated)
