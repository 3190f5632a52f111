"""The commands: `predict.py` and `train.py` are thin wrappers around `predict_main` / `train_main`.

This module imports nothing heavy: the signal handlers are in place before PyTorch, Lightning and transformers load
(seconds), so a job stopped while it starts still ends with one line and 128 + the signal number.
"""

from __future__ import annotations

import sys
from typing import Any

from lit_fast.signals import StopOnSignals, Stopped


def _main(mode: str, args: Any) -> int:
    with StopOnSignals() as signals:
        try:
            from lit_fast.cli import app
        except Stopped as stop:
            print(f"error: {stop} while starting; nothing was written", file=sys.stderr)
            return stop.exit_code
        return app.run(mode, args, signals)


def predict_main(args: Any = None) -> int:
    """`python predict.py --config configs/X.yaml --data.path IN --output OUT`."""
    return _main("predict", args)


def train_main(args: Any = None) -> int:
    """`python train.py --config configs/X.yaml [--export_dir DIR]`: fit, test on held-out rows, export the best."""
    return _main("train", args)
