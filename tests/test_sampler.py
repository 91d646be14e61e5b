"""Sampler: transformers greedy parity, cache appends, stop strings, sampling, seeds, sharding."""

import dataclasses
import functools
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llds_jax import hf_io, hosts, sampler, sharding, stops
from llds_jax.model import KVCache, ModelConfig, Transformer

from hf_fixtures import torch, transformers

TOKENIZER_DIR = os.path.join(os.path.dirname(__file__), "testdata", "tiny_tokenizer")
CFG = ModelConfig(vocab_size=160, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, rope_theta=1e4, tie_word_embeddings=False)
NO_STOPS = np.zeros((0, 1, CFG.vocab_size), np.int8)


def tiny_cfg(vocab: int) -> ModelConfig:
  return ModelConfig(vocab_size=vocab, hidden_size=64, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e4,
                     tie_word_embeddings=False)


def init_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
  """Random model filled from NumPy (jax PRNG init compiles a program per parameter shape: slow)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.RandomState(seed)

  def fill(var):
    axes, shape = var.get_metadata()["logical_axes"], var.get_raw_value().shape
    if axes == ("norm",):
      w = 1 + 0.1 * rng.randn(*shape)
    elif axes[-1] == "head_dim" and len(axes) == 2:  # q/k/v biases
      w = 0.1 * rng.randn(*shape)
    else:  # embedding ~ N(0, 1); projections scaled by their fan-in
      fan_in = 1 if axes[0] == "vocab" else shape[0] * (shape[1] if axes[0] == "heads" else 1)
      w = rng.randn(*shape) / np.sqrt(fan_in)
    return var.replace(jnp.asarray(w, np.float32))

  is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
  return nnx.merge(graphdef, jax.tree.map(fill, state, is_leaf=is_var))


def scripted_model(vocab: int, chains, *, noise: float = 0.1, seed: int = 0) -> Transformer:
  """A model whose greedy successor of token a is fixed by `chains` (bigram), plus weak noise.

  Blocks are scaled by `noise`, so logits still depend a little on position and context (cache bugs
  show up in log-probs) while the embedding alone decides the argmax.
  """
  succ = {}
  for chain in chains:
    for a, b in zip(chain, chain[1:]):
      assert succ.setdefault(a, b) == b, f"script needs two successors for token {a}"
  cfg = tiny_cfg(vocab)
  d = cfg.hidden_size
  model = init_model(cfg, seed)
  emb = np.random.RandomState(seed).randn(vocab, d).astype(np.float32)
  model.embed[...] = jnp.asarray(emb)
  for layer in model.layers:
    layer.o[...] = jnp.asarray(np.asarray(layer.o[...]) * noise)
    layer.down[...] = jnp.asarray(np.asarray(layer.down[...]) * noise)
  unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  head = np.zeros((d, vocab), np.float32)
  for a, b in succ.items():
    head[:, b] += 4 * unit[a]  # margin ≈ 32 nats: the script holds even at temperature 1
  model.lm_head[...] = jnp.asarray(head)
  return model


def _hf_model(arch: str, seed: int = 0):
  torch.manual_seed(seed)
  kw = dict(vocab_size=CFG.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
            tie_word_embeddings=False)
  if arch == "qwen2":
    tm = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
  elif arch == "qwen3":  # per-head q/k norm, head_dim 12 != hidden / heads
    tm = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**kw, head_dim=12))
    with torch.no_grad():
      for name, p in tm.named_parameters():
        if name.endswith(("q_norm.weight", "k_norm.weight")):
          p.add_(torch.randn_like(p))
  else:
    tm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
  return tm.float().eval()


def _to_ours(tm):
  with tempfile.TemporaryDirectory() as d:
    tm.save_pretrained(d)
    return hf_io.load_pretrained(d)[0]


def _prompts(lengths, vocab=CFG.vocab_size, seed=0):
  rng = np.random.RandomState(seed)
  return [rng.randint(0, vocab, n).tolist() for n in lengths]


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, tokens_1xT):
  return nnx.merge(graphdef, params)(tokens_1xT)


def full_logits(model, seq, width=64):
  """Full forward (no cache) over one sequence, right-padded to a fixed width: one compile."""
  graphdef, params = nnx.split(model)
  padded = np.zeros((1, max(width, len(seq))), np.int32)
  padded[0, :len(seq)] = seq
  return np.asarray(_forward(graphdef, params, jnp.asarray(padded)))[0, :len(seq)]


def log_softmax_full(model, seq, width=64):
  logits = full_logits(model, seq, width).astype(np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def tok():
  return transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def rand_model():
  return _to_ours(_hf_model("qwen2", seed=3))


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3"])
def test_greedy_matches_transformers_ragged_batch_with_eos(arch):
  tm = _hf_model(arch)
  model = _to_ours(tm)
  prompts = _prompts([5, 17, 1, 9])

  def hf(p, eos):
    out = tm.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                      max_new_tokens=20, do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, len(p):].tolist()

  free = [hf(p, None) for p in prompts]
  assert all(len(set(f)) > 5 for f in free)  # the oracle is not degenerate
  eos = next(t for t in free[1][6:] if t not in free[1][:6])  # row 1 stops early, mid-sequence
  ours = sampler.generate(model, prompts, max_new_tokens=20, stop_token_ids=(eos,))
  assert ours == [hf(p, eos) for p in prompts]
  assert len(ours[1]) < 20 and ours[1][-1] == eos


@pytest.mark.parametrize("scan", [True, False])
def test_append_into_live_cache_equals_full_forward(rand_model, scan):
  # Both cache paths: blocks as one lax.scan over the [L, ...] cache, and unrolled.
  cfg = dataclasses.replace(rand_model.cfg, scan_cache=scan)
  model = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))),
                    nnx.state(rand_model))
  graphdef, params = nnx.split(model)
  prompts = _prompts([5, 9, 3], seed=1)
  obs = _prompts([6, 0, 2], seed=2)  # row 1 has finished: it appends nothing and samples nothing
  sample_cfg = sampler.SampleConfig()
  state = sampler.init_state(cfg, 3, 48, 4, 0)
  put = jax.device_put
  state = sampler.feed(graphdef, params, state, put(_right_pad(prompts, 16)), put(_lens(prompts)),
                       put(np.full(3, 4, np.int32)), put(NO_STOPS), sample_cfg)
  state = sampler.decode(graphdef, params, state, put(NO_STOPS), sample_cfg)
  gen1, lp1 = (np.asarray(x) for x in (state.tokens_BxTs, state.logp_BxTs))
  blocks = [[int(gen1[b, -1])] + obs[b] if obs[b] else [] for b in range(3)]
  # The second segment reads and writes only the first 32 of the 48 slots (the rollout's `view`).
  state = sampler.feed(graphdef, params, state, put(_right_pad(blocks, 8)), put(_lens(blocks)),
                       put(np.asarray([3, 0, 3], np.int32)), put(NO_STOPS), sample_cfg, view=32)
  state = sampler.decode(graphdef, params, state, put(NO_STOPS), sample_cfg, view=32)
  assert state.cache.slots == 48
  gen2, lp2, num2 = (np.asarray(x) for x in (state.tokens_BxTs, state.logp_BxTs, state.num_B))
  np.testing.assert_array_equal(num2, [3, 0, 3])
  for b in (0, 2):
    seq = prompts[b] + gen1[b].tolist() + obs[b] + gen2[b, :3].tolist()
    lsm = log_softmax_full(model, seq)
    p, o = len(prompts[b]), len(obs[b])
    at = list(range(p - 1, p + 3)) + list(range(p + 3 + o, p + 6 + o))  # predicting positions
    got = np.concatenate([lp1[b], lp2[b, :3]])
    want = lsm[at, seq[p:p + 4] + seq[p + 4 + o:]]
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_array_equal(lsm[at].argmax(-1), seq[p:p + 4] + seq[p + 4 + o:])

  # The same path at the logits level: prefill, ragged append (one row empty), one decode step.
  step = jax.jit(lambda c, t, n, s: sampler.forward_block(nnx.merge(graphdef, params), c, t, n, s))
  seqs = [prompts[b] + gen1[b].tolist() + obs[b] for b in range(3)]
  cache = KVCache.init(cfg, 3, 48)
  _, cache = step(cache, jnp.asarray(_right_pad(prompts, 16)), jnp.asarray(_lens(prompts)),
                  jnp.zeros(3, jnp.int32))
  tail = [s[len(p):] for s, p in zip(seqs, prompts)]
  tail[1] = []
  logits, cache = step(cache, jnp.asarray(_right_pad(tail, 16)), jnp.asarray(_lens(tail)),
                       jnp.asarray(_lens(prompts)))
  nxt = [7, 8, 9]
  starts = [len(seqs[0]), len(prompts[1]), len(seqs[2])]
  logits2, _ = step(cache, jnp.asarray([[t] for t in nxt]), jnp.asarray([1, 1, 1]),
                    jnp.asarray(starts))
  for b in (0, 2):
    full = full_logits(model, seqs[b] + [nxt[b]])
    np.testing.assert_allclose(np.asarray(logits)[b], full[-2], atol=1e-4)
    np.testing.assert_allclose(np.asarray(logits2)[b], full[-1], atol=1e-4)
  full1 = full_logits(model, prompts[1] + [nxt[1]])
  np.testing.assert_allclose(np.asarray(logits2)[1], full1[-1], atol=1e-4)


def _right_pad(rows, width):
  out = np.zeros((len(rows), width), np.int32)
  for b, r in enumerate(rows):
    out[b, :len(r)] = r
  return out


def _lens(rows):
  return np.asarray([len(r) for r in rows], np.int32)


def test_stop_table_equals_substring_search():
  vocab = [b"", b"<", b"/", b"</", b"search", b"sea", b"rch", b">", b">\n\n", b"h>", b"x</search>y",
           b"</se", b"arch>", b"a", b"aa", b"b", b"ab", b"</answer>", b"answer", b" ", b"<<//"]
  strings = ["</search>", "</answer>", "aab"]  # "aab" needs the KMP fallback ("aa" + "ab")
  table = stops.stop_table(vocab, strings)
  assert table.shape == (3, 9, len(vocab)) and table.dtype == np.int8
  rng = np.random.RandomState(0)
  hits = 0
  for _ in range(400):
    seq = rng.randint(len(vocab), size=14)
    state, got = np.zeros(3, np.int64), None
    for i, t in enumerate(seq):
      nxt = table[np.arange(3), state, t].astype(np.int64)
      if (nxt < 0).any():
        got = i
        break
      state = nxt
    text, want = b"", None
    for i, t in enumerate(seq):
      text += vocab[t]
      if any(s.encode() in text for s in strings):
        want = i
        break
    assert got == want, (seq, got, want)
    hits += want is not None
  assert hits > 50


def test_token_bytes_concatenate_to_decoded_text(tok):
  text = 'Doc 1(Title: "Café") naïve – 日本 </search>\n\n<answer> x </answer>'
  ids = tok.encode(text, add_special_tokens=False)
  table = stops.token_bytes(tok, vocab_size=1010)
  assert len(table) == 1010 and table[1005] == b""
  assert b"".join(table[i] for i in ids) == text.encode()
  assert table[tok.convert_tokens_to_ids("<|im_end|>")] == b""


def test_stop_strings_split_tag_long_token_eos_and_length(tok):
  enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
  eos = tok.convert_tokens_to_ids("<|im_end|>")
  split = enc(" the end </search> more")  # ... 'Ġ</' 'search' '>' 'Ġmore'
  long = enc("</answer>\n\n tail")  # '<' '/' 'answer' '>ĊĊ': one token ends the tag, goes on
  assert stops.token_bytes(tok)[long[3]] == b">\n\n"
  prompts = [enc("<search> a </search> 0"), enc("Question 1"), enc("2"), enc("y 3")]
  chains = [[prompts[0][-1]] + split, [prompts[1][-1]] + long,
            [prompts[2][-1]] + enc(" hello") + [eos] + enc(" </search>"),
            [prompts[3][-1]] + enc(" one two three </search>")]
  model = scripted_model(len(tok), chains)
  out = sampler.sample(model, prompts, max_new_tokens=6, stop_token_ids=(eos,),
                       stop_strings=("</search>", "</answer>"), tokenizer=tok)
  assert out.tokens == [split[:6], long[:4], enc(" hello") + [eos], chains[3][1:7]]
  assert out.stop_reason == ["stop_string", "stop_string", "eos", "length"]
  assert tok.decode(out.tokens[3]).endswith("</search")


def _seeded_case():
  prompts = _prompts([4, 4, 4, 7], seed=5)
  prompts[1] = prompts[0]  # same prompt in two rows (a GRPO group) must still differ
  return prompts, dict(max_new_tokens=8, temperature=1.0, top_p=0.95)


def test_sampling_is_seeded_per_row_and_logprobs_match_forward(rand_model):
  prompts, kw = _seeded_case()
  a = sampler.sample(rand_model, prompts, seed=0, **kw)
  b = sampler.sample(rand_model, prompts, seed=0, **kw)
  c = sampler.sample(rand_model, prompts, seed=1, **kw)
  assert a.tokens == b.tokens and a.logprobs == b.logprobs
  assert a.tokens != c.tokens
  assert a.tokens[0] != a.tokens[1]
  for p, t, lp in zip(prompts, a.tokens, a.logprobs):
    lsm = log_softmax_full(rand_model, p + t)
    np.testing.assert_allclose(lp, lsm[np.arange(len(p) - 1, len(p) + len(t) - 1), t], atol=1e-4)


def test_top_k_then_top_p_sample_the_renormalized_kept_set():
  logits_V = np.random.RandomState(0).randn(40).astype(np.float32) * 2
  cfg = sampler.SampleConfig(temperature=0.7, top_p=0.8, top_k=6)
  rows = 4000
  key_B = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(0), jnp.arange(rows))
  tok_B, logp_B = jax.jit(sampler._sample, static_argnums=3)(
      jnp.broadcast_to(jnp.asarray(logits_V), (rows, 40)), key_B, jnp.zeros(rows, jnp.int32), cfg)
  x = logits_V / cfg.temperature
  top = np.argsort(-x)[:cfg.top_k]
  p = np.exp(x[top] - x[top].max())
  kept = top[:int(np.searchsorted(np.cumsum(p / p.sum()), cfg.top_p)) + 1]
  assert 2 <= len(kept) < cfg.top_k  # both filters bind
  want = np.exp(x[kept] - x[kept].max())
  freq = np.bincount(np.asarray(tok_B), minlength=40) / rows
  assert set(np.flatnonzero(freq)) <= set(kept.tolist())
  np.testing.assert_allclose(freq[kept], want / want.sum(), atol=0.03)
  lsm = logits_V - logits_V.max() - np.log(np.exp(logits_V - logits_V.max()).sum())
  np.testing.assert_allclose(np.asarray(logp_B), lsm[np.asarray(tok_B)], atol=1e-5)


def test_sharded_generation_equals_single_device(rand_model):
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  prompts, kw = _seeded_case()
  ref = sampler.sample(rand_model, prompts, seed=0, **kw)
  graphdef, state = nnx.split(rand_model)
  state = jax.device_put(state, sharding.state_shardings(state, mesh))
  sharded = nnx.merge(graphdef, state)
  assert len(sharded.layers[0].gate[...].sharding.device_set) == 8
  # 3 rows on 4 batch shards (one idle padding row); a row's samples do not depend on the others.
  with jax.transfer_guard("disallow"):
    out = sampler.sample(sharded, prompts[:3], seed=0, mesh=mesh, **kw)
  assert out.tokens == ref.tokens[:3]
  np.testing.assert_allclose(np.concatenate(out.logprobs), np.concatenate(ref.logprobs[:3]),
                             atol=1e-5)


def test_cache_heads_split_over_tensor_and_updated_in_place(rand_model):
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  graphdef, params = nnx.split(rand_model)
  params = jax.device_put(params, sharding.state_shardings(params, mesh))
  state = sampler.init_state(CFG, 4, 32, 4, 0, mesh=mesh)
  # Layer axis whole (the scan indexes it), rows over (data, fsdp), K/V heads over tensor.
  assert tuple(state.cache.k.sharding.spec) == (None, ("data", "fsdp"), None, "tensor", None)
  put = lambda x: hosts.put_rows(x, mesh)  # noqa: E731
  args = (graphdef, params, state, put(np.ones((4, 8), np.int32)), put(np.full(4, 5, np.int32)),
          put(np.full(4, 3, np.int32)), hosts.put_replicated(NO_STOPS, mesh),
          sampler.SampleConfig(1.0, 1.0, 0, ()))
  mem = sampler.feed.lower(*args).compile().memory_analysis()
  per_device_kv = 2 * state.cache.k.addressable_shards[0].data.nbytes
  assert mem.alias_size_in_bytes >= per_device_kv  # the donated cache is written in place


def test_bfloat16_cache(rand_model):
  state = sampler.init_state(rand_model.cfg, 2, 32, 4, 0, cache_dtype="bfloat16")
  assert state.cache.k[0].dtype == jnp.bfloat16
  prompts, kw = _seeded_case()
  out = sampler.sample(rand_model, prompts, seed=0, cache_dtype="bfloat16", **kw)
  for p, t, lp in zip(prompts, out.tokens, out.logprobs):
    lsm = log_softmax_full(rand_model, p + t)
    np.testing.assert_allclose(lp, lsm[np.arange(len(p) - 1, len(p) + len(t) - 1), t], atol=0.05)


def test_bucket_sizes():
  assert [sampler.bucket(n) for n in (1, 16, 17, 25, 33, 49, 65, 97, 129)] == \
      [16, 16, 24, 32, 48, 64, 96, 128, 192]


def test_rejects_bad_arguments(rand_model):
  with pytest.raises(ValueError, match="empty prompt"):
    sampler.generate(rand_model, [[1], []], max_new_tokens=2)
  with pytest.raises(ValueError, match="tokenizer"):
    sampler.generate(rand_model, [[1]], max_new_tokens=2, stop_strings=("</search>",))
  with pytest.raises(ValueError, match="top_p"):
    sampler.generate(rand_model, [[1]], max_new_tokens=2, temperature=1.0, top_p=0.0)


def test_sampling_keys_keep_int32_seeds_and_separate_larger_ones(rand_model):
  """The trainer seeds step s's rollout with seed × 1,000,003 + s, past int32 from run seed 2148
  on (that crashed with OverflowError); int32 seeds keep the documented key, so old runs replay."""
  def keys(seed, offset=0):
    state = sampler.init_state(rand_model.cfg, 3, 8, 2, 0, seed=seed, row_offset=offset)
    return np.asarray(jax.random.key_data(state.key_B))
  fold = jax.vmap(jax.random.fold_in, (None, 0))
  want = jax.random.key_data(fold(jax.random.key(7), jnp.arange(3, dtype=jnp.int32) + 5))
  np.testing.assert_array_equal(keys(7, 5), want)  # fold_in(key(seed), row_offset + r)
  np.testing.assert_array_equal(keys(-3), jax.random.key_data(
      fold(jax.random.key(-3), jnp.arange(3, dtype=jnp.int32))))
  big = 3000 * 1_000_003 + 1
  drawn = [keys(s) for s in (big, big + 1, big % 2**31, big + 2**31, 2**31, 0)]
  assert len({k.tobytes() for k in drawn}) == len(drawn)  # all distinct
  assert sampler.seed_words(big) == [big % 2**31, big // 2**31]
  with pytest.raises(ValueError, match="sampling seed .* out of range"):
    sampler.seed_words(2**62)
