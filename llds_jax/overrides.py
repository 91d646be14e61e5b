"""Command-line `--config.a.b=v` overrides checked against the config file, before absl parses them.

With `lock_config=True` an override naming a field the config lacks fails inside the flag parser
as three chained tracebacks ending in `AttributeError: "'foo'"`. This names the field and the
fields that do exist instead, before jax is even imported.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence


def _config_path(argv: Sequence[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1].split(":", 1)[0]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":", 1)[0]
  return None


def unknown_field(argv: Sequence[str]) -> str | None:
  """A message naming the first `--config.X` override that is not a field of the config, or None."""
  path = _config_path(argv)
  if path is None:
    return None
  spec = importlib.util.spec_from_file_location("_llds_config_for_check", path)
  if spec is None or spec.loader is None:
    return None  # absl reports an unreadable config file itself
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    dotted = arg[len("--"):].split("=", 1)[0]
    node = config
    for depth, key in enumerate(dotted.split(".")[1:], 1):
      if not hasattr(node, "keys") or key not in node:
        parent = ".".join(dotted.split(".")[:depth])
        known = sorted(node.keys()) if hasattr(node, "keys") else []
        return (f"{arg}: {path} has no field {dotted} ({parent} has: {', '.join(known)})"
                if known else f"{arg}: {parent} is a value, not a section")
      node = node[key]
  return None
