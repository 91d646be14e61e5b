"""Entry point: `python -m llds_jax.main --config=configs/tiny.py --config.workdir=DIR`.

Intentionally short: parse flags, join the multi-host job if there is one, call `trainer.train`.
"""

import logging as std_logging
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a get_config() file.",
                                          lock_config=True)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None, "Call jax.distributed.initialize() (default: when a TPU pod / cluster "
    "environment is detected).")
# Explicit cluster description, for machines jax cannot auto-detect (e.g. GPU hosts or several
# local CPU processes): passed straight to jax.distributed.initialize.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def setup_logging() -> None:
  """Libraries at WARNING, our own progress notes (llds_jax.*) at INFO."""
  # Orbax and absl log every checkpoint step at INFO; keep the console for progress bars. Our
  # notes ("format warm-up: NLL ...", "wrote 8 plots ...") are information, not warnings.
  logging.set_verbosity(logging.WARNING)
  std_logging.getLogger("llds_jax").setLevel(std_logging.INFO)


def main(argv):
  del argv
  import jax

  setup_logging()

  multi = _DISTRIBUTED.value
  if multi is None:  # TPU pod slices and SLURM/MPI set these; one host needs no coordinator
    multi = any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS",
                                          "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")) and (
        len(os.environ.get("TPU_WORKER_HOSTNAMES", "a,b").split(",")) > 1)
  if _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif multi:
    jax.distributed.initialize()
  logging.info("process %d/%d, %d devices", jax.process_index(), jax.process_count(),
               jax.device_count())
  from llds_jax import trainer

  trainer.train(_CONFIG.value)


if __name__ == "__main__":
  import sys

  from llds_jax import overrides

  problem = overrides.unknown_field(sys.argv)
  if problem:
    sys.exit(f"error: {problem}")
  flags.mark_flags_as_required(["config"])
  app.run(main)
