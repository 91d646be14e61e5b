"""Evaluates the search agent per data_source: EM, F1, searches, invalid-action and answer rates.

  python tools/evaluate.py --config=configs/tiny.py --checkpoint=/tmp/llds_tiny \
      --data=tests/testdata/fanoutqa_answerable.parquet --limit=8 --out=/tmp/llds_tiny/eval

Weights come from --checkpoint WORKDIR[:STEP] (a training run; newest step by default), --hf DIR
or --gguf FILE; with none of them, from the config's own model (model.path, or its random init:
a baseline). The config supplies the retriever index, the rollout limits, the mesh and the seed.
The rollout is the training rollout, greedy with `--max_turns 4` (the paper's evaluation) unless
--sample asks for the config's temperature/top-p. Prints the Markdown table and writes
OUT/<data>.json (table, per-question records, settings) and OUT/<data>.md.
"""

import json
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Run config (get_config() file): retriever, rollout, mesh, seed.",
    lock_config=True)
_DATA = flags.DEFINE_string("data", None, "Search-R1 test parquet (comma-separated for several).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "Training run directory (--config.workdir of the run), "
                                  "optionally WORKDIR:STEP; default step: the newest.")
_HF = flags.DEFINE_string("hf", None, "Hugging Face model directory (safetensors).")
_GGUF = flags.DEFINE_string("gguf", None, "GGUF model file (carries its own tokenizer).")
_LIMIT = flags.DEFINE_integer("limit", 0, "First N questions of every data_source (0 = all).")
_SAMPLE = flags.DEFINE_bool("sample", False,
                            "Sample with config.rollout temperature/top_p/top_k instead of greedy.")
_MAX_TURNS = flags.DEFINE_integer("max_turns", 4, "Executed search turns (+1 final answer turn).")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Questions per rollout batch.")
_OUT = flags.DEFINE_string("out", "eval_results", "Directory for <data>.json and <data>.md.")


def parse_checkpoint(spec: str) -> tuple[str, int | None]:
  """'WORKDIR' or 'WORKDIR:STEP' → (workdir, step or None)."""
  head, sep, tail = spec.rpartition(":")
  if sep and tail.isdigit() and head:
    return head, int(tail)
  return spec, None


def load_weights(c, mesh, *, checkpoint=None, hf=None, gguf=None):
  """(model, tokenizer, description) from exactly one weight source, placed on `mesh`."""
  from llds_jax import policy, restore, tokenizer_check

  given = [f"--{k}" for k, v in (("checkpoint", checkpoint), ("hf", hf), ("gguf", gguf)) if v]
  if len(given) > 1:
    raise ValueError(f"{' and '.join(given)}: give at most one weight source")
  if checkpoint:
    workdir, step = parse_checkpoint(checkpoint)
    workdir = os.path.abspath(workdir)  # orbax takes absolute paths only
    if not os.path.isdir(workdir):
      raise FileNotFoundError(f"--checkpoint {checkpoint}: no such run directory ({workdir})")
    run = restore.load_run(workdir, step, mesh, dtype=c.model.dtype)
    return run.model, run.tokenizer, f"{workdir} step {run.step}"
  if gguf and not os.path.isfile(gguf):
    raise FileNotFoundError(f"--gguf {gguf}: no such file")
  if hf and not os.path.isdir(hf):
    raise FileNotFoundError(f"--hf {hf}: no such directory")
  if hf and not tokenizer_check.carries_tokenizer(hf) and not c.model.tokenizer:
    raise FileNotFoundError(f"--hf {hf}: no tokenizer files and config.model.tokenizer is empty")
  # Weights given here bring their own tokenizer when they carry one (policy.load's rule).
  model, _, tokenizer = policy.load(c, mesh, path=gguf or hf, remat="none")
  what = gguf or hf or c.model.path or f"random init (seed {c.seed}) from the config"
  return model, tokenizer, what


def run(c, *, data: str, checkpoint=None, hf=None, gguf=None, limit: int = 0,
        sample: bool = False, max_turns: int = 4, batch_size: int = 32, out: str | None = None,
        progress: bool = True):
  """Evaluates and writes OUT/<data>.{json,md} (when `out`); returns (table, records, paths)."""
  from llds_jax import data as data_lib, evaluation, rollout, search_pool, sharding as shd

  paths = [p for p in data.split(",") if p]
  for p in paths:
    if not os.path.isfile(p):
      raise FileNotFoundError(f"--data {p}: no such file")
  if not paths:
    raise ValueError("--data is required (a Search-R1 test parquet)")
  if not os.path.exists(c.retriever.index):
    raise FileNotFoundError(f"config.retriever.index={c.retriever.index!r}: no such file or "
                            "directory (build one with tools/build_index.py)")
  if max_turns < 0 or batch_size <= 0 or limit < 0:
    raise ValueError(f"--max_turns={max_turns} and --limit={limit} must be >= 0 and "
                     f"--batch_size={batch_size} > 0")
  examples = evaluation.take_per_source(data_lib.load_examples(paths), limit)
  if not examples:  # before any weights are loaded or anything compiled
    raise ValueError(f"--data {','.join(paths)}: no questions to evaluate")
  mesh = shd.make_mesh(dict(c.mesh))
  model, tokenizer, what = load_weights(c, mesh, checkpoint=checkpoint, hf=hf, gguf=gguf)
  retriever = search_pool.load_retriever(c.retriever.index)
  rollout_cfg = evaluation.eval_rollout_config(rollout.rollout_config(c), max_turns=max_turns,
                                               greedy=not sample)
  # The model's own answer unless the config asks for Search-R1's whole-text scoring (parity).
  scope = c.rl.get("reward_scope", "sampled")
  t0 = time.perf_counter()
  table, records = evaluation.evaluate(model, tokenizer, retriever, examples,
                                       rollout_cfg=rollout_cfg, batch_size=batch_size, mesh=mesh,
                                       seed=c.seed, progress=progress, reward_scope=scope)
  settings = dict(reward_scope=scope, data=paths, weights=what, questions=len(records), limit=limit,
                  max_turns=max_turns, greedy=not sample, temperature=rollout_cfg.temperature,
                  top_p=rollout_cfg.top_p, top_k=rollout_cfg.top_k,
                  topk_passages=rollout_cfg.topk, retriever=c.retriever.index, seed=c.seed,
                  seconds=time.perf_counter() - t0)
  caption = (f"weights: {what} · data: {', '.join(map(os.path.basename, paths))} · "
             f"max_turns {max_turns} · {'sampled' if sample else 'greedy'}")
  md = f"{caption}\n\n{evaluation.markdown_table(table)}\n"
  written = []
  if out:
    os.makedirs(out, exist_ok=True)
    stem = os.path.splitext(os.path.basename(paths[0]))[0] + ("_etc" if len(paths) > 1 else "")
    written = [os.path.join(out, stem + ".json"), os.path.join(out, stem + ".md")]
    with open(written[0], "w") as f:
      json.dump({"table": table, "records": records, "settings": settings}, f, indent=1)
    with open(written[1], "w") as f:
      f.write(md)
  print(md)
  return table, records, written


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  try:
    _, _, written = run(_CONFIG.value, data=_DATA.value, checkpoint=_CHECKPOINT.value,
                        hf=_HF.value, gguf=_GGUF.value, limit=_LIMIT.value, sample=_SAMPLE.value,
                        max_turns=_MAX_TURNS.value, batch_size=_BATCH.value, out=_OUT.value,
                        progress=_CONFIG.value.log.progress)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"evaluate: {e}")
  for path in written:
    print(f"wrote {path}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "data"])
  app.run(main)
