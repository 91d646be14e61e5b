"""User tools on CPU: HF export round trip, per-source evaluation tables, NaN refusal, plots.

One tiny training run (in-process, module-scoped) feeds the export, checkpoint-evaluation and plot
tests. Evaluation EM is checked on a hand-built "bigram" model whose greedy output is always
`<answer> Paris </answer>`, so per-source EM is known exactly from the fixture's gold answers.
"""

import tool_loader
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers
from flax import nnx

from llds_jax import data, evaluation, hf_io, plots, restore, rewards, rollout, trainer
from llds_jax.model import ModelConfig, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "tests", "testdata", "tiny_tokenizer")
ANSWER = "<answer> Paris </answer>"
# (data_source, golds): the bigram model answers "Paris"; --limit 2 drops the last bamboogle row.
FIXTURE = [("nq", ["Paris"]), ("nq", ["paris", "Lutetia"]), ("hotpotqa", ["Paris"]),
           ("hotpotqa", ["London"]), ("bamboogle", ["London"]), ("bamboogle", ["Paris France"]),
           ("bamboogle", ["Paris"])]
EXPECTED = {  # source: (n, em, f1); "Paris" vs "Paris France" has F1 2/3
    "bamboogle": (2, 0.0, 1 / 3), "hotpotqa": (2, 0.5, 0.5), "nq": (2, 1.0, 1.0),
    "all": (6, 0.5, 11 / 18)}


_load = tool_loader.load


export_hf = _load("tools/export_hf.py", "export_hf")
evaluate_tool = _load("tools/evaluate.py", "evaluate_tool")
plot_tool = _load("tools/plot.py", "plot_tool")


def _config(workdir=""):
  """configs/tiny.py shrunk as in test_trainer.py: one step is a few seconds after compilation."""
  c = _load("configs/tiny.py", "tiny_config").get_config()
  c.workdir = str(workdir)
  c.total_steps = 1
  c.model.format_warmup_steps = 0
  c.rollout.prompts, c.rollout.group_size, c.rollout.max_turns = 2, 4, 1
  c.rollout.max_turn_tokens, c.rollout.max_obs_tokens = 12, 24
  c.rl.minibatch_size = c.rl.micro_batch_size = 4
  c.mesh.data = c.mesh.fsdp = c.mesh.tensor = 2
  c.log.eval_every, c.log.progress, c.log.tensorboard = 0, False, False
  return c


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  trainer.train(_config(workdir))
  return str(workdir)


@pytest.fixture(scope="module")
def fixture_parquet(tmp_path_factory):
  rows = [{"data_source": src, "question": f"Which city is number {i}", "ability": "fact-reasoning",
           "reward_model": {"ground_truth": {"target": golds}, "style": "rule"},
           "extra_info": {"index": i, "split": "test"}} for i, (src, golds) in enumerate(FIXTURE)]
  path = str(tmp_path_factory.mktemp("data") / "mixed_test.parquet")
  pq.write_table(pa.Table.from_pylist(rows), path)
  return path


def _bigram_model(tokenizer, weight: float) -> Transformer:
  """A 1-layer model whose next token depends only on the current one: prompt end → ANSWER.

  All block weights are zero, so the residual stream is the embedding: token a gets its own
  one-hot direction and `lm_head` maps that direction to a's successor with logit 8·weight.
  """
  prompt_end = data.encode_prompt([{"role": "user", "content": "?"}], tokenizer)[-1]
  chain = [prompt_end] + tokenizer.encode(ANSWER, add_special_tokens=False)
  successor = {}
  for a, b in zip(chain, chain[1:]):
    assert successor.setdefault(a, b) == b, "ANSWER is not a deterministic bigram chain"
  cfg = ModelConfig.from_hf(dict(
      architectures=["Qwen2ForCausalLM"], vocab_size=1000, hidden_size=64, intermediate_size=128,
      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6,
      tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id))
  embed = np.zeros((cfg.vocab_size, cfg.hidden_size), np.float32)
  head = np.zeros((cfg.hidden_size, cfg.vocab_size), np.float32)
  for slot, (a, b) in enumerate(successor.items()):
    embed[a, slot] = 1.0
    head[slot, b] = weight
  graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
  model = nnx.merge(graphdef, jax.tree.map(jnp.zeros_like, state))
  model.embed[...], model.lm_head[...] = jnp.asarray(embed), jnp.asarray(head)
  model.final_norm[...] = jnp.ones(cfg.hidden_size)
  return model


@pytest.fixture(scope="module")
def bigram_hf(tmp_path_factory):
  tokenizer = transformers.AutoTokenizer.from_pretrained(TOKENIZER)
  # Weight 1.2: greedy always follows the chain, sampling (T=1) follows it ~93% per token.
  model = _bigram_model(tokenizer, weight=1.2)
  path = str(tmp_path_factory.mktemp("bigram_hf"))
  hf_io.save_pretrained(model, model.cfg, path, tokenizer=tokenizer)
  return path


# ---------------------------------------------------------------------------------------------
# export_hf


def _raw_state(workdir, step):
  with ocp.PyTreeCheckpointer() as ckptr:
    return ckptr.restore(os.path.join(workdir, "checkpoints", str(step), "state"))


def test_export_round_trip_matches_transformers(run_dir, tmp_path):
  out = str(tmp_path / "hf")
  res = export_hf.export(run_dir, out, check=True)
  assert res["step"] == 1 and res["max_logit_diff"] <= 1e-4
  run = restore.load_run(run_dir)
  # The restored policy is exactly what the trainer checkpointed (read here without a target).
  raw = _raw_state(run_dir, 1)["params"]
  np.testing.assert_array_equal(np.asarray(run.model.layers[1].down[...]),
                                np.asarray(raw["layers"]["1"]["down"]["value"]))
  np.testing.assert_array_equal(np.asarray(run.model.embed[...]),
                                np.asarray(raw["embed"]["value"]))
  ids = np.random.RandomState(1).randint(0, run.cfg.vocab_size, (2, 17))
  ours = np.asarray(run.model(jnp.asarray(ids)))
  tm = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = tm(torch.tensor(ids)).logits.numpy()
  assert np.abs(ours - theirs).max() <= 1e-4
  for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"):
    assert os.path.isfile(os.path.join(out, f)), f
  tok, orig = transformers.AutoTokenizer.from_pretrained(out), run.tokenizer
  text = "Question: who wrote <search> Hamlet </search>?"
  assert tok.encode(text) == orig.encode(text)
  messages = [{"role": "user", "content": data.make_prompt("Who wrote Hamlet")}]
  assert data.encode_prompt(messages, tok) == data.encode_prompt(messages, orig)  # chat template
  gen = json.load(open(os.path.join(out, "generation_config.json")))
  assert gen["eos_token_id"] == orig.eos_token_id  # filled from the tokenizer (random-init run)
  assert tm.generation_config.eos_token_id == orig.eos_token_id


def test_export_cli_bfloat16_sharded(run_dir, tmp_path):
  out = str(tmp_path / "hf16")
  export_hf.main(["--workdir", run_dir, "--out", out, "--dtype", "bfloat16", "--step", "1",
                  "--max_shard_gb", "0.0001"])  # ~100 KiB shards; transformers reload verified
  index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 1 and not os.path.exists(os.path.join(out, "model.safetensors"))
  with open(os.path.join(out, shards[0]), "rb") as f:  # safetensors: u64 header size, JSON header
    header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
  assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}


def test_export_refuses_nonfinite_checkpoint(run_dir, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(run_dir, workdir)
  state = _raw_state(workdir, 1)
  down = state["params"]["layers"]["1"]["down"]
  down["value"] = down["value"].at[3, 5].set(jnp.nan)
  norm = state["params"]["final_norm"]
  norm["value"] = norm["value"].at[0].set(jnp.inf)
  with ocp.PyTreeCheckpointer() as ckptr:
    ckptr.save(os.path.join(workdir, "checkpoints", "2", "state"), state)
  out = str(tmp_path / "hf")
  with pytest.raises(ValueError, match=r"refusing to export .* step 2: non-finite weights in 2 "
                     r"parameter\(s\): final_norm \(0 NaN, 1 inf\), "
                     r"layers\.1\.down \(1 NaN, 0 inf\)"):
    export_hf.export(workdir, out, check=False)
  assert not os.path.exists(os.path.join(out, "model.safetensors"))
  with pytest.raises(SystemExit, match="export_hf: refusing to export"):
    export_hf.main(["--workdir", workdir, "--out", out, "--no-verify"])
  export_hf.export(workdir, out, step=1, check=False)  # the earlier, finite step still exports
  assert os.path.isfile(os.path.join(out, "model.safetensors"))


def test_export_rejects_bad_arguments(run_dir, tmp_path):
  with pytest.raises(ValueError, match=r"step 9: no checkpoint .* \(have \[1\]\)"):
    export_hf.export(run_dir, str(tmp_path / "x"), step=9)
  with pytest.raises(ValueError, match="is the run directory"):
    export_hf.export(run_dir, run_dir)
  with pytest.raises(FileNotFoundError, match="config.json: missing"):
    export_hf.export(str(tmp_path), str(tmp_path / "x"))


def test_export_relative_workdir_and_corrupt_checkpoint(run_dir, tmp_path):
  out = str(tmp_path / "hf")
  export_hf.export(os.path.relpath(run_dir), out, step=1, check=False)
  assert os.path.isfile(os.path.join(out, "model.safetensors"))
  copy = tmp_path / "run"
  shutil.copytree(run_dir, copy)
  arrays = [os.path.join(r, f) for r, _, fs in os.walk(copy / "checkpoints" / "1" / "state")
            for f in fs if os.path.basename(r) == "d"]
  biggest = max(arrays, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.seek(os.path.getsize(biggest) // 2)
    f.write(b"\0" * 4096)
  with pytest.raises(ValueError, match=f"step 1 of .* is corrupt: {biggest}: sha256 differs"):
    export_hf.export(str(copy), str(tmp_path / "x"), step=1, check=False)


# ---------------------------------------------------------------------------------------------
# evaluate


def _recompute(records):
  """Per-source (n, EM, F1) straight from the saved responses and golds."""
  out = {}
  for src in sorted({r["data_source"] for r in records}) + ["all"]:
    rows = [r for r in records if src in ("all", r["data_source"])]
    out[src] = (len(rows), np.mean([rewards.em_of(r["answer"], r["golds"]) for r in rows]),
                np.mean([rewards.f1_of(r["answer"], r["golds"]) for r in rows]))
  return out


def test_evaluate_hf_table_matches_records(bigram_hf, fixture_parquet, tmp_path):
  c = _config()
  table, records, written = evaluate_tool.run(c, data=fixture_parquet, hf=bigram_hf, limit=2,
                                              batch_size=4, out=str(tmp_path), progress=False)
  saved = json.load(open(tmp_path / "mixed_test.json"))
  assert written == [str(tmp_path / "mixed_test.json"), str(tmp_path / "mixed_test.md")]
  assert saved["table"] == table and len(saved["records"]) == 6
  assert saved["settings"]["greedy"] and saved["settings"]["max_turns"] == 4
  assert list(saved["table"]) == ["bamboogle", "hotpotqa", "nq", "all"]
  recomputed = _recompute(saved["records"])
  for src, (n, em, f1) in EXPECTED.items():
    row = saved["table"][src]
    assert (row["n"], row["em"], row["f1"]) == pytest.approx((n, em, f1)), src
    assert (row["n"], row["em"], row["f1"]) == pytest.approx(recomputed[src]), src
    assert row["answer_rate"] == 1.0 and row["turns"] == 1.0
    assert row["invalid_action_rate"] == 0.0 and row["searches"] == 0.0
  assert all(r["answer"] == "Paris" and r["finish_reason"] == "answer" for r in saved["records"])
  md = open(tmp_path / "mixed_test.md").read()
  assert "| hotpotqa | 2 | 0.500 | 0.500 |" in md and bigram_hf in md


def test_evaluate_checkpoint(run_dir, fixture_parquet, tmp_path):
  c = _config()
  # A relative run directory works (orbax alone would refuse it with a misleading message).
  rel = os.path.relpath(run_dir)
  table, records, _ = evaluate_tool.run(c, data=fixture_parquet, checkpoint=f"{rel}:1",
                                        limit=1, max_turns=1, batch_size=8, out=str(tmp_path),
                                        progress=False)
  saved = json.load(open(tmp_path / "mixed_test.json"))
  assert saved["settings"]["weights"] == f"{run_dir} step 1"
  assert [r["data_source"] for r in records] == ["nq", "hotpotqa", "bamboogle"]
  for src, (n, em, f1) in _recompute(saved["records"]).items():
    assert (table[src]["n"], table[src]["em"], table[src]["f1"]) == pytest.approx((n, em, f1))
  for src in ("nq", "all"):
    rows = [r for r in records if src in ("all", r["data_source"])]
    assert table[src]["invalid_action_rate"] == pytest.approx(
        sum(r["invalid_actions"] for r in rows) / sum(r["turns"] for r in rows))


def test_summarize_and_limits_by_hand():
  rec = lambda src, em, f1, turns, bad, ans: dict(  # noqa: E731
      data_source=src, em=em, f1=f1, searches=turns - bad - ans, turns=turns, invalid_actions=bad,
      answered=ans)
  table = evaluation.summarize([rec("nq", 1.0, 1.0, 2, 0, 1), rec("nq", 0.0, 0.5, 4, 3, 0),
                                rec("popqa", 0.0, 0.0, 1, 0, 1)])
  assert list(table) == ["nq", "popqa", "all"]
  assert table["nq"] == dict(n=2, em=0.5, f1=0.75, searches=1.0, invalid_action_rate=0.5,
                             answer_rate=0.5, turns=3.0)
  assert table["all"]["invalid_action_rate"] == pytest.approx(3 / 7)
  assert table["all"]["em"] == pytest.approx(1 / 3)
  exs = [data.Example(s, [], ["x"], i, None, i) for i, s in enumerate("aabbbca")]
  assert [e.index for e in evaluation.take_per_source(exs, 2)] == [0, 1, 2, 3, 5]
  assert len(evaluation.take_per_source(exs, 0)) == 7
  assert evaluate_tool.parse_checkpoint("gs://b/run:12") == ("gs://b/run", 12)
  assert evaluate_tool.parse_checkpoint("/tmp/run") == ("/tmp/run", None)


def test_evaluate_fails_loud(fixture_parquet, tmp_path):
  c = _config()
  with pytest.raises(ValueError, match="--hf and --gguf: give at most one"):
    evaluate_tool.run(c, data=fixture_parquet, hf="a", gguf="b", progress=False)
  with pytest.raises(FileNotFoundError, match="--data .*nope.parquet: no such file"):
    evaluate_tool.run(c, data=str(tmp_path / "nope.parquet"), progress=False)
  with pytest.raises(FileNotFoundError, match="--hf .*: no such directory"):
    evaluate_tool.run(c, data=fixture_parquet, hf=str(tmp_path / "none"), progress=False)
  empty = str(tmp_path / "empty.parquet")
  pq.write_table(pa.Table.from_pylist([{"data_source": "nq"}]).slice(0, 0), empty)
  with pytest.raises(ValueError, match="empty.parquet: no rows"):  # not a NaN table
    evaluate_tool.run(c, data=empty, progress=False)
  with pytest.raises(ValueError, match="no questions to evaluate"):
    evaluation.evaluate(None, None, None, [], rollout_cfg=rollout.RolloutConfig(), progress=False)
  with pytest.raises(FileNotFoundError, match="--checkpoint nowhere: no such run directory"):
    evaluate_tool.run(c, data=fixture_parquet, checkpoint="nowhere", progress=False)


# ---------------------------------------------------------------------------------------------
# build_index


def test_build_index_replaces_atomically_and_failed_build_leaves_nothing(tmp_path):
  import argparse
  build_index = _load("tools/build_index.py", "build_index_tool")
  corpus, out = tmp_path / "corpus.jsonl", tmp_path / "index"
  args = lambda: argparse.Namespace(corpus=str(corpus), out=str(out), variant="okapi", k1=None,  # noqa: E731
                                    b=None, epsilon=0.25, quiet=True, build_memory_mb=None)
  corpus.write_text('{"id": "0", "contents": "\\"A\\"\\nalpha"}\n'
                    '{"id": "1", "contents": "\\"B\\"\\nbeta"}\n')
  build_index.build(args())
  first = sorted(os.listdir(out))
  corpus.write_text('{"id": "0", "contents": "a"}\n{"id": "0", "contents": "b"}\n')
  with pytest.raises(SystemExit, match="corpus.jsonl:2: duplicate document id"):
    build_index.build(args())
  assert sorted(os.listdir(tmp_path)) == ["corpus.jsonl", "index"]  # no half-built directory
  assert sorted(os.listdir(out)) == first
  from llds_jax.retriever import BM25Index
  assert len(BM25Index.load(str(out)).store) == 2  # the working index survived


# ---------------------------------------------------------------------------------------------
# plot

PANELS = ["reward", "losses", "entropy", "grad_norm", "lld", "rollout"]


def _pngs(out):
  import matplotlib.image
  files = sorted(f for f in os.listdir(out) if f.endswith(".png"))
  for f in files:
    h, w, _ = matplotlib.image.imread(os.path.join(out, f)).shape
    assert h > 100 and w > 100, f
  return files


def test_plot_real_metrics(run_dir, tmp_path):
  metrics = tmp_path / "metrics.jsonl"
  shutil.copy(os.path.join(run_dir, "metrics.jsonl"), metrics)
  written = plots.plot(str(metrics), str(tmp_path / "plots"))
  # Every panel but validation (the run did not validate) finds its keys in the trainer's output.
  assert _pngs(tmp_path / "plots") == sorted(f"{p}.png" for p in PANELS + ["overview"])
  assert written[-1].endswith("overview.png")
  rec = json.loads(metrics.read_text().splitlines()[0])
  with open(metrics, "a") as f:
    f.write(json.dumps({**rec, "step": 2, "grad_norm": "nan", "val/nq/em": 0.25,
                        "val/all/em": 0.25, "val/all/f1": 0.3}) + "\n")
  plot_tool.main([str(metrics), "--out", str(tmp_path / "p2"), "--smooth", "0.5"])
  assert "validation.png" in _pngs(tmp_path / "p2")


def test_plot_skips_missing_keys_and_fails_loud(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "reward/mean": 0.1}\n\n{"step": 2, "reward/mean": 0.3}\n')
  plots.plot(str(path), str(tmp_path / "out"))
  assert _pngs(tmp_path / "out") == ["overview.png", "reward.png"]
  recs = [{"step": 1, "lld/nonpreserving_logp": 0.0, "reward/mean": 0.0},
          {"step": 2, "lld/nonpreserving_logp": -2.5, "reward/mean": "inf"}, {"step": 3}]
  assert np.isnan(plots.series(recs, "lld/nonpreserving_logp")[1]).tolist() == [True, False]
  assert plots.series(recs, "reward/mean")[1][0] == 0.0  # a zero reward is a value
  assert np.isnan(plots.series(recs, "reward/mean")[1][1])
  for text, match in [("", "no metric records"),
                      ('{"step": 1}\n{"step": 2, "reward/mean": 0.1\n',
                       r"metrics.jsonl:2: invalid JSON"),
                      ('{"step": 1}\n[1, 2]\n', r"metrics.jsonl:2: not a metrics record"),
                      ('{"step": 1, "foo": 2}\n', "none of the plotted metrics")]:
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
      plots.plot(str(path), str(tmp_path / "bad"))
  with pytest.raises(SystemExit, match="plot: .*no metric records"):
    path.write_text("\n")
    plot_tool.main([str(path)])
