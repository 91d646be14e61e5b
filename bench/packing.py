"""Padded vs packed update phase on a length distribution recorded from real rollouts.

  python bench/packing.py --record /tmp/lld/testbed   # roll out the testbed's warmed-up policy
  python bench/packing.py [--rows 80] [--layers 4] [--hidden 256]   # the bench itself

`--record` runs `rollout.rollout` with the LLD testbed's format-warmed-up policy (tools/
lld_experiment.py builds it) on its RL questions, with the testbed config's rollout settings, and
writes every row's prompt and response length to bench/packing_lengths.json. The bench samples
`--rows` trajectories from that distribution (random token ids of those lengths, the recorded
number of loss tokens, observations masked), lays them out
as the trainer does (`batch_layout.build_batch`), and times the whole update phase (old and reference
log-prob passes + every minibatch step, `train_step.update_phase`) on a Qwen2-shaped model, once
padded and once packed (`rl.pack`, sequences of `--pack_len`, default the recorded max_context,
micro-batches of the same token budget). It reports the share
of token slots holding a real token, the median update-phase seconds after a compiling call, and
XLA's memory estimate (arguments + temporaries) of the largest compiled program of each path.
The non-pad fraction counts every token slot the phase's programs ran on (both log-prob passes
and every micro-batch), so packing's rounding to whole sequences and micro-batches is included.
The last line is `packed/padded update time: X (non-pad fraction A -> B)`.
"""

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import types

import jax
import ml_collections
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llds_jax import batch_layout, losses, packing, policy, search_pool, sharding  # noqa: E402
from llds_jax.model import ModelConfig, Transformer  # noqa: E402
from llds_jax.train_step import StepConfig, Updater, update_phase  # noqa: E402

import results  # noqa: E402

LENGTHS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "packing_lengths.json")


def record(testbed: str, prompts: int, path: str) -> None:
  """Rolls out the testbed policy on `prompts` RL questions; saves per-row lengths."""
  from configs import lld_testbed
  from llds_jax import data, rollout
  c = lld_testbed.get_config(testbed)
  mesh = sharding.make_mesh(dict(c.mesh))
  model, _, tok = policy.load(c, mesh)
  examples = data.load_examples(c.data.train)[:prompts]
  ro = rollout.rollout(model, tok, search_pool.load_retriever(c.retriever.index),
                       [data.encode_prompt(ex.messages, tok) for ex in examples],
                       group_size=c.rollout.group_size, rollout_cfg=rollout.rollout_config(c),
                       seed=0, mesh=mesh)
  out = {"source": f"LLD testbed warmed-up policy ({testbed}), {prompts} prompts x "
                   f"{c.rollout.group_size}, configs/lld_testbed.py rollout settings",
         "max_context": c.rollout.max_context, "prompt_len": ro.prompt_len.tolist(),
         "response_len": ro.response_len.tolist(),
         "loss_tokens": ro.loss_mask.sum(1).astype(int).tolist()}
  with open(path, "w") as f:
    json.dump(out, f)
  print(f"wrote {len(ro.prompt_len)} rows to {path}")


def synthetic_batch(dist: dict, rows: int, vocab: int, seed: int = 0) -> dict:
  """`rows` trajectories with (prompt, response) lengths drawn from the recorded distribution."""
  rng = np.random.default_rng(seed)
  pick = rng.integers(len(dist["prompt_len"]), size=rows)
  p_B = np.asarray(dist["prompt_len"])[pick]
  r_B = np.asarray(dist["response_len"])[pick]
  l_B = np.asarray(dist["loss_tokens"])[pick]
  R = int(r_B.max())
  # Observation tokens are not loss tokens (Search-R1 masks them): the recorded count of loss
  # tokens is split between the head (reasoning + search call) and the tail (the answer), the
  # masked observations in between. The padded path's cost does not depend on it; the packed
  # path computes logits only at loss tokens.
  head_B, tail_B = -(-l_B // 2), l_B // 2
  t_R = np.arange(R)[None]
  loss_BxR = (t_R < head_B[:, None]) | ((t_R >= (r_B - tail_B)[:, None]) & (t_R < r_B[:, None]))
  ro = types.SimpleNamespace(
      prompt_len=p_B, response_len=r_B,
      prompt_ids=rng.integers(1, vocab, (rows, int(p_B.max()))),
      response_ids=rng.integers(1, vocab, (rows, R)),
      loss_mask=loss_BxR.astype(np.float32))
  adv = rng.standard_normal(rows).astype(np.float32)
  return batch_layout.build_batch(ro, adv, np.ones((rows, R), np.float32),
                             max_len=dist["max_context"])


class Recorder:
  """Wraps a jitted program; remembers its largest call's memory estimate (bytes) and counts
  the real tokens and the token slots it was given (`valid_key`: attn_mask or segment_ids)."""

  def __init__(self, program, valid_key: str):
    self.program, self.peak, self.seen = program, 0, set()
    self.valid_key, self.tokens, self.slots = valid_key, 0, 0

  def __call__(self, *args):
    valid = np.asarray(jax.device_get(args[1][self.valid_key])) > 0
    self.tokens, self.slots = self.tokens + int(valid.sum()), self.slots + valid.size
    # Shapes first: the train step donates (deletes) its state argument.
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                          if isinstance(x, jax.Array) else x, args)
    out = self.program(*args)
    key = str(jax.tree.map(np.shape, shapes))
    if key not in self.seen:
      self.seen.add(key)
      mem = self.program.lower(*shapes).compile().memory_analysis()
      self.peak = max(self.peak, mem.argument_size_in_bytes + mem.temp_size_in_bytes
                      + mem.output_size_in_bytes - mem.alias_size_in_bytes)
    return out


def run(mode: str, batch: dict, graphdef, params, step_cfg: StepConfig, mesh, minibatch: int,
        repeats: int) -> tuple[float, float, float]:
  """(median update-phase seconds, peak program bytes, non-pad fraction of every token slot
  the phase's programs were fed) of one path."""
  opt = ml_collections.ConfigDict(dict(lr=1e-6, warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8,
                                       weight_decay=0.01, grad_clip=1.0))
  up = Updater(graphdef, jax.eval_shape(lambda: params), opt=opt, step_cfg=step_cfg, mesh=mesh)
  progs = [up.packed] if mode == "packed" else [up]
  recs = []
  for p in progs:
    for name in ("step", "logprobs") if mode == "packed" else ("step", "logprobs_program"):
      rec = Recorder(getattr(p, name), "segment_ids" if mode == "packed" else "attn_mask")
      setattr(p, name, rec)
      recs.append(rec)
  holder = {"s": up.init_state(params)}

  def phase():
    holder["s"], m, stats = update_phase(up, holder["s"], batch, params, minibatch=minibatch)
    jax.block_until_ready((holder["s"], m, stats))

  secs = results.median_time(phase, repeats)
  frac = sum(r.tokens for r in recs) / sum(r.slots for r in recs)
  return secs, max(r.peak for r in recs), frac


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--record", default="", help="testbed dir: record lengths, then exit")
  ap.add_argument("--record_prompts", type=int, default=32)
  ap.add_argument("--lengths", default=LENGTHS)
  ap.add_argument("--rows", type=int, default=80, help="rollout rows of the benched batch")
  ap.add_argument("--minibatch", type=int, default=16)
  ap.add_argument("--micro", type=int, default=8,
                  help="rows per padded micro-batch; packed: the same tokens in sequences")
  ap.add_argument("--logprob_rows", type=int, default=16)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--hidden", type=int, default=256)
  ap.add_argument("--vocab", type=int, default=32768)
  ap.add_argument("--pack_len", type=int, default=0, help="0 = the recorded max_context")
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--no_append", action="store_true", help="do not write bench/RESULTS.md")
  args = ap.parse_args()
  if args.record:
    record(args.record, args.record_prompts, args.lengths)
    return
  with open(args.lengths) as f:
    dist = json.load(f)
  tot = np.asarray(dist["prompt_len"]) + np.asarray(dist["response_len"])
  print(f"lengths: {dist['source']}: {len(tot)} rows, prompt+response tokens mean "
        f"{tot.mean():.1f}, median {np.median(tot):.0f}, max {tot.max()} (max_context "
        f"{dist['max_context']}); response mean {np.mean(dist['response_len']):.1f}")
  D = args.hidden
  cfg = ModelConfig(vocab_size=args.vocab, hidden_size=D, intermediate_size=D * 11 // 4,
                    num_layers=args.layers, num_heads=max(D // 64, 1),
                    num_kv_heads=max(D // 256, 1), head_dim=64, tie_word_embeddings=True,
                    scan_layers=False)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  graphdef, params = nnx.split(sharding.init_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)),
                                                     mesh))
  batch = synthetic_batch(dist, args.rows, args.vocab)
  base = StepConfig(loss=losses.LossConfig(), num_micro=args.minibatch // args.micro,
                    chunk_size=128, logprob_rows=args.logprob_rows)
  pack_len = args.pack_len or dist["max_context"]
  # The same token budget per micro-batch: `micro` rows of max_context, in sequences of pack_len.
  packed_cfg = dataclasses.replace(base, pack_len=pack_len, pack_micro_seqs=max(
      1, args.micro * dist["max_context"] // pack_len))
  print(f"non-pad fraction of the whole batch: padded "
        f"{packing.non_pad_fraction(batch['attn_mask']):.3f}, packed into {pack_len}-token sequences "
        f"{packing.non_pad_fraction(batch['attn_mask'], pack_len):.3f}")
  out, frac = {}, {}
  for mode, step_cfg in (("padded", base), ("packed", packed_cfg)):
    out[mode] = run(mode, batch, graphdef, params, step_cfg, mesh, args.minibatch, args.repeats)
    frac[mode] = out[mode][2]
    print(f"{mode}: update phase {out[mode][0]:.2f} s, non-pad fraction of the slots its "
          f"programs ran on {frac[mode]:.3f}, "
          f"largest program {out[mode][1] / 2**20:.0f} MiB (XLA estimate), batch "
          f"{batch['input_ids'].shape}")
  ratio = out["packed"][0] / out["padded"][0]
  load = os.getloadavg()[0]
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  row = (f"| {datetime.date.today()} | {platform.machine()}, {os.cpu_count()} cores, "
         f"{jax.devices()[0].device_kind} ×{jax.device_count()}, load {load:.1f} | "
         f"{args.layers}L D{D} V{args.vocab} ({n_params / 1e6:.0f}M) f32 | {args.rows} rows, "
         f"mb {args.minibatch}, micro {args.micro}, pack_len {pack_len} | {out['padded'][0]:.2f} | "
         f"{out['packed'][0]:.2f} | **{ratio:.2f}** | {frac['padded']:.3f} → "
         f"{frac['packed']:.3f} | "
         f"{out['padded'][1] / 2**20:.0f} → {out['packed'][1] / 2**20:.0f} |")
  if not args.no_append:
    results.append_row(
        "Packed vs padded update phase (bench/packing.py)",
        ["date", "device", "model", "batch", "padded s", "packed s", "packed/padded",
         "non-pad fraction", "largest program MiB (XLA)"], row)
  print(row)
  print(f"packed/padded update time: {ratio:.2f} (non-pad fraction {frac['padded']:.2f} -> "
        f"{frac['packed']:.2f})")


if __name__ == "__main__":
  main()
