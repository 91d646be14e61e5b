"""Train-step throughput and MFU against a matmul peak measured in the same run.

  python bench/train_step.py [--layers 4] [--hidden 512] [--rows 8] [--prompt 64] [--resp 192]

Times the real jitted `train_step` (policy forward + fused log-prob + GRPO/KL/entropy/LLDS loss
+ backward + AdamW, one micro-batch) on a Qwen2-shaped model with the real Qwen vocabulary, and a
large f32 matmul on the same device. MFU = XLA's counted FLOPs of the step / step time / the
matmul's achieved FLOP/s, so it says how close the step gets to what this device can do.
"""

import argparse
import datetime
import os
import platform

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from llds_jax import losses, sharding
from llds_jax.model import ModelConfig, Transformer
from llds_jax.train_step import StepConfig, Updater, place_batch

import results

def matmul_peak(n=2048, repeats=5, dtype=jnp.float32):
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  return 2 * n**3 / results.median_time(lambda: f(a).block_until_ready(), repeats)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--hidden", type=int, default=512)
  ap.add_argument("--rows", type=int, default=8)
  ap.add_argument("--prompt", type=int, default=64)
  ap.add_argument("--resp", type=int, default=192)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()

  D = args.hidden
  cfg = ModelConfig(vocab_size=151936, hidden_size=D, intermediate_size=D * 11 // 2 // 64 * 64,
                    num_layers=args.layers, num_heads=D // 64, num_kv_heads=max(D // 64 // 4, 1),
                    head_dim=64, tie_word_embeddings=True)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  graphdef, params = nnx.split(sharding.init_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh))
  opt = ml_collections.ConfigDict(dict(lr=1e-6, warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8,
                                       weight_decay=0.01, grad_clip=1.0))
  step_cfg = StepConfig(loss=losses.LossConfig(), num_micro=1, chunk_size=128)
  up = Updater(graphdef, jax.eval_shape(lambda: params), opt=opt, step_cfg=step_cfg, mesh=mesh)
  state = up.init_state(params)
  n, P, R = args.rows, args.prompt, args.resp
  rng = np.random.RandomState(0)
  batch = dict(input_ids=rng.randint(0, cfg.vocab_size, (n, P + R)), attn_mask=np.ones((n, P + R)),
               positions=np.tile(np.arange(P + R), (n, 1)), loss_mask=np.ones((n, R), np.float32),
               adv=rng.randn(n).astype(np.float32), old_logp=np.full((n, R), -12.0, np.float32),
               ref_logp=np.full((n, R), -12.0, np.float32), answer_weight=np.ones((n, R), np.float32))
  batch = {k: np.asarray(v, np.int32 if k in ("input_ids", "attn_mask", "positions") else np.float32)
           for k, v in batch.items()}
  placed = place_batch(batch, up.batch_shardings)
  compiled = up.step.lower(state, placed).compile()
  flops = float(compiled.cost_analysis()["flops"])

  holder = {"s": state}

  def step():
    holder["s"], m = up.step(holder["s"], placed)
    jax.block_until_ready(m)

  step_s = results.median_time(step, args.repeats)
  peak = matmul_peak()
  tokens = n * (P + R)
  mfu = flops / step_s / peak
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  row = (f"| {datetime.date.today()} | {platform.machine()}, {os.cpu_count()} cores, "
         f"{jax.devices()[0].device_kind} ×{jax.device_count()} | {args.layers}L D{D} V151936 "
         f"({n_params / 1e6:.0f}M) f32 | {n}×{P + R} | {step_s:.2f} | {tokens / step_s:,.0f} | "
         f"{flops / 1e9:,.0f} | {peak / 1e9:,.1f} | **{mfu:.1%}** |")
  print(row)
  results.append_row("Train step throughput and MFU (bench/train_step.py)",
                     ["date", "device", "model", "rows×tokens", "step s", "tokens/s", "step GFLOP (XLA)", "matmul peak GFLOP/s", "MFU"],
                     row)


if __name__ == "__main__":
  main()
