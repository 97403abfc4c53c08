"""How much a run logs: the run-config key ``log-level``, applied the same way on both sides.

The ServerApp applies it when it starts and every ClientApp message in its session set-up
(:func:`configure`), so one key sets the log of the whole run, simulated or deployed.

- ``info`` (default): the run's own report: Flower's and fedbilevel's INFO lines on the
  server (each client's reply as it arrives, the FedBip weights, the per-round summary and
  ETA, the final table) and on deployed SuperNodes. Library noise is off: warnings of the
  deprecation kind (``FutureWarning``, ``DeprecationWarning``: Ray's accelerator tip,
  transformers' and torch's deprecations) and the libraries' ``UserWarning``, their log lines
  below ERROR, and their progress bars (weight loading, downloads, dataset preparation). A
  ClientApp simulated in a Ray worker logs warnings and errors only: the server logs each
  client's reply, and Ray forwards a worker's lines into the same console, late and prefixed
  with the worker.
- ``verbose``: also the simulated clients' own lines and the libraries' warnings and bars.
- ``debug``: also DEBUG lines, Flower's and the libraries'.

Every level prints each line once. Loggers that print through a handler of their own
(Flower's, which fedbilevel logs through, and two Hugging Face libraries') do not also
propagate to the root logger: a library that configures the root logger when imported
(opacus calls ``logging.basicConfig``) would otherwise print each of their lines a second
time, in its own format.
"""

from __future__ import annotations

import logging
import warnings

import datasets
import ray
from flwr.supercore.logger import update_console_handler
from transformers.utils import logging as transformers_logging

# log-level -> the level of the libraries' loggers (the choices are declared in fedbilevel.config).
LIBRARY_LEVELS = {"info": logging.ERROR, "verbose": logging.WARNING, "debug": logging.DEBUG}

# Libraries whose UserWarnings are noise to someone running the app (fedbilevel issues none).
LIBRARIES = ("torch", "transformers", "peft", "datasets", "huggingface_hub", "ray", "flwr", "flwr_datasets", "opacus")

# What `info` ignores: warnings aimed at the developers of the calling code, and the libraries' own.
QUIET_WARNINGS = (
    {"category": FutureWarning},
    {"category": DeprecationWarning},
    {"category": PendingDeprecationWarning},
    {"category": UserWarning, "module": rf"({'|'.join(LIBRARIES)})(\.|$)"},
)

# Loggers with a handler of their own (transformers' and torch's already stop propagating).
OWN_HANDLERS = ("flwr", "datasets", "huggingface_hub")


def configure(level: str, *, client: bool) -> None:
    """Apply ``log-level`` to this process; cheap and idempotent (a client applies it per message).

    Parameters
    ----------
    level : str
        The run config's ``log-level``: ``info``, ``verbose`` or ``debug``.
    client : bool
        True in the ClientApp. A client simulated in a Ray worker keeps only its warnings and
        errors at ``info``; in a deployment its SuperNode's console shows its lines as usual.
    """
    quiet = level == "info"
    for spec in QUIET_WARNINGS:
        # filterwarnings puts the filter first, replacing an equal one (no growth per message);
        # popping it right away removes one that an earlier quiet set-up left in this process.
        warnings.filterwarnings("ignore", **spec)
        if not quiet:
            warnings.filters.pop(0)
    for name in OWN_HANDLERS:
        logging.getLogger(name).propagate = False
    # The root's level is that of every library logger without a level of its own (peft, opacus, ...).
    for name in ("", "huggingface_hub", "torch"):
        logging.getLogger(name).setLevel(LIBRARY_LEVELS[level])
    transformers_logging.set_verbosity(LIBRARY_LEVELS[level])
    datasets.logging.set_verbosity(LIBRARY_LEVELS[level])
    if quiet:
        transformers_logging.disable_progress_bar()  # also huggingface_hub's
        datasets.disable_progress_bars()
    else:
        transformers_logging.enable_progress_bar()
        datasets.enable_progress_bars()
    # Flower's console handler prints what fedbilevel and Flower log; Ray workers host only simulated clients.
    if level == "debug":
        update_console_handler(level=logging.DEBUG)
    elif quiet and client and ray.is_initialized():
        update_console_handler(level=logging.WARNING)
    else:
        update_console_handler(level=logging.INFO)
