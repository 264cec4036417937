"""Logging for the command-line entry points: the training run and the memory planner."""

from __future__ import annotations

import logging

# Third-party loggers that warn on every CPU run about something this trainer never uses.
_NOISY = {
    # bitsandbytes, imported by diffusers' quantizers: its optional 4-bit CPU kernels come from a hub
    # package (`kernels`) we neither need nor install
    "bitsandbytes.backends.cpu.ops": logging.ERROR,
}


def quiet_third_party() -> None:
    """Raise the level of the loggers in ``_NOISY`` (before their modules are imported)."""
    for name, level in _NOISY.items():
        logging.getLogger(name).setLevel(level)


def setup() -> None:
    """INFO and up to stderr, one line each, without the known third-party noise."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_third_party()
