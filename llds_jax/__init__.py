"""llds_jax: search-augmented GRPO + LLDS in JAX."""

__version__ = "0.1.0"
