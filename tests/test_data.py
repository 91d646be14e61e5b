"""Data: Search-R1 template, parquet reader and its errors, resumable iterator, prompt encoding, assets."""

import tool_loader
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import transformers

from llds_jax import assets, corpus, data

TESTDATA = os.path.join(os.path.dirname(__file__), "testdata")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# PAPER.md §D.2, typed out independently of llds_jax.data.
EXPECTED_PROMPT = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first every time "
    "you get new information. After reasoning, if you find you lack some knowledge, you can call a search "
    "engine by <search> query </search> and it will return the top searched results between <information> "
    "and </information>. You can search as many times as your want. If you find no further external "
    "knowledge needed, you can directly provide the answer inside <answer> and </answer>, without "
    "detailed illustrations. For example, <answer> Beijing </answer>. Question: Who wrote Hamlet?\n")


def _row(i, source="nq", question="Who wrote Hamlet", golds=("Shakespeare",), with_prompt=True):
  row = {"data_source": source, "question": question, "ability": "fact-reasoning",
         "reward_model": {"style": "rule", "ground_truth": {"target": list(golds)}},
         "extra_info": {"split": "train", "index": i}}
  if with_prompt:
    row["prompt"] = [{"role": "user", "content": data.make_prompt(question)}]
  return row


def _write(tmp_path, rows, name="d.parquet"):
  path = str(tmp_path / name)
  pq.write_table(pa.Table.from_pylist(rows), path)
  return path


def test_make_prompt():
  assert data.make_prompt("Who wrote Hamlet?") == EXPECTED_PROMPT
  assert data.make_prompt("  Who wrote Hamlet \n") == EXPECTED_PROMPT
  assert "\n" not in data.SEARCH_R1_TEMPLATE[:-1]
  with pytest.raises(ValueError, match="empty question"):
    data.make_prompt("   ")


def test_load_committed_fanoutqa():
  examples = data.load_examples(os.path.join(TESTDATA, "fanoutqa_answerable.parquet"))
  assert len(examples) == 83
  assert [e.uid for e in examples] == list(range(83))
  ex = examples[0]
  assert ex.data_source == "fanoutqa" and ex.golds == ["Asia"] and ex.index == 0
  assert ex.messages == [{"role": "user", "content": data.make_prompt(ex.question)}]


def test_question_only_rows_get_the_template(tmp_path):
  path = _write(tmp_path, [_row(0, with_prompt=False), _row(1, question="capital of France?",
                                                             golds=["Paris", "paris"], with_prompt=False)])
  a, b = data.load_examples(path)
  assert a.messages == [{"role": "user", "content": EXPECTED_PROMPT}]
  assert b.golds == ["Paris", "paris"] and b.messages[0]["content"].endswith("capital of France?\n")


@pytest.mark.parametrize("column", ["data_source", "reward_model", "extra_info"])
def test_missing_column_is_named(tmp_path, column):
  rows = [{k: v for k, v in _row(0).items() if k != column}]
  path = _write(tmp_path, rows)
  with pytest.raises(ValueError, match=f"d.parquet: missing column '{column}'"):
    data.load_examples(path)


def test_missing_prompt_and_question_columns(tmp_path):
  rows = [{k: v for k, v in _row(0).items() if k not in ("prompt", "question")}]
  with pytest.raises(ValueError, match="missing column 'prompt'"):
    data.load_examples(_write(tmp_path, rows))


def test_missing_nested_field_names_row(tmp_path):
  bad = _row(1)
  bad["reward_model"] = {"style": "rule", "ground_truth": {"other": ["x"]}}
  with pytest.raises(ValueError, match=r"row 1: missing field 'reward_model.ground_truth.target'"):
    data.load_examples(_write(tmp_path, [_row(0), bad]))


def test_group_ids_do_not_collide_across_sources(tmp_path):
  # Official data restarts `index` per source; (nq, 0) and (hotpotqa, 0) must be different groups.
  path = _write(tmp_path, [_row(0, "nq"), _row(1, "nq"), _row(0, "hotpotqa")])
  examples = data.load_examples(path)
  assert len({e.uid for e in examples}) == 3
  with pytest.raises(ValueError, match="duplicate"):
    data.load_examples(_write(tmp_path, [_row(0, "nq"), _row(0, "nq")], "dup.parquet"))
  rows, gids = data.repeat_groups(examples[:2], 3)
  assert gids.tolist() == [0, 0, 0, 1, 1, 1] and rows[3] is examples[1]


def _examples(n):
  return [data.Example("s", [], ["g"], i, f"q{i}", i) for i in range(n)]


def _uids(batch):
  return [e.uid for e in batch]


def test_iterator_epochs_are_deterministic_permutations():
  it = data.PromptIterator(_examples(10), batch_size=3, seed=7)
  epoch0 = [_uids(next(it)) for _ in range(3)]  # 9 of 10; the remainder is dropped
  assert it.state() == {"epoch": 0, "position": 9}
  epoch1 = [_uids(next(it)) for _ in range(3)]
  assert it.state() == {"epoch": 1, "position": 9}
  assert len(set(sum(epoch0, []))) == 9 and sum(epoch0, []) != sum(epoch1, [])
  again = data.PromptIterator(_examples(10), batch_size=3, seed=7)
  assert [_uids(next(again)) for _ in range(6)] == epoch0 + epoch1
  other = data.PromptIterator(_examples(10), batch_size=3, seed=8)
  assert [_uids(next(other)) for _ in range(3)] != epoch0


def test_iterator_resume_is_exact():
  it = data.PromptIterator(_examples(23), batch_size=4, seed=0)
  for _ in range(7):
    next(it)
  state = json.loads(json.dumps(it.state()))
  expected = [_uids(next(it)) for _ in range(9)]
  resumed = data.PromptIterator(_examples(23), batch_size=4, seed=0)
  resumed.restore(state)
  assert [_uids(next(resumed)) for _ in range(9)] == expected
  with pytest.raises(ValueError, match="invalid iterator state"):
    resumed.restore({"epoch": 0, "position": 99})


def test_iterator_no_shuffle_keep_last():
  it = data.PromptIterator(_examples(5), batch_size=2, shuffle=False, drop_last=False)
  assert [_uids(next(it)) for _ in range(4)] == [[0, 1], [2, 3], [4], [0, 1]]
  with pytest.raises(ValueError, match="batch_size 6"):
    data.PromptIterator(_examples(5), batch_size=6)


def test_encode_prompt_uses_chat_template():
  tok = transformers.AutoTokenizer.from_pretrained(os.path.join(TESTDATA, "tiny_tokenizer"))
  messages = [{"role": "user", "content": data.make_prompt("Who wrote Hamlet?")}]
  ids = data.encode_prompt(messages, tok)
  assert isinstance(ids, list) and all(type(t) is int for t in ids)
  text = tok.decode(ids)
  assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                  f"assistant.<|im_end|>\n<|im_start|>user\n{EXPECTED_PROMPT}<|im_end|>\n"
                  "<|im_start|>assistant\n")
  assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_asset_paths(tmp_path, monkeypatch):
  monkeypatch.setenv("LLDS_ASSETS", str(tmp_path))
  paths = assets.asset_paths(require=())
  assert paths["wiki_corpus"].startswith(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="fetch_assets.py"):
    assets.asset_paths()
  os.makedirs(paths["wiki_index"])  # a directory without meta.json is not a finished index
  with pytest.raises(FileNotFoundError, match="wiki_index"):
    assets.asset_paths(require=["wiki_index"])
  with pytest.raises(KeyError, match="unknown assets"):
    assets.asset_paths(require=["nope"])


def _fetch_assets_module():
  return tool_loader.load("tools/fetch_assets.py", "fetch_assets")


def test_fanoutqa_conversion(tmp_path):
  fa = _fetch_assets_module()
  leaf = lambda i, ans, title: {"id": f"l{i}", "question": f"q{i}", "decomposition": [],
                                "answer": ans, "depends_on": [], "evidence": {"title": title}}
  dev = [{"id": "top1", "question": "Q", "answer": {}, "decomposition": [
      leaf(1, "Liverpool", "The Beatles"), leaf(2, ["a", "b"], "X"),
      {"id": "mid", "question": "m", "answer": 3, "evidence": None,
       "decomposition": [leaf(3, 1631, "Taj Mahal"), leaf(4, True, "Nowhere")]}]}]
  summaries = {"The Beatles": "A band from Liverpool.", "Taj Mahal": "A mausoleum."}
  leaves = fa.fanout_leaves(dev, summaries)
  assert [l["question"] for l in leaves] == ["q1", "q3", "q4"]  # list answers and inner nodes dropped
  assert [l["golds"] for l in leaves] == [["Liverpool"], ["1631"], ["yes", "true"]]
  assert [(l["in_corpus"], l["answerable"]) for l in leaves] == [(True, True), (True, False),
                                                                 (False, False)]
  path = str(tmp_path / "x.parquet")
  fa.write_parquet(leaves, "train", path)
  examples = data.load_examples(path)
  assert [e.golds for e in examples] == [l["golds"] for l in leaves]
  assert examples[1].messages[0]["content"] == data.make_prompt("q3")
  assert fa._split_of("top1") == fa._split_of("top1") in ("train", "test")


def test_fetch_assets_pip_failure_is_explained(monkeypatch, tmp_path):
  fa = _fetch_assets_module()
  failed = fa.subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found")
  monkeypatch.setattr(fa.subprocess, "run", lambda *a, **k: failed)
  with pytest.raises(SystemExit, match=r"pip could not install fanoutqa==1.1.1 .*index reachable"):
    fa.pip_install(["fanoutqa==1.1.1"], str(tmp_path))


@pytest.mark.parametrize("golds,with_good_row", [
    ([], True), ([None], True), ([""], True), (["  the "], True), ([float("nan")], False),
    ([3], False)])
def test_bad_golds_name_file_and_row(tmp_path, golds, with_good_row):
  rows = ([_row(0)] if with_good_row else []) + [_row(1, golds=golds)]
  row_no = len(rows) - 1
  with pytest.raises(ValueError, match=rf"d.parquet: row {row_no}: reward_model.ground_truth"):
    data.load_examples(_write(tmp_path, rows))


def test_empty_file_question_and_prompt_are_named(tmp_path):
  empty = str(tmp_path / "empty.parquet")
  pq.write_table(pa.Table.from_pylist([_row(0)]).slice(0, 0), empty)
  with pytest.raises(ValueError, match="empty.parquet: no rows"):
    data.load_examples(empty)
  with pytest.raises(ValueError, match="d.parquet: row 1: empty question"):
    data.load_examples(_write(tmp_path, [_row(0, with_prompt=False),
                                         _row(1, question="  ", with_prompt=False)]))
  bad = _row(1)
  bad["prompt"] = [{"role": "user", "content": ""}]
  with pytest.raises(ValueError, match="d.parquet: row 1: 'prompt' has no non-empty user"):
    data.load_examples(_write(tmp_path, [_row(0), bad]))


def test_over_long_question_anywhere_in_the_file_is_named(tmp_path):
  tok = transformers.AutoTokenizer.from_pretrained(os.path.join(TESTDATA, "tiny_tokenizer"))
  rows = [_row(i) for i in range(5)] + [_row(5, question="Who " * 300)]
  examples = data.load_examples(_write(tmp_path, rows))
  data.check_prompt_lengths(examples[:5], tok, 512, "config.data.train")
  with pytest.raises(ValueError, match=r"config.data.train: question 5 .*extra_info.index 5\) is "
                                       r"\d+ prompt tokens, over .*max_prompt_tokens=512"):
    data.check_prompt_lengths(examples, tok, 512, "config.data.train")


def test_corpus_non_utf8_and_duplicate_ids_name_file_and_line(tmp_path):
  path = tmp_path / "corpus.jsonl"
  path.write_bytes(b'{"id": "0", "contents": "\\"A\\"\\na"}\n{"id": "1", "contents": "b\xff"}\n')
  with pytest.raises(ValueError, match=r"corpus.jsonl:2: not UTF-8 \(byte 0xff"):
    list(corpus.read_corpus(str(path)))
  path.write_text('{"id": "0", "contents": "a"}\n{"id": "1", "contents": "b"}\n'
                  '{"id": "0", "contents": "c"}\n')
  with pytest.raises(ValueError, match=r"corpus.jsonl:3: duplicate document id '0' \(first at "
                                       r"line 1\)"):
    list(corpus.read_corpus(str(path)))
