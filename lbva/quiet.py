"""Quiet by default: what the libraries under `lbva` say about themselves stays off the terminal.

Importing diffusers, transformers and torchao prints dozens of lines that are not about the user's
run (a torchao build for another Python, no Triton on a CPU machine, deprecations, "pip install
accelerate", weight-loading bars). `lbva --verbose` (or `lbva COMMAND ... --verbose`) shows them,
and `lbva`'s own INFO lines with them. Only warnings and errors of `lbva` itself reach stderr
otherwise. The setting travels to the processes a command starts: spawned prepare workers inherit
the environment set here, torchrun workers get `--verbose` on their command line.
"""

from __future__ import annotations

import logging
import os

# Libraries whose own logging is muted to errors. diffusers and transformers set their level from
# their *_VERBOSITY variables when first imported, so those are set too, for this process and its
# children.
THIRD_PARTY_LOGGERS = ("torch", "torchao", "diffusers", "transformers", "huggingface_hub")
QUIET_ENVIRONMENT = {
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # diffusers' and transformers' loading bars follow it too
}
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_output(verbose: bool) -> None:
    """Set up logging for one `lbva` process: lbva's INFO lines and every library's output with
    `verbose`; else lbva's warnings and errors only. Call once, before the libraries are imported."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format=LOG_FORMAT)
    if verbose:
        return
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    import torch  # noqa: F401  (torch sets its loggers' levels when imported; ours must come after)

    mute_library_loggers()
    # Python warnings (deprecations and the like) of the libraries become log records of
    # "py.warnings", muted with them; a spawned worker gets the same filter from PYTHONWARNINGS.
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")


def mute_library_loggers() -> None:
    """Errors only from the libraries' loggers that exist now. torch.distributed.elastic gives each
    module's logger its own level when the module is imported, so a caller that imports such a
    module later (the local launch's agent) calls this again after the import."""
    names = [name for name in logging.root.manager.loggerDict
             if any(name == lib or name.startswith(lib + ".") for lib in THIRD_PARTY_LOGGERS)]
    for name in {*THIRD_PARTY_LOGGERS, *names}:
        logging.getLogger(name).setLevel(logging.ERROR)
