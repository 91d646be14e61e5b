"""Prefill throughput: our jitted forward vs transformers (torch CPU), same weights and tokens.

  python bench/forward.py [--layers 24] [--batch 4] [--seq 256] [--repeats 3]

Builds a random Qwen2.5-0.5B-shaped `Qwen2ForCausalLM` in torch, saves it as safetensors, loads
it with `hf_io.load_pretrained`, checks the logits agree, then times full-sequence forwards
(prefill) of both on the same token batch and appends the ratio to bench/RESULTS.md.
"""

import argparse
import datetime
import os
import platform
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from llds_jax import hf_io

import results

def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--layers", type=int, default=24, help="24 = the real Qwen2.5-0.5B depth")
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()

  hf_cfg = transformers.Qwen2Config(
      vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=args.layers,
      num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True,
      max_position_embeddings=32768)
  torch.manual_seed(0)
  tm = transformers.Qwen2ForCausalLM(hf_cfg).float().eval()
  with tempfile.TemporaryDirectory() as d:
    tm.save_pretrained(d)
    model, cfg = hf_io.load_pretrained(d)
  ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (args.batch, args.seq))
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  ids_j, ids_t = jnp.asarray(ids), torch.tensor(ids)

  with torch.no_grad():
    ref = tm(ids_t).logits.numpy()
  diff = float(np.abs(np.asarray(fwd(state, ids_j)) - ref).max())

  ours = results.median_time(lambda: fwd(state, ids_j).block_until_ready(), args.repeats)

  def torch_fwd():
    with torch.no_grad():
      tm(ids_t)

  theirs = results.median_time(torch_fwd, args.repeats)
  tokens = args.batch * args.seq
  row = (f"| {datetime.date.today()} | {platform.processor() or platform.machine()}, "
         f"{os.cpu_count()} cores, jax {jax.__version__} ({jax.default_backend()}), torch "
         f"{torch.__version__} | Qwen2.5-0.5B shape, {args.layers} layers, f32 | "
         f"{args.batch}×{args.seq} | {tokens / ours:,.0f} | {tokens / theirs:,.0f} | "
         f"**{theirs / ours:.2f}×** | {diff:.1e} |")
  print(row)
  results.append_row("Prefill throughput: ours vs transformers (bench/forward.py)",
                     ["date", "machine", "model", "batch×seq", "ours tok/s", "transformers tok/s", "speed-up", "max |Δlogit|"],
                     row)


if __name__ == "__main__":
  main()
