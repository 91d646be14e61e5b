"""Exports a training checkpoint as a Hugging Face model directory.

  python tools/export_hf.py --workdir /tmp/llds_tiny --out /tmp/llds_tiny/hf [--step 3] \
      [--dtype bfloat16]

Writes safetensors (sharded with an index above --max_shard_gb), config.json,
generation_config.json and the run's tokenizer with its chat template. Non-finite weights are
refused, naming the parameters. Unless --no-verify, the directory is then loaded with
`transformers.AutoModelForCausalLM` and its logits are compared with ours on a fixed token sequence
(in float32, on the weights as exported, so a bfloat16 export is checked exactly too).
"""

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPES = ("float32", "bfloat16", "float16")
VERIFY_TOKENS = 24  # length of the verification sequence


def nonfinite(model) -> list[str]:
  """'path (k NaN, m inf)' for every parameter holding a non-finite value."""
  import jax
  import numpy as np
  from flax import nnx

  bad = []
  for path, var in nnx.to_flat_state(nnx.state(model)):
    w = np.asarray(jax.device_get(var.get_value())).astype(np.float32)
    nan, inf = int(np.isnan(w).sum()), int(np.isinf(w).sum())
    if nan or inf:
      bad.append(f"{'.'.join(map(str, path))} ({nan} NaN, {inf} inf)")
  return bad


def with_token_ids(cfg, tokenizer):
  """`cfg` with bos/eos/pad ids taken from the tokenizer where the model config has none."""
  if tokenizer is None:
    return cfg
  ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad")}
  return dataclasses.replace(cfg, **{k: v for k, v in ids.items()
                                     if v is not None and getattr(cfg, k) is None})


def verify(model, out: str, dtype: str | None) -> tuple[float, float]:
  """(max |logit difference|, max |logit|) of `transformers` loading `out` vs our model (f32)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  import transformers
  from flax import nnx

  if dtype:  # our weights rounded exactly as the export rounded them
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda w: w.astype(dtype).astype(w.dtype), state)
    model = nnx.merge(graphdef, state)
  ids = np.random.RandomState(0).randint(0, model.cfg.vocab_size, (1, VERIFY_TOKENS))
  ours = np.asarray(jax.device_get(model(jnp.asarray(ids))))
  tm = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = tm(torch.tensor(ids)).logits.numpy()
  return float(np.abs(ours - theirs).max()), float(np.abs(theirs).max())


def export(workdir: str, out: str, *, step: int | None = None, dtype: str | None = None,
           max_shard_gb: float = 5.0, check: bool = True, rtol: float = 1e-4) -> dict:
  """Writes the HF directory; returns {"step", "out", "max_logit_diff" (None unchecked)}."""
  from llds_jax import hf_io, restore

  if dtype is not None and dtype not in DTYPES:
    raise ValueError(f"--dtype={dtype!r}: expected one of {DTYPES}")
  if os.path.abspath(out) == os.path.abspath(workdir):
    raise ValueError(f"--out {out} is the run directory (its config.json would be overwritten)")
  run = restore.load_run(workdir, step)
  bad = nonfinite(run.model)
  if bad:
    more = " …" if len(bad) > 8 else ""
    raise ValueError(f"refusing to export {workdir} step {run.step}: non-finite weights in "
                     f"{len(bad)} parameter(s): {', '.join(bad[:8])}{more} (the run diverged "
                     "before this checkpoint; export an earlier --step)")
  cfg = with_token_ids(run.cfg, run.tokenizer)
  if os.path.isdir(out):  # weights of an earlier export could shadow a differently sharded one
    for f in os.listdir(out):
      if f.startswith("model") and f.endswith((".safetensors", ".safetensors.index.json")):
        os.remove(os.path.join(out, f))
  try:
    hf_io.save_pretrained(run.model, cfg, out, tokenizer=run.tokenizer, dtype=dtype,
                          max_shard_bytes=int(max_shard_gb * 1024**3))
  except ValueError as e:  # finite in float32 but overflowing the export dtype
    raise ValueError(f"refusing to export {workdir} step {run.step} as {dtype}: {e}") from e
  diff = None
  if check:
    diff, scale = verify(run.model, out, dtype)
    # float32 on both sides; only summation order differs, which grows with the logits' size.
    if not diff <= rtol * max(1.0, scale):
      raise ValueError(f"{out}: transformers logits differ from ours by {diff:.3g} (max |logit| "
                       f"{scale:.3g}); the export is wrong, please report it")
  return {"step": run.step, "out": out, "max_logit_diff": diff}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True, help="training run directory (--config.workdir)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  p.add_argument("--out", required=True, help="output Hugging Face model directory")
  p.add_argument("--dtype", choices=DTYPES, default=None,
                 help="weight dtype on disk (default: the training param dtype)")
  p.add_argument("--max_shard_gb", type=float, default=5.0, help="safetensors shard size")
  p.add_argument("--no-verify", dest="verify", action="store_false",
                 help="skip the transformers reload and logits comparison")
  args = p.parse_args(argv)
  try:
    res = export(args.workdir, args.out, step=args.step, dtype=args.dtype,
                 max_shard_gb=args.max_shard_gb, check=args.verify)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"export_hf: {e}")
  files = sorted(os.listdir(res["out"]))
  print(f"exported step {res['step']} of {args.workdir} to {res['out']}: {', '.join(files)}")
  if res["max_logit_diff"] is not None:
    print("verified: transformers reloads it; max |logit diff| vs ours = "
          f"{res['max_logit_diff']:.2e}")


if __name__ == "__main__":
  main()
