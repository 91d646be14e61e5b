"""Builds tests/testdata/tiny_tokenizer/: a 1000-token Qwen-like byte-level BPE with a ChatML template.

  python tests/testdata/make_tiny_tokenizer.py

Trained in-process (no network) by llds_jax/bpe.py (Qwen2.5-like byte-level BPE) on
wiki_sample.jsonl plus the Search-R1 prompt and tags, so real English text and the agent protocol
tokenize into few pieces.
The chat template renders Qwen2.5's default system prompt when none is given, so prompts look like
the real model's. Load with `transformers.AutoTokenizer.from_pretrained(dir)` (offline).
The output is committed; rerunning reproduces it byte for byte.
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from llds_jax import bpe, data  # pylint: disable=g-import-not-at-top,wrong-import-position

VOCAB_SIZE = 1000
CHAT_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def training_texts() -> list[str]:
  with open(os.path.join(HERE, "wiki_sample.jsonl"), encoding="utf-8") as f:
    texts = [json.loads(line)["contents"] for line in f]
  protocol = (data.make_prompt("Who wrote Hamlet?") + "<think> I need to search. </think>\n"
              "<search> Hamlet author </search>\n\n<information>Doc 1(Title: \"Hamlet\") ...</information>"
              "\n\n<answer> William Shakespeare </answer>")
  return texts + [protocol] * 20


def main():
  out = os.path.join(HERE, "tiny_tokenizer")
  hf = bpe.train_bpe(training_texts(), VOCAB_SIZE, CHAT_TEMPLATE, model_max_length=32768)
  # Template inside tokenizer_config.json (not a separate .jinja) so older transformers read it too.
  hf.save_pretrained(out, save_jinja_files=False)
  # transformers 5 writes its internal class name; the public alias loads in 4.x and 5.x alike.
  config_path = os.path.join(out, "tokenizer_config.json")
  with open(config_path, encoding="utf-8") as f:
    config = json.load(f)
  config["tokenizer_class"] = "PreTrainedTokenizerFast"
  with open(config_path, "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2, ensure_ascii=False)
    f.write("\n")
  print(f"wrote {out}: vocab {len(hf)}")


if __name__ == "__main__":
  main()
