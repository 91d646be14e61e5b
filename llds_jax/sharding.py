"""Device mesh and the one table that maps logical axis names to mesh axes.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel + parameter sharding), `tensor`
(Megatron-style head/mlp/vocab split). Weights declare logical axes (`model.py`); activations are
constrained only at a few named points (`constrain`: the model's residual stream, the batch of the
train step and the sampler).

`constrain` reads the mesh from context (`jax.set_mesh`) while tracing, so the model needs no mesh
argument and stays mesh-free on one device. Jitted callers activate it with `OnMesh`, around both
calls and `lower` (jit's cache is keyed on the context mesh, so the two never share a trace).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of mesh axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("length", None),
    ("act_embed", None),  # the residual stream's D: whole on every device, rows split instead
)

# The rollout's copy of the weights: `embed` whole, so each data/fsdp shard holds its tensor slice
# of every weight. The sampler's rows stay split over (data, fsdp), and decode then reads local
# weights for each token instead of all-gathering every layer (what the training layout costs).
TENSOR_ONLY_RULES = tuple((name, None if name == "embed" else axes) for name, axes in DEFAULT_RULES)

# config.rollout.weight_sharding -> the rules of the rollout's copy of the weights.
WEIGHT_LAYOUTS = {"tensor": TENSOR_ONLY_RULES, "train": DEFAULT_RULES}


def make_mesh(shape: dict | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one entry may be -1 to take the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = dict(shape or {"data": -1, "fsdp": 1, "tensor": 1})
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh: unknown axes {sorted(unknown)}; expected {MESH_AXES}")
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {shape}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {shape}: {len(devices)} devices not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"have {len(devices)}")
  try:  # topology-aware device order on real TPU slices
    dev_array = jax.experimental.mesh_utils.create_device_mesh(sizes, devices)
  except Exception:  # noqa: BLE001  (CPU / odd shapes: plain order is fine)
    dev_array = np.asarray(devices).reshape(sizes)
  return Mesh(dev_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules=DEFAULT_RULES) -> P:
  """PartitionSpec for an array with these logical axes.

  A mesh axis is dropped (the dim replicated) when it does not divide the dim, e.g. 2 KV heads
  on tensor=4, and a mesh axis is never used twice in one spec.
  """
  if axes is None:
    return P()
  if len(axes) != len(shape):
    raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(axes, shape):
    if name is not None and name not in table:
      raise ValueError(f"logical axis {name!r} has no sharding rule")
    target = table.get(name) if name else None
    mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
    kept = []
    for ax in mesh_axes:
      size = mesh.shape[ax]
      if ax in used or size == 1 or dim % (math.prod(mesh.shape[a] for a in kept) * size):
        continue
      kept.append(ax)
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*spec)


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def state_shardings(state, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for an nnx State (concrete or abstract) from each Variable's logical axes."""

  def one(v):
    value = v.get_raw_value() if hasattr(v, "get_raw_value") else v.value
    axes = v.get_metadata().get("logical_axes")
    return v.replace(NamedSharding(mesh, logical_to_spec(axes, value.shape, mesh, rules)))

  return jax.tree.map(one, state, is_leaf=_is_var)


def init_sharded(make_model: Callable[[], nnx.Module], mesh: Mesh, rules=DEFAULT_RULES):
  """Build a module whose parameters are created directly in their shards (no full replica)."""
  abstract = nnx.eval_shape(make_model)
  graphdef, abs_state = nnx.split(abstract)
  shardings = state_shardings(abs_state, mesh, rules)
  state = jax.jit(lambda: nnx.split(make_model())[1], out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Rows over (data, fsdp), everything else replicated."""
  return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def constrain(x: jax.Array, axes: Sequence[str | None], rules=DEFAULT_RULES) -> jax.Array:
  """Pin an activation to the layout its logical axes give on the active mesh; no mesh: no-op.

  Without it the partitioner lets the embedding table's `embed -> fsdp` layout flow into the
  residual stream: every device then holds all rows with a slice of D and all-reduces full-batch
  activations. Axes that do not divide (e.g. a 1-row call on 8 row shards) are replicated.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh, rules))


def local_shape(shape: Sequence[int], axes: Sequence[str | None],
                rules=DEFAULT_RULES) -> tuple[int, ...]:
  """One device's block of an array with these logical axes on the active mesh (no mesh: all).

  For code that sizes its own work by what a device holds (attention's query blocks, the
  log-prob kernel's row partial sums) while tracing under `jit`, where shapes are global.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return tuple(shape)
  spec = logical_to_spec(axes, shape, mesh, rules)
  out = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (entry,) if isinstance(entry, str) else tuple(entry or ())
    out.append(dim // math.prod(mesh.shape[a] for a in names))
  return tuple(out)


def mesh_of(tree) -> Mesh | None:
  """The mesh of the first leaf placed by a NamedSharding (arrays or ShapeDtypeStructs), if any."""
  for leaf in jax.tree.leaves(tree):
    s = getattr(leaf, "sharding", None)
    if isinstance(s, NamedSharding) and isinstance(s.mesh, Mesh):
      return s.mesh
  return None


class OnMesh:
  """A jitted function that is called and lowered with a mesh active, so `constrain` applies.

  `mesh=None` takes the mesh from the arguments (`mesh_of`): a call on unsharded arrays then
  traces without a mesh, exactly as before.
  """

  def __init__(self, jitted, mesh: Mesh | None = None):
    self._jitted, self._mesh = jitted, mesh
    functools.update_wrapper(self, jitted, updated=())

  def _context(self, args, kwargs):
    mesh = self._mesh if self._mesh is not None else mesh_of((args, kwargs))
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)

  def __call__(self, *args, **kwargs):
    with self._context(args, kwargs):
      return self._jitted(*args, **kwargs)

  def lower(self, *args, **kwargs):
    with self._context(args, kwargs):
      return self._jitted.lower(*args, **kwargs)
