"""A real pretrained model before and after: format warm-up, then GRPO and GRPO + LLDS, EM each.

  python tools/fetch_assets.py
  python tools/real_run.py --model=qwen05b --outdir=/tmp/real      # one GPU: a few minutes
  python tools/real_run.py --model=smollm --outdir=/tmp/real_cpu --smoke   # CPU plumbing check

Stages, each skipped when its output exists (so a killed run continues):
1. warm/: the GGUF model (configs/real_model.py) after `sft.format_warmup` on the training
   questions in its own chat template, saved as a HF directory with its tokenizer.
2. eval_base/, eval_warm/: EM on the held-out FanOutQA questions (tools/evaluate.py: greedy,
   4 search turns) of the shipped GGUF and of the warmed-up model.
3. <arm>/: `trainer.train` from warm/ (no second warm-up), then eval_<arm>/ on the same
   questions. Arms: grpo (λ = 0) and llds_action (λ = 0.2, action gate), same seed.
4. summary.json and summary.md: EM/F1/answer rate per stage, reward of the first and last
   training steps, seconds per stage, the device.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

ARMS = {"grpo": dict(llds_lambda=0.0), "llds_action": dict(llds_lambda=0.2, llds_gate="action")}


def config(a):
  """configs/real_model.py for `a.model`, with the command line's sizes (reduced by --smoke)."""
  from configs import real_model
  c = real_model.get_config(a.model)
  c.seed = a.seed
  if a.steps:
    c.total_steps = a.steps
  if a.lr:
    c.opt.lr = a.lr
  if a.smoke:  # every stage at the smallest size that still searches and updates twice
    c.total_steps = 1
    c.model.format_warmup_steps, c.model.format_warmup_batch = 2, 8
    c.rollout.prompts, c.rollout.group_size = 2, 4
    c.rollout.max_turns, c.rollout.max_turn_tokens, c.rollout.max_obs_tokens = 1, 24, 96
    c.rollout.max_context = 1024
    c.rl.minibatch_size = c.rl.micro_batch_size = c.rl.logprob_micro_batch_size = 8
    c.rl.logprob_chunk = 128
    c.model.dtype, c.rollout.cache_dtype = "float32", "float32"
    c.log.eval_every = 0
    c.ckpt.async_save = False
  c.log.plots = not a.smoke
  return c


def warm_up(c, out: str) -> dict:
  """Stage 1: the format warm-up of `c.model.path`, saved to `out` as a HF directory."""
  from llds_jax import data, hf_io, policy, search_pool, sft, sharding as shd
  mesh = shd.make_mesh(dict(c.mesh))
  model, cfg, tok = policy.load(c, mesh)
  examples = data.load_examples(c.data.train.split(","))
  t0 = time.perf_counter()
  retriever = search_pool.load_retriever(c.retriever.index)
  model, losses = sft.warmup_from_config(c, model, tok, retriever, examples, mesh,
                                         progress=c.log.progress)
  secs = time.perf_counter() - t0
  hf_io.save_pretrained(model, cfg, out, tokenizer=tok)
  return {"nll_first": float(losses[0]), "nll_last": float(losses[-1]), "steps": len(losses),
          "seconds": secs}


def evaluate(c, out: str, a, **weights) -> dict:
  """EM etc. of one weight source on the held-out questions (tools/evaluate.py's `run`)."""
  import evaluate as ev
  path = os.path.join(out, os.path.splitext(os.path.basename(c.data.val))[0] + ".json")
  if not os.path.exists(path):
    ev.run(c, data=c.data.val, limit=a.eval_limit, max_turns=a.eval_turns, out=out,
           batch_size=a.eval_batch, progress=c.log.progress, **weights)
  with open(path) as f:
    result = json.load(f)
  return {**result["table"]["all"], "seconds": result["settings"]["seconds"]}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="qwen05b", help="configs/real_model.py argument")
  p.add_argument("--outdir", required=True)
  p.add_argument("--steps", type=int, default=0, help="RL steps per arm (0 = the config's)")
  p.add_argument("--lr", type=float, default=0.0, help="peak RL learning rate (0 = the config's)")
  p.add_argument("--eval_limit", type=int, default=100, help="held-out questions")
  p.add_argument("--eval_turns", type=int, default=4, help="search turns in evaluation")
  p.add_argument("--eval_batch", type=int, default=50)
  p.add_argument("--arms", default=",".join(ARMS))
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--smoke", action="store_true", help="tiny sizes: a plumbing check on CPU")
  a = p.parse_args(argv)
  if a.smoke:
    a.eval_limit, a.eval_turns, a.eval_batch = 4, 1, 8
  unknown = set(a.arms.split(",")) - set(ARMS)
  if unknown:
    p.error(f"unknown arms {sorted(unknown)}; known: {list(ARMS)}")
  import jax

  from llds_jax import metrics as mlib, trainer
  c = config(a)
  os.makedirs(a.outdir, exist_ok=True)
  summary_path = os.path.join(a.outdir, "summary.json")
  summary = {}
  if os.path.exists(summary_path):  # a rerun continues: finished stages are kept
    with open(summary_path) as f:
      summary = json.load(f)
  summary.update(device=str(jax.devices()[0].device_kind), devices=jax.device_count(),
                 model=a.model, config=json.loads(c.to_json_best_effort()))

  def stage(name, fn):
    if name not in summary:
      t0 = time.perf_counter()
      summary[name] = fn()
      summary[name]["stage_seconds"] = time.perf_counter() - t0
      with open(summary_path, "w") as f:
        json.dump(summary, f, indent=1)
    print(name, {k: v for k, v in summary[name].items() if not isinstance(v, dict)}, flush=True)

  warm = os.path.join(a.outdir, "warm")
  stage("warmup", lambda: warm_up(c, warm))
  stage("eval_base", lambda: evaluate(c, os.path.join(a.outdir, "eval_base"), a,
                                      gguf=c.model.path))
  stage("eval_warm", lambda: evaluate(c, os.path.join(a.outdir, "eval_warm"), a, hf=warm))
  for arm in a.arms.split(","):
    def train(arm=arm):
      ca = config(a)
      ca.workdir = os.path.join(a.outdir, arm)
      ca.model.path, ca.model.format_warmup_steps = warm, 0
      for k, v in ARMS[arm].items():
        ca.rl[k] = v
      recs = trainer.train(ca)
      rows = mlib.read_metrics(os.path.join(ca.workdir, "metrics.jsonl"))
      reward = [r["reward/mean"] for r in rows]
      k = max(1, min(5, len(reward) // 2))
      return {"steps": len(recs), "reward_first": sum(reward[:k]) / k,
              "reward_last": sum(reward[-k:]) / k, "reward": reward,
              "step_seconds": [r.get("time/step_s") for r in rows]}
    stage(arm, train)
    stage(f"eval_{arm}", lambda arm=arm: evaluate(c, os.path.join(a.outdir, f"eval_{arm}"), a,
                                                  checkpoint=os.path.join(a.outdir, arm)))
  rows = [("base (shipped GGUF)", "eval_base"), ("after format warm-up", "eval_warm")]
  rows += [(f"after {arm}", f"eval_{arm}") for arm in a.arms.split(",")]
  lines = [f"{a.model} on {summary['device']} × {summary['devices']}, "
           f"{summary['eval_base']['n']} held-out FanOutQA questions, greedy, "
           f"{a.eval_turns} search turns", "",
           "| weights | EM | F1 | answer rate | searches |", "|---|---|---|---|---|"]
  for label, key in rows:
    r = summary[key]
    lines.append(f"| {label} | {r['em']:.3f} | {r['f1']:.3f} | {r['answer_rate']:.3f} | "
                 f"{r['searches']:.2f} |")
  lines.append("")
  for arm in a.arms.split(","):
    r = summary[arm]
    lines.append(f"{arm}: {r['steps']} steps, training reward {r['reward_first']:.3f} -> "
                 f"{r['reward_last']:.3f} (means of the first / last steps), "
                 f"{r['stage_seconds']:.0f} s")
  total = sum(v["stage_seconds"] for v in summary.values()
              if isinstance(v, dict) and "stage_seconds" in v)
  lines.append(f"\nall stages: {total:.0f} s")
  with open(os.path.join(a.outdir, "summary.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  return summary


if __name__ == "__main__":
  main()
