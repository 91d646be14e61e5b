"""llds_jax: search-augmented GRPO + LLDS in JAX.

Dimension legend. Array names carry their shape (`logp_BxT`, `adv_B`, `ids_BxL`, `q_BxTxHxDh`)
and every module uses these letters in these meanings only; a module's own `Dims:` line repeats
the ones it uses and may add a letter of its own only if the legend does not have it.

  B   rows of the batch at hand: rollout rows (prompts × G, prompt-major: row b answers prompt
      b // G), sampler rows (padded to the mesh's row shards), a minibatch's or SFT step's rows
  G   group size: rollouts per prompt (one GRPO group)
  T   tokens of a block: the model's new tokens (queries), a block fed to the sampler, a
      response grid in the losses
  P   prompt tokens (left-padded), R response tokens (right-padded), L = P + R tokens per row
  Ts  tokens sampled in one decode segment (one turn of one row)
  S   key positions, i.e. KV cache slots
  V   vocab, D embed, F MLP hidden, H query heads, K kv heads, Dh head dim
  A   micro-batches per minibatch
  C   tokens per chunk of a chunked pass (log-prob chunks, attention query blocks), J chunks
  Sh  row shards of the mesh (data × fsdp)
  Q   stop strings (stops.py, sampler.py), M their automaton states
  N   documents of the retrieval corpus (retriever.py)
  Bp  packed sequences of Lp tokens (packing.py, packed_step.py: several rows per sequence), Tk
      loss-token positions kept per sequence; a micro-batch holds Bpm sequences and Bm row slots

Config names: `c` is the run config (the ml_collections ConfigDict of configs/*.py), `cfg` a
model's `ModelConfig`; the frozen per-part configs built from `c` are `rollout_cfg`
(rollout.RolloutConfig), `step_cfg` (train_step.StepConfig), `sample_cfg` (sampler.SampleConfig)
and `loss_cfg` (losses.LossConfig). Modules are imported under their own names (`rollout`, not
`rl`, which reads as `c.rl`); the long-standing short aliases are `shd` (sharding), `smp`
(sampler) and `mlib` (metrics).
"""

import logging as _logging

__version__ = "0.1.0"

# transformers announces at import that torch is missing; we use it only for tokenizers (models
# are ours), so for us that line is noise. Dropped by its text, so every other transformers
# warning still shows.
_logging.getLogger("transformers").addFilter(
    lambda record: "PyTorch was not found" not in record.getMessage())
