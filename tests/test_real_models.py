"""Opt-in (--runslow): the pip-shipped real models through our loader (tools/fetch_assets.py)."""

import jax.numpy as jnp
import numpy as np
import pytest

from llds_jax import assets, hf_io

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("asset", ["qwen_gguf", "smollm_gguf"])
def test_gguf_model_completes_paris(asset):
  path = assets.asset_paths(require=[asset])[asset]
  model, cfg, tok = hf_io.load_gguf(path)
  ids = tok("The capital of France is")["input_ids"]
  for _ in range(2):
    logits = model(jnp.asarray([ids]))
    ids = ids + [int(jnp.argmax(logits[0, -1]))]
  assert tok.decode(ids[-2:]).strip().startswith("Paris")


@pytest.mark.parametrize("asset", ["qwen_gguf", "smollm_gguf"])
def test_gguf_matches_transformers(asset):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  path = assets.asset_paths(require=[asset])[asset]
  model, cfg, tok = hf_io.load_gguf(path)
  import os
  ref_tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                      gguf_file=os.path.basename(path))
  for text in ["The capital of France is", "<|im_start|>user\n<search> Zürich 2024 </search>",
               "  spaces\tand\nnewlines 12345 ünïcödé"]:
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"], text
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), torch_dtype=torch.float32).eval()
  ids = tok("The capital of Germany is")["input_ids"]
  with torch.no_grad():
    want = ref(torch.tensor([ids])).logits.numpy()
  got = np.asarray(model(jnp.asarray([ids])))
  assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
