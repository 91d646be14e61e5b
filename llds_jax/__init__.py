"""llds_jax: search-augmented GRPO + LLDS in JAX."""

import logging as _logging

__version__ = "0.1.0"

# transformers announces at import that torch is missing; we use it only for tokenizers (models
# are ours), so for us that line is noise. Dropped by its text, so every other transformers
# warning still shows.
_logging.getLogger("transformers").addFilter(
    lambda record: "PyTorch was not found" not in record.getMessage())
