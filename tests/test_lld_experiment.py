"""LLD testbed: the synthetic world, the warm-up's token layout and fit, the smoke pipeline."""

import json
import os
import sys

import numpy as np
import pytest
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import lld_experiment as lx  # noqa: E402
import lld_report  # noqa: E402
import lld_world as lw  # noqa: E402
from llds_jax import data, metrics as mlib, observations, rewards, sft  # noqa: E402
from llds_jax import search_pool, sharding as shd  # noqa: E402
from llds_jax.model import ModelConfig, Transformer  # noqa: E402

SMOKE_KEYS = ("reward/mean", "lld/preserving_logp", "lld/nonpreserving_logp", "entropy",
              "grad_norm", "grad_norm_max", "llds/active_frac", "loss/llds", "loss/llds_last",
              "rollout/searches_per_traj", "rollout/answered")


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
  """A small testbed (corpus, tokenizer, parquets) and its loaded pieces."""
  from transformers import AutoTokenizer
  out = str(tmp_path_factory.mktemp("testbed"))
  a = lx.parse_args(["--smoke"])
  lw.build_testbed(out, a)
  tok = AutoTokenizer.from_pretrained(os.path.join(out, "tokenizer"))
  return dict(dir=out, tok=tok, retriever=search_pool.load_retriever(os.path.join(out, "corpus.jsonl")),
              examples=data.load_examples(os.path.join(out, "warmup.parquet")))


def test_world_answers_are_only_in_the_right_document():
  people, docs = lw.make_world(seed=3, n_people=60)
  qs = lw.make_questions(people, two_hop_frac=0.5, seed=3)
  assert len({p["name"] for p in people}) == 60
  assert len(qs) == 60 * len(lw.QUESTIONS) + 30
  assert len({q.key for q in qs}) == len(qs)
  from llds_jax.retriever import BM25Index
  index = BM25Index.build(docs)
  for q in qs[:80]:
    # The ideal queries retrieve, top-ranked, the documents that hold each hop's fact ...
    hops = [index.retrieve([query], 3)[0] for query in q.queries]
    for query, docs_k in zip(q.queries, hops):
      assert docs_k[0].title == f'"{query.rsplit(" ", 1)[0]}"', (query, docs_k[0].title)
    assert q.gold in hops[-1][0].contents
    # ... and the question alone never names the answer.
    assert q.gold not in q.text


def test_trajectory_tokens_match_what_the_rollout_feeds(testbed):
  tok, ret = testbed["tok"], testbed["retriever"]
  import pyarrow.parquet as pq
  rows = pq.read_table(os.path.join(testbed["dir"], "warmup.parquet")).to_pylist()
  ex = testbed["examples"][0]
  queries = [rows[0]["extra_info"]["queries"][0], rows[1]["extra_info"]["queries"][0]]
  t = sft.build_trajectory(tok, ret, ex, queries, topk=3, max_obs_tokens=400)
  assert t.prompt_ids == data.encode_prompt(ex.messages, tok)
  ids, mask = np.array(t.response_ids), np.array(t.loss_mask)
  # Contiguous runs: action, observation, action, observation, action.
  edges = np.flatnonzero(np.diff(mask)) + 1
  runs = np.split(np.arange(len(ids)), edges)
  assert [mask[r[0]] for r in runs] == [1, 0, 1, 0, 1]
  passages = ret.retrieve_text(queries, 3)
  for run, text in zip(runs[1::2], passages):
    block = observations.information_block(text)
    assert ids[run].tolist() == observations.encode_observations(tok, [block], 400)[0]
  actions = [tok.decode(ids[r].tolist()) for r in runs[0::2]]
  assert actions[:2] == [sft.SEARCH_THINK.format(query=q) for q in queries]
  assert rewards.parse_action(actions[0]) == ("search", queries[0])
  full = tok.decode(ids.tolist(), skip_special_tokens=False)
  assert rewards.exact_match(full, ex.golds) == 1.0
  direct = sft.build_trajectory(tok, ret, ex, [], topk=3)
  assert min(direct.loss_mask) == 1.0
  assert rewards.parse_action(tok.decode(direct.response_ids))[0] == "answer"


def test_format_warmup_fits_the_pool(testbed):
  tok = testbed["tok"]
  cfg = ModelConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, rope_theta=1e4, dtype="float32",
                    param_dtype="float32")
  mesh = shd.make_mesh()
  model = shd.init_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
  embed = lambda m: np.array(nnx.split(m)[1]["embed"][...])  # noqa: E731
  before = embed(model)
  examples = testbed["examples"][:8]
  trained, losses = sft.format_warmup(model, tok, testbed["retriever"], examples, steps=40, lr=1e-2,
                                      batch_size=8, seed=0, mesh=mesh, max_obs_tokens=64,
                                      chunk_size=64)
  assert losses.shape == (40,) and np.all(np.isfinite(losses))
  assert losses[-5:].mean() < 0.5 * losses[:3].mean()
  # The caller's model is untouched (its buffers were not donated) and the result differs.
  np.testing.assert_array_equal(embed(model), before)
  assert not np.allclose(embed(trained), before)
  with pytest.raises(ValueError, match="batch_size"):
    sft.format_warmup(model, tok, testbed["retriever"], examples, steps=1, batch_size=3, mesh=mesh)


def test_smoke_experiment_writes_both_arms_and_the_figure(tmp_path):
  runs = lx.main(["--smoke", f"--outdir={tmp_path}", "--arms=grpo,llds_action"])
  assert runs == {arm: {0: str(tmp_path / "seed0" / arm)} for arm in ("grpo", "llds_action")}
  assert os.path.exists(tmp_path / "seed0" / "testbed" / "warm_model" / "model.safetensors")
  recs = {arm: mlib.read_metrics(os.path.join(wd[0], "metrics.jsonl")) for arm, wd in runs.items()}
  for arm, rs in recs.items():
    assert [r["step"] for r in rs] == [1, 2], arm
    for key in SMOKE_KEYS:
      assert all(np.isfinite(float(r[key])) for r in rs), (arm, key)
  assert all(r["loss/llds"] == 0.0 for r in recs["grpo"])
  assert max(r["loss/llds_last"] for r in recs["llds_action"]) > 0  # acts after minibatch 1
  # Matched seeds: both arms start from the same rollout batch.
  assert recs["grpo"][0]["rollout/tokens"] == recs["llds_action"][0]["rollout/tokens"]
  # summary.json: {arm: {seed: {series: one float per step}}}, the metrics' own values.
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert set(summary) == {"grpo", "llds_action"} and set(summary["grpo"]) == {"0"}
  for key in ("reward", "preserving_logp", "entropy", "grad_norm"):
    assert summary["grpo"]["0"][key] == [r[lld_report.SERIES[key]] for r in recs["grpo"]], key
  assert "| llds_action | 0 | 2 |" in (tmp_path / "summary.md").read_text()
  png = tmp_path / "lld_comparison.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_arc_reads_rise_peak_and_collapse():
  k = 10
  reward = [0.2] * 10 + [0.5] * 20 + [0.05] * 20  # rise by 0.3, then collapse
  logp = [-0.1] * 25 + [-2.0] * 25
  s = dict(reward=reward, preserving_logp=logp, entropy=[0.1] * 45 + [5.0] * 5,
           grad_norm_max=[1.0] * 20 + [9.0] + [1.0] * 29)
  out = lld_report.arc(s, k)
  assert out["start"] == pytest.approx(0.2) and out["peak"] == pytest.approx(0.5)
  assert out["rise"] == pytest.approx(0.3) and out["final"] == pytest.approx(0.05)
  assert out["collapsed"] == 1.0 and out["peak_step"] == 20  # first window that reaches 0.5
  assert out["logp_start"] == pytest.approx(-0.1) and out["logp_final"] == pytest.approx(-2.0)
  assert out["entropy_max"] == 5.0 and out["grad_norm_max_step"] == 21
  steady = lld_report.arc(dict(s, reward=[0.2] * 10 + [0.5] * 40), k)
  assert steady["collapsed"] == 0.0 and steady["final"] == pytest.approx(0.5)
  # A collapse the policy partly recovers from still counts: the worst window after the peak.
  dip = lld_report.arc(dict(s, reward=[0.2] * 10 + [0.6] * 10 + [0.0] * 15 + [0.4] * 15), k)
  assert dip["final"] == pytest.approx(0.4) and dip["trough"] == pytest.approx(0.0)
  assert dip["collapsed"] == 1.0 and dip["trough_step"] == 30  # first all-zero window
  assert dip["logp_at_trough"] == pytest.approx(-1.05)  # steps 21-30


def test_summary_has_the_mean_curve_and_the_issue_criteria():
  def flat(r):
    return dict(reward=r, preserving_logp=[-0.1] * len(r), entropy=[0.1] * len(r),
                grad_norm_max=[1.0] * len(r))
  # GRPO: seed 0 rises 0.3 then collapses; seed 1 rises 0.1 at another step, no collapse.
  grpo = {"0": flat([0.2] * 10 + [0.5] * 10 + [0.0] * 20),
          "1": flat([0.2] * 20 + [0.3] * 10 + [0.3] * 10)}
  llds = {"0": flat([0.2] * 10 + [0.6] * 30), "1": flat([0.2] * 10 + [0.25] * 30)}
  curve = lld_report.mean_series(grpo)["reward"]
  assert curve[15] == pytest.approx(0.35) and len(curve) == 40
  md = lld_report.summarize({"grpo": grpo, "llds_action": llds})
  assert "| grpo | mean curve | | 0.2 | 0.35 |" in md  # not the mean of the seeds' peaks (0.4)
  assert "- GRPO rises ≥ 0.15: 0: met, 1: NOT met; mean 0.200" in md
  assert "- GRPO collapses (a window < ⅓ of its peak): 1 of 2 seeds" in md
  assert "- LLDS rises ≥ GRPO: 0: met, 1: NOT met; mean 0.225 vs 0.200: met" in md
  assert "- LLDS final ≥ GRPO peak: 0: met, 1: NOT met; mean 0.425 vs 0.400: met" in md
  assert "- LLDS does not collapse: 0 of 2 seeds collapse" in md


def test_set_overrides_testbed_config_fields_and_refuses_unknown_ones():
  a = lx.parse_args(["--set=rollout.max_turns=2", "--set=rl.llds_gate=token",
                     "--set=opt.lr=5e-4"])
  c = lx.testbed_config("/tmp/testbed", a)
  assert (c.rollout.max_turns, c.rl.llds_gate, c.opt.lr) == (2, "token", 5e-4)
  for bad in ("--set=rollout.nope=1", "--set=rollout.max_turns=abc", "--set=rollout"):
    with pytest.raises(SystemExit):
      lx.parse_args([bad])


def _chains(log, gate):
  """3 seeds × (warm-up, 2 arms) of fakes that log ("start"/"end", task) in order. Seed 2's
  warm-up waits (≤ 20 s) for `gate`, which seed 0's first arm sets: only a pipelined schedule
  runs an arm while another seed is still warming up."""
  def warm(s):
    log.append(("start", f"warm{s}"))
    if s == 2 and not gate.wait(20):
      raise TimeoutError("seed 0's arms waited for every warm-up")
    log.append(("end", f"warm{s}"))

  def arm(s, name):
    log.append(("start", f"{name}{s}"))
    gate.set()
    log.append(("end", f"{name}{s}"))
  return [((warm, (s,)), [(arm, (s, name)) for name in ("grpo", "llds")]) for s in range(3)]


def test_run_all_starts_a_seeds_arms_after_its_own_warm_up_only():
  import threading
  from multiprocessing.pool import ThreadPool
  log, gate = [], threading.Event()
  lx.run_all(_chains(log, gate), jobs=2, pool=ThreadPool(2))
  ran = {task for _, task in log}
  assert ran == {f"{t}{s}" for s in range(3) for t in ("warm", "grpo", "llds")}
  assert len(log) == 2 * len(ran)  # each task once
  for s in range(3):
    for name in ("grpo", "llds"):  # an arm needs its own seed's warm-up
      assert log.index(("end", f"warm{s}")) < log.index(("start", f"{name}{s}"))
  assert log.index(("start", "grpo0")) < log.index(("end", "warm2"))
  # Serially (jobs=1): each seed's warm-up, then its arms, in order.
  log.clear()
  gate.set()
  lx.run_all(_chains(log, gate), jobs=1)
  assert [t for e, t in log if e == "start"] == [
      f"{t}{s}" for s in range(3) for t in ("warm", "grpo", "llds")]


def test_run_all_stops_on_a_failed_warm_up_without_running_its_arms():
  from multiprocessing.pool import ThreadPool
  ran = []

  def fail():
    raise ValueError("warm-up diverged")
  chains = [((fail, ()), [(ran.append, ("arm",))])]
  with pytest.raises(ValueError, match="warm-up diverged"):
    lx.run_all(chains, jobs=2, pool=ThreadPool(2))
  assert ran == []


def test_rl_seed_offset_draws_rl_runs_on_an_earlier_runs_worlds(tmp_path):
  earlier, new = tmp_path / "earlier", tmp_path / "new"
  (earlier / "seed2" / "testbed" / "warm_model").mkdir(parents=True)
  (earlier / "seed2" / "testbed" / "warm_model" / "config.json").write_text("{}")
  a = lx.parse_args([f"--outdir={new}", f"--testbeds={earlier}", "--seeds=2",
                     "--rl_seed_offset=1000"])
  testbed = lx.testbed_dir(a, 2)
  assert testbed == str(earlier / "seed2" / "testbed")
  c = lx.arm_config("grpo", testbed, str(new / "seed2" / "grpo"), lx.with_seed(a, 2))
  assert c.seed == 1002 and c.model.path == os.path.join(testbed, "warm_model")
  assert lx.with_seed(a, 2).seed == 2  # the world and the warm-up keep the seed
  assert lx.testbed_dir(lx.parse_args([f"--outdir={new}"]), 0) == str(new / "seed0" / "testbed")
  with pytest.raises(SystemExit):  # no warm model for seed 3 there
    lx.parse_args([f"--outdir={new}", f"--testbeds={earlier}", "--seeds=2,3"])
  # An arm dir made with another RL seed is not silently reused as this draw.
  (new / "seed2" / "grpo").mkdir(parents=True)
  (new / "seed2" / "grpo" / "config.json").write_text(json.dumps({"seed": 2}))
  with pytest.raises(ValueError, match="RL seed 2, not 1002"):
    lx.run_arm("grpo", testbed, str(new / "seed2" / "grpo"), lx.with_seed(a, 2))
