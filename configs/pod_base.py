"""Shared pieces of the pod configs: the exact Qwen2.5 architectures and the `hardware` section.

The pod configs (configs/pod_qwen{3b,7b}_{v4,v5e,v5p}.py) are the paper's setting (llds_search.py:
512 prompts × 5 responses, 3 search turns, 4096-token context, 10 minibatch updates per step) on a
TPU slice. Each carries the HF config.json fields of its model in `model.random`, so
`tools/dry_run.py` compiles the real shapes offline; a training run still needs the weights:

  python -m llds_jax.main --config=configs/pod_qwen3b_v5p.py --config.workdir=gs://.../run \
      --config.model.path=/ckpts/Qwen2.5-3B-Instruct --config.data.train=... \
      --config.retriever.index=...

`model.path` stays "" here on purpose: without it the trainer would start from *random* weights
of the right shape, which is only useful for a smoke run. This file's own get_config() is the
3B / v5p default so that every configs/*.py loads.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import llds_search  # noqa: E402  (config files are loaded by path)
import ml_collections  # noqa: E402

# config.json of Qwen/Qwen2.5-3B-Instruct and Qwen/Qwen2.5-7B-Instruct on the HF hub, verbatim
# (sliding-window fields are inert: use_sliding_window is false).
QWEN25_3B_INSTRUCT = dict(
    architectures=["Qwen2ForCausalLM"], attention_dropout=0.0, bos_token_id=151643,
    eos_token_id=151645, hidden_act="silu", hidden_size=2048, initializer_range=0.02,
    intermediate_size=11008, max_position_embeddings=32768, max_window_layers=70,
    model_type="qwen2", num_attention_heads=16, num_hidden_layers=36, num_key_value_heads=2,
    rms_norm_eps=1e-06, rope_theta=1000000.0, sliding_window=32768, tie_word_embeddings=True,
    torch_dtype="bfloat16", use_cache=True, use_sliding_window=False, vocab_size=151936)
QWEN25_7B_INSTRUCT = dict(
    architectures=["Qwen2ForCausalLM"], attention_dropout=0.0, bos_token_id=151643,
    eos_token_id=151645, hidden_act="silu", hidden_size=3584, initializer_range=0.02,
    intermediate_size=18944, max_position_embeddings=32768, max_window_layers=28,
    model_type="qwen2", num_attention_heads=28, num_hidden_layers=28, num_key_value_heads=4,
    rms_norm_eps=1e-06, rope_theta=1000000.0, sliding_window=131072, tie_word_embeddings=False,
    torch_dtype="bfloat16", use_cache=True, use_sliding_window=False, vocab_size=152064)
MODELS = {"3b": QWEN25_3B_INSTRUCT, "7b": QWEN25_7B_INSTRUCT}


def pod_config(model: str, chip: str, devices: int, *, data: int, fsdp: int, tensor: int,
               micro_batch: int, logprob_micro_batch: int = 128, remat: str = "full",
               cache_dtype: str = "bfloat16", weight_sharding: str = "tensor"):
  """llds_search.py on `devices` chips of kind `chip` with this mesh and memory knobs."""
  c = llds_search.get_config()
  c.model.random = ml_collections.ConfigDict(MODELS[model])
  c.model.remat = remat
  if model == "7b":
    c.rl.llds_lambda = 0.3  # the paper's λ for Qwen2.5-7B-Instruct (PAPER.md §B.5)
  c.hardware = ml_collections.ConfigDict()
  c.hardware.chip = chip  # v4 | v5e | v5p | v6e | H100: llds_jax/roofline.py CHIPS (prediction only)
  c.hardware.devices = devices  # JAX devices of the slice (one per chip on v4/v5p megacore, v5e)
  c.mesh = ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))
  if data * fsdp * tensor != devices:
    raise ValueError(f"pod config: mesh {data}×{fsdp}×{tensor} != hardware.devices={devices}")
  c.rl.micro_batch_size = micro_batch  # a multiple of data × fsdp (config_check.validate)
  # Rows per block of the old/reference log-prob pass: divides the 2560 rollout rows and is a
  # multiple of data × fsdp (config_check.validate).
  c.rl.logprob_micro_batch_size = logprob_micro_batch
  # Packed update (issue 18): rows share max_context-token sequences and logits are computed at
  # loss tokens only; a micro-batch is micro_batch sequences (the padded micro-batch's token
  # budget). bench/packing.py: 0.53–0.72× the padded update phase on recorded testbed lengths.
  c.rl.pack = True
  c.rollout.cache_dtype = cache_dtype
  # "tensor": the rollout's bf16 weights whole on every fsdp shard (params/tensor bytes per chip)
  # so decode gathers no weights per token; "train": fsdp-sharded, gathered every token.
  c.rollout.weight_sharding = weight_sharding
  # The sampler's cache path unrolled: scanned, every sampler program would hold one more copy of
  # the block weights (stacked, bf16: ~5.5 GB per chip for 3B and ~13 GB for 7B under the
  # "tensor" layout), which the 7B configs have no room for; compile time matters less on a pod.
  c.model.scan_cache = False
  return c


def get_config():
  return pod_config("3b", "v5p", 32, data=1, fsdp=32, tensor=1, micro_batch=32)
