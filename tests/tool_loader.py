"""Import a script from tools/ by path, as the tests of the tools do."""

import importlib.util
import os
import re

from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(path: str, name: str):
  """The module at ROOT/path under `name`.

  Tools define absl flags at import; one loaded earlier in this pytest process may already hold a
  name such as --config, which absl refuses to define twice: the earlier definition is dropped
  (tests call the tools' functions, not their flag parsing).
  """
  with open(os.path.join(ROOT, path)) as f:
    for flag in re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", f.read()):
      if flag in flags.FLAGS:
        delattr(flags.FLAGS, flag)
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
