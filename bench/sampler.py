"""Sampler throughput vs `transformers.generate`, and prefill work of a cached multi-turn rollout.

Dims: B rows, P prompt tokens, N new tokens.

  .venv/bin/python bench/sampler.py                  # tiny + 0.5B-shaped (24 layers), B=16, N=128
  .venv/bin/python bench/sampler.py --layers_05b 6   # 0.5B widths and vocab, fewer layers

Part 1: the same random weights in torch (HF Qwen2) and in ours; greedy, ragged prompts (P in
16..64, HF left-padded), exactly N new tokens per row (no EOS). Tokens/s = B·N / wall time of one
warm `generate` call (ours: after a compile run with the same shapes; prefill included on both
sides). Goal: ours ≥ 2× transformers. Part 2: a Search-R1 rollout (Search-R1 prompt, tiny
tokenizer, BM25 over tests/testdata/wiki_sample.jsonl, a scripted model that searches every turn,
3 searches + the final turn, observations capped at 1000 tiny-tokenizer tokens ≈ 500 Qwen
tokens): tokens fed as prefill by ours (each token once) vs a sampler that re-prefills the whole
context every turn. Appends a dated Markdown table to bench/RESULTS.md. ~20 min on 2 busy cores
(the 24-layer transformers run dominates).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

from llds_jax import data, hf_io, observations, rollout, sampler
from llds_jax import retriever

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
QWEN05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
               num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
               rope_theta=1e6, max_position_embeddings=32768)


def decode_speed(shape: dict, batch: int, new: int, seed: int = 0) -> dict:
  """Tokens/s of ours and of transformers greedy generate on the same random Qwen2 weights."""
  torch.manual_seed(seed)
  tm = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape)).float().eval()
  with tempfile.TemporaryDirectory() as d:
    tm.save_pretrained(d)
    model, _ = hf_io.load_pretrained(d)
  rng = np.random.RandomState(seed)
  prompts = [rng.randint(0, shape["vocab_size"], rng.randint(16, 65)).tolist()
             for _ in range(batch)]

  t0 = time.perf_counter()
  sampler.generate(model, prompts, max_new_tokens=new)
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  ours = sampler.generate(model, prompts, max_new_tokens=new)
  ours_s = time.perf_counter() - t0

  width = max(map(len, prompts))
  ids = torch.zeros((batch, width), dtype=torch.long)
  mask = torch.zeros((batch, width), dtype=torch.long)
  for b, p in enumerate(prompts):
    ids[b, width - len(p):], mask[b, width - len(p):] = torch.tensor(p), 1
  kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None)
  with torch.no_grad():
    tm.generate(ids, max_new_tokens=2, **kw)  # warm-up
    t0 = time.perf_counter()
    ref = tm.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)[:, width:].tolist()
    hf_s = time.perf_counter() - t0
  agree = float(np.mean([a == b for a, b in zip(ours, ref)]))
  return dict(ours=batch * new / ours_s, hf=batch * new / hf_s, compile_s=first - ours_s,
              ours_s=ours_s, hf_s=hf_s, agree=agree)


def rollout_prefill(batch: int) -> dict:
  """Prefill tokens of our cached rollout vs re-prefilling the context every turn."""
  sys.path.insert(0, str(ROOT / "tests"))
  from test_sampler import TOKENIZER_DIR, scripted_model  # pylint: disable=import-outside-toplevel
  tok = transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR)
  tok.add_tokens(["<search>", "</search>", "<answer>", "</answer>"])  # one token each: scriptable
  with open(ROOT / "tests" / "testdata" / "wiki_sample.jsonl", encoding="utf-8") as f:
    docs = [(row["id"], row["contents"]) for row in map(json.loads, f) if row]
  index = retriever.BM25Index.build(docs)
  questions = [f"Which {w} is mentioned in the article?" for w in
               ("composer", "city", "war", "river", "album", "team", "poet", "law")]
  prompts = [data.encode_prompt([{"role": "user", "content": data.make_prompt(q)}], tok)
             for q in questions]
  enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
  search = enc("<search> classical music</search>")
  obs_end = enc(observations.information_block("x"))[-1]
  model = scripted_model(len(tok), [[prompts[0][-1]] + search, [obs_end] + search])
  # The tiny tokenizer spends ~2.4 tokens per word (Qwen ~1.3): 1000 here ≈ Search-R1's 500.
  rollout_cfg = rollout.RolloutConfig(max_turns=3, max_turn_tokens=500, max_obs_tokens=1000)
  rollout.rollout(model, tok, index, prompts, group_size=batch // len(prompts),
                  rollout_cfg=rollout_cfg, progress=False)  # compile
  t0 = time.perf_counter()
  out = rollout.rollout(model, tok, index, prompts, group_size=batch // len(prompts),
                        rollout_cfg=rollout_cfg, progress=False)
  wall = time.perf_counter() - t0
  st = out.stats
  total = int((out.prompt_len + out.response_len).sum())
  return dict(rows=len(out.turns), turns=float(out.turns.mean()),
              searches=float(out.valid_searches.mean()), obs=st["rollout/observation_tokens"],
              total=total, prefill=st["rollout/prefill_tokens"],
              reprefill=st["rollout/reprefill_tokens"], wall=wall,
              model_s=st["time/rollout_model_s"], retrieval_s=st["time/rollout_retrieval_s"])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--new_tokens", type=int, default=128)
  ap.add_argument("--layers_05b", type=int, default=24)
  ap.add_argument("--no_write", action="store_true")
  args = ap.parse_args()
  torch.set_num_threads(os.cpu_count())
  shapes = {"tiny (2 layers, D=64, V=1000)": TINY,
            f"Qwen2.5-0.5B-shaped ({args.layers_05b}/24 layers)": dict(
                QWEN05B, num_hidden_layers=args.layers_05b)}
  rows = []
  for name, shape in shapes.items():
    r = decode_speed(shape, args.batch, args.new_tokens)
    print(name, r, flush=True)
    rows.append((name, r))
  ro = rollout_prefill(args.batch)
  print("rollout", ro, flush=True)

  lines = [
      f"\n## {datetime.date.today()} — sampler decode vs transformers; cached rollout prefill "
      "(`bench/sampler.py`)\n",
      f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores "
      f"(shared with other jobs), JAX {jax.__version__} on {jax.default_backend()}, torch "
      f"{torch.__version__}, transformers {transformers.__version__}; float32, greedy, "
      f"B = {args.batch} ragged prompts (16–64 tokens), {args.new_tokens} new tokens per row; "
      "tokens/s = B·N / wall of one warm call (prefill included). No GPU on this machine: no "
      "roofline numbers.\n",
      "| model | ours tok/s | transformers tok/s | speed-up | ours s | transformers s "
      "| ours first-call overhead s | same tokens |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for name, r in rows:
    lines.append(f"| {name} | {r['ours']:.0f} | {r['hf']:.0f} | {r['ours'] / r['hf']:.2f}× | "
                 f"{r['ours_s']:.2f} | {r['hf_s']:.2f} | {r['compile_s']:.1f} | {r['agree']:.0%} |")
  lines += [
      "",
      f"3-turn Search-R1 rollout ({ro['rows']} rows, {ro['turns']:.1f} generation turns and "
      f"{ro['searches']:.1f} searches per row, {ro['obs']} observation tokens, {ro['total']} "
      "prompt + response tokens in all; tiny scripted model, BM25 over 300 wiki passages):\n",
      "| prefill tokens, ours (cache kept) | prefill tokens, re-prefill every turn | ratio "
      "| rollout wall s | model s | retrieval s |",
      "|---|---|---|---|---|---|",
      f"| {ro['prefill']} | {ro['reprefill']} | {ro['reprefill'] / ro['prefill']:.2f}× | "
      f"{ro['wall']:.2f} | {ro['model_s']:.2f} | {ro['retrieval_s']:.3f} |",
  ]
  text = "\n".join(lines) + "\n"
  print(text)
  if not args.no_write:
    with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
      f.write(text)


if __name__ == "__main__":
  main()
