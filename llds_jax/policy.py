"""The policy a run trains or evaluates: its architecture, weights and tokenizer, and the rollout's
compute-dtype copy of its weights.

One home for "which model, which tokenizer": the trainer, `restore.load_run`, tools/evaluate.py,
tools/dry_run.py and tools/real_run.py all come through `model_config` / `load`, so the run
config's dtype and remat overrides and the tokenizer rule (`tokenizer_check.policy_tokenizer`) are
written once.
"""

from __future__ import annotations

import jax
from flax import nnx

from llds_jax import hf_io, sharding as shd, tokenizer_check
from llds_jax.model import Transformer, compute_dtype_of
from llds_jax.model_config import ModelConfig


def _overrides(c, *, dtype: str | None = None, remat: str | None = None) -> dict:
  """ModelConfig fields the run config sets on top of the architecture's own config.json.

  For the hf_io loaders `dtype` sets compute and storage dtype; `param_dtype` then overrides
  storage. `attn_chunk` is passed only where a config sets it (the model's default otherwise).
  """
  out = dict(param_dtype=c.model.param_dtype, dtype=dtype or c.model.dtype,
             remat=remat or c.model.remat,
             scan_layers=c.model.get("scan_layers", ModelConfig.scan_layers),
             scan_cache=c.model.get("scan_cache", ModelConfig.scan_cache))
  if "attn_chunk" in c.model:
    out["attn_chunk"] = c.model.attn_chunk
  return out


def model_config(c, *, path: str | None = None, dtype: str | None = None,
                 remat: str | None = None) -> ModelConfig:
  """The architecture without reading weights: `path` (default `model.path`)/config.json, a
  GGUF's header (its weights are read and dropped), or `model.random` when the path is empty."""
  path = c.model.path if path is None else path
  kw = _overrides(c, dtype=dtype, remat=remat)
  if path.endswith(".gguf"):
    return hf_io.load_gguf(path, **kw)[1]
  if path:
    return hf_io.read_config(path, **kw)
  if "random" not in c.model:
    raise ValueError("config has neither model.path nor model.random: cannot build the model")
  return ModelConfig.from_hf(c.model.random.to_dict(), **kw)


def load(c, mesh=None, *, path: str | None = None, dtype: str | None = None,
         remat: str | None = None, weights: bool = True,
         field: str = "config.model.tokenizer"):
  """(model, cfg, tokenizer) of the config's policy, or of the weights at `path` instead.

  The model is the HF directory or GGUF file at `model.path`, or the random init of
  `model.random` (seed `config.seed`), placed by the logical-axis rules on `mesh`. With
  `weights=False` the model is None (a GGUF is still read: its architecture and tokenizer live
  beside the weights). The tokenizer is the model's own unless `model.tokenizer` names one; a
  different one than the model carries is refused unless `model.allow_tokenizer_mismatch`.
  Weights given by `path` (another source than the config's model) bring their own tokenizer when
  they carry one, else take `model.tokenizer`, and the config's mismatch override does not apply.
  `field` names the tokenizer setting in error messages.
  """
  own = path is None
  path = c.model.path if own else path
  kw = _overrides(c, dtype=dtype, remat=remat)
  model, carried = None, None
  if path.endswith(".gguf"):
    model, cfg, carried = hf_io.load_gguf(path, mesh=mesh, **kw)
  elif path and weights:
    model, cfg = hf_io.load_pretrained(path, mesh=mesh, **kw)
  else:
    cfg = model_config(c, path=path, dtype=dtype, remat=remat)
    if weights:
      model = shd.init_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(c.seed)), mesh)
  if own:
    named, allow = c.model.tokenizer, c.model.get("allow_tokenizer_mismatch", False)
  else:
    named, allow = "" if tokenizer_check.carries_tokenizer(path) else c.model.tokenizer, False
  tokenizer = tokenizer_check.policy_tokenizer(cfg, path, named, carried=carried,
                                               allow_mismatch=allow, field=field)
  return (model if weights else None), cfg, tokenizer


def rollout_weights(c, abstract_params, mesh):
  """ShapeDtypeStructs (dtype and sharding) of the rollout's copy of params of these shapes.

  Each leaf takes the dtype the model computes it in (`model.compute_dtype_of`: float matrices the
  compute dtype, 1-D norm weights their own) and the layout of `config.rollout.weight_sharding`'s
  rules (sharding.WEIGHT_LAYOUTS).
  """
  shardings = shd.state_shardings(abstract_params, mesh,
                                  shd.WEIGHT_LAYOUTS[c.rollout.weight_sharding])
  return jax.tree.map(
      lambda x, sh: jax.ShapeDtypeStruct(x.shape, compute_dtype_of(x, c.model.dtype),
                                         sharding=sh),
      abstract_params, shardings)


def compute_dtype_weights(c, abstract_params, mesh):
  """params → the rollout's copy: matrices in the compute dtype, in the rollout layout.

  Decoding reads every weight once per generated token, so with float32 master weights and
  bfloat16 compute it would move twice the bytes it needs. Every matmul casts its weight to the
  compute dtype anyway, so casting once per rollout is exact; 1-D norm weights stay as they are
  because the model applies them in float32. The layout matters as much: with the
  training shards (`embed` over fsdp) every decoded token all-gathers every layer, while the
  "tensor" layout gathers once per rollout, here. Same dtype and layout: the params themselves.
  """
  target = rollout_weights(c, abstract_params, mesh)
  train = shd.state_shardings(abstract_params, mesh)
  same = jax.tree.map(lambda x, t, s: x.dtype == t.dtype and t.sharding == s, abstract_params,
                      target, train)
  if all(jax.tree.leaves(same)):
    return lambda params: params
  return jax.jit(lambda params: jax.tree.map(lambda x, t: x.astype(t.dtype), params, target),
                 out_shardings=jax.tree.map(lambda t: t.sharding, target))
