"""GRPO + LLDS on Search-R1 (the paper's main setting): Qwen2.5-3B-Instruct, NQ+HotpotQA.

  python -m llds_jax.main --config=configs/base.py --config.workdir=/tmp/run \
      --config.model.path=/ckpts/Qwen2.5-3B-Instruct --config.data.train=/data/train.parquet \
      --config.retriever.index=/data/wiki18_bm25

Values follow the official LLDS script (PAPER.md §C); where paper and code differ the code's
value is used and the paper's is noted. Variants import this file and change a few fields.
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.workdir = ""  # run directory: checkpoints, metrics.jsonl, TensorBoard events, config.json
  c.seed = 0  # seeds init, data order and every rollout (step-folded) -> exact resume
  c.total_steps = 1005  # training steps (rollout + update phase each)
  c.resume = True  # continue from the newest valid checkpoint in workdir

  c.model = ml_collections.ConfigDict()
  c.model.path = ""  # HF directory (safetensors) or a .gguf file; "" = random init from `random`
  c.model.tokenizer = ""  # HF tokenizer directory; "" = model.path (a GGUF carries its own)
  # True: use a model.tokenizer other than the one model.path carries, and eos/pad/bos ids other
  # than config.json's (refused otherwise); special ids must still be rows of the embedding.
  c.model.allow_tokenizer_mismatch = False
  c.model.dtype = "bfloat16"  # compute dtype of matmuls (softmax/norm/log-sum-exp stay float32)
  c.model.param_dtype = "float32"  # master weights
  c.model.remat = "full"  # none | full | dots: block rematerialization in the update
  # Cache-free passes (update, log-probs) run the blocks as one lax.scan: one block's activations
  # live at a time in the backward pass, and one block is compiled instead of num_layers.
  c.model.scan_layers = True
  # The sampler's cache path (prefill, observation feed, decode) as one lax.scan as well: each of
  # its programs compiles one block instead of num_layers (2-3.6x faster compiles at 24 layers on
  # CPU, bench/RESULTS.md), but holds one more copy of the block weights (stacked, in the compute
  # dtype). False unrolls them: no copy, num_layers blocks to compile per program.
  c.model.scan_cache = True
  # Supervised format warm-up before RL (llds_jax/sft.py): steps of masked NLL on ideal
  # search-then-answer trajectories built from the training questions; 0 = off (the paper
  # starts RL from the released checkpoints). Deterministic, so a resumed run redoes it
  # to rebuild the same reference model.
  c.model.format_warmup_steps = 0
  c.model.format_warmup_lr = 1e-3
  c.model.format_warmup_batch = 16  # rows per warm-up step (a multiple of data × fsdp)
  # Random-init architecture (used only when path == ""): HF config.json fields.
  c.model.random = ml_collections.ConfigDict(dict(
      architectures=["Qwen2ForCausalLM"], vocab_size=1000, hidden_size=64, intermediate_size=128,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6,
      tie_word_embeddings=True, max_position_embeddings=8192))

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1 = remaining devices

  c.data = ml_collections.ConfigDict()
  c.data.train = ""  # Search-R1 parquet (comma-separated for several)
  c.data.val = ""  # held-out parquet for periodic EM; "" = no validation
  c.data.shuffle = True  # reshuffle each epoch (seeded)

  c.retriever = ml_collections.ConfigDict()
  c.retriever.index = ""  # BM25 index dir (tools/build_index.py); the paper used e5 + FAISS
  c.retriever.topk = 3  # passages per search
  c.retriever.workers = 1  # processes sharing a turn's searches (search_pool.py); 1 = in-process
  # Index builds (tools/build_index.py, a corpus .jsonl given as retriever.index): batches sized to
  # this limit and a loud failure when the corpus cannot fit under it (build_memory.py). wiki-18's
  # 21M passages are estimated at 10–13 GiB (docs/retrieval.md).
  c.retriever.build_memory_mb = 8192

  c.rollout = ml_collections.ConfigDict()
  c.rollout.prompts = 512  # prompts per training step (global)
  c.rollout.group_size = 5  # responses per prompt (GRPO group)
  c.rollout.max_turns = 3  # executed tool calls per trajectory (+1 final turn); eval uses 4
  c.rollout.max_turn_tokens = 500  # sampled tokens per turn
  c.rollout.max_obs_tokens = 500  # tokens per observation, the whole <information> block counted
  # passages: a longer block has its passages cut and keeps `</information>\n\n` (default) |
  # raw: Search-R1's cut of the tokenized block, which drops the closing tag (for parity runs)
  c.rollout.obs_truncation = "passages"
  c.rollout.max_prompt_tokens = 2048  # longer prompts are an error (official: max_start_length)
  c.rollout.max_context = 4096  # prompt + response tokens per row
  c.rollout.temperature = 1.0
  c.rollout.top_p = 0.95  # official yaml default (paper says 1.0)
  c.rollout.top_k = 0  # 0 = off
  c.rollout.cache_dtype = "bfloat16"  # KV cache storage
  # Layout of the rollout's compute-dtype weights: "tensor" = split over the tensor axis only,
  # whole on every data/fsdp shard (decode gathers no weights per token; costs params / tensor
  # bytes per device); "train" = the training shards (smallest, but all-gathered every token).
  c.rollout.weight_sharding = "tensor"

  c.rl = ml_collections.ConfigDict()
  # What EM scores (llds_jax/rewards.py REWARD_SCOPES): "sampled" = the model's own last answer
  # span inside its sampled tokens (DESIGN.md §Rewards); "search_r1_text" = Search-R1's scoring of
  # the whole response text, observations included (parity only: a retrieved document holding
  # <answer>x</answer> is scored as the model's answer).
  c.rl.reward_scope = "sampled"
  c.rl.loss = "grpo"  # grpo (PPO-clip token ratio, Eq. 1) | gspo (sequence ratio)
  c.rl.clip_low = 0.2
  c.rl.clip_high = 0.2
  c.rl.ratio_clamp = 100.0  # LLDS fork clamps the ratio at 100 before clipping; 0 = off
  c.rl.agg = ""  # "" = official per loss | token-mean | seq-mean-token-mean
  c.rl.kl_kind = "low_var_kl"  # k1 | k2 | k3 | low_var_kl, vs the frozen initial model
  c.rl.kl_coef = 0.001
  c.rl.entropy_coef = 0.001  # entropy bonus (on in the official run, not in the paper)
  c.rl.llds_lambda = 0.2  # λ of Eq. 6 (0.3 for Qwen2.5-7B-Instruct); 0 = vanilla GRPO
  c.rl.llds_gate = "action"  # action (Eq. 4) | response (Eq. 10) | token (Eq. 9)
  c.rl.llds_norm = "token"  # token (official) | response (paper Eq. 4)
  c.rl.mask_answer = False  # LLDS-MA (Eq. 5): weight β on answer tokens
  c.rl.answer_weight = 0.2  # MASK_WEIGHT: fixed β = min(w, λ)/λ, or the adaptive base weight
  c.rl.adaptive_beta = ""  # "" = fixed | code: min(w·max(V̄−1,0),λ)/λ | paper: min(V̄/2,1)
  c.rl.ppo_epochs = 1
  c.rl.minibatch_size = 256  # trajectories per optimizer step (10 steps per rollout batch)
  c.rl.micro_batch_size = 64  # trajectories per gradient-accumulation micro-batch (global)
  c.rl.shuffle_minibatches = False  # official: no shuffle
  # Rows per block of the old/reference log-prob passes over the whole rollout batch (verl's
  # log_prob_micro_batch_size; Search-R1's scripts use 128); 0 = all rows in one call.
  c.rl.logprob_micro_batch_size = 128
  c.rl.logprob_chunk = 256  # tokens per chunk of the fused log-prob (bounds B×chunk×V memory)
  # Packed update (llds_jax/packing.py, packed_step.py): rows share fixed-length sequences,
  # attention stays inside each row, losses and gradients equal the padded path's with one
  # micro-batch. False = the padded path: every row padded to the batch's longest.
  c.rl.pack = False
  c.rl.pack_len = 0  # tokens per packed sequence; 0 = rollout.max_context (must be ≥ it)
  # Packed sequences per micro-batch (token budget = this × pack_len; 0 = micro_batch_size);
  # with packing, logprob_micro_batch_size also counts sequences. A multiple of data × fsdp.
  c.rl.pack_micro_seqs = 0
  # DAPO dynamic sampling, without the refill: drop groups whose rewards are all equal (Â = 0,
  # no policy-gradient signal) before the update; the kept rows are cut to whole minibatches.
  # Off for paper parity: those rows are in LLDS's preserving set (Â ≥ 0), so dropping them also
  # drops LLDS's protection of their likelihood (all-correct groups). `filter/*` metrics log it.
  c.rl.filter_zero_variance = False

  c.opt = ml_collections.ConfigDict()
  c.opt.lr = 1e-6
  c.opt.warmup_steps = 286  # int(0.285 × 1005) training steps, linear from 0, then constant
  c.opt.b1 = 0.9
  c.opt.b2 = 0.999
  c.opt.eps = 1e-8
  c.opt.weight_decay = 0.01
  c.opt.grad_clip = 1.0  # global norm

  c.ckpt = ml_collections.ConfigDict()
  c.ckpt.every = 50  # steps between checkpoints (the last step is always saved)
  c.ckpt.keep = 3  # checkpoints kept
  c.ckpt.async_save = True

  c.log = ml_collections.ConfigDict()
  c.log.eval_every = 50  # steps between validations (0 = never)
  c.log.eval_max_turns = 4  # the paper's evaluation budget
  c.log.eval_limit = 0  # validation questions (0 = all)
  c.log.tensorboard = True
  c.log.progress = True  # tqdm bars
  c.log.plots = True  # at the end, render metrics.jsonl to WORKDIR/plots/*.png (tools/plot.py)
  c.log.lld_patience = 5  # warn when preserving log-likelihood falls this many steps in a row
  return c
