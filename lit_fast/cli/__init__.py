"""The commands: `predict.py` and `train.py` are thin wrappers around `predict_main` / `train_main`.

This module imports nothing heavy: the signal handlers are in place before PyTorch, Lightning and transformers load
(seconds), so a job stopped while it starts still ends with one line and 128 + the signal number.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from lit_fast.signals import StopOnSignals, Stopped


def _main(mode: str, args: Any) -> int:
    # OpenMP threads that sleep between parallel regions instead of spinning: with another busy process on the
    # machine, spinning threads wait for descheduled peers at every region, and the fast path's many small CPU ops
    # ran several times slower (docs/MEASUREMENTS.md, "W6 on a busy machine"). Read when PyTorch loads, below.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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
