"""Silence the libraries' chatter that says nothing to a zimage-lora user (our own log says what happens)."""

from __future__ import annotations

import logging
import os
import sys
import warnings


def quiet_libraries() -> None:
    # bitsandbytes warns at import that an optional CPU 4-bit kernel package is missing; we use no 4-bit CPU kernel.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # peft warns when a second adapter joins the first: the training adapter and the user's LoRA do, on purpose.
    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    # Loading bars of a few milliseconds each; only touched once the libraries are imported (importing them here
    # would slow down commands that must stay instant, like `validate`).
    if "diffusers" in sys.modules:
        import diffusers.utils.logging as dlog

        dlog.disable_progress_bar()
        dlog.set_verbosity_error()
    if "transformers" in sys.modules:
        import transformers.utils.logging as tlog

        tlog.disable_progress_bar()
        tlog.set_verbosity_error()
