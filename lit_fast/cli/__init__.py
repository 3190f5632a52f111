"""The commands: `lit-fast SUBCOMMAND` (and `python -m lit_fast`), with `predict.py` / `train.py` as thin wrappers.

This module imports nothing heavy: the signal handlers are in place before PyTorch, Lightning and transformers load
(seconds), so a job stopped while it starts still ends with one line and 128 + the signal number.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

from lit_fast.signals import StopOnSignals, Stopped

CONFIGS = Path(__file__).resolve().parent.parent / "configs"  # shipped with the package, named without a path

USAGE = """usage: lit-fast {predict,fit,validate,test,export,configs} [--config NAME|PATH] [--key value ...]

  predict    one output row per input row:  lit-fast predict --config embed-minilm --data.path IN --output OUT
  fit        fine-tune, test on held-out rows, export the best model:  lit-fast fit --config classify-rotten \\
               --export_dir DIR   (resume a stopped run: --ckpt_path last; last.ckpt every N steps:
               --checkpoint_every N)
  validate   score a model on --data.path (every row; or --data.val_path)
  test       the same with test metrics (every row of --data.path; or --data.test_path)
  export     a checkpoint of a run -> the export fit writes, without training:  lit-fast export \\
               --config classify-rotten --ckpt_path last|best|PATH --export_dir DIR
  configs    list the configs that ship with lit_fast (name them without a path)

`lit-fast SUBCOMMAND --help` lists every key; `--print_config` shows the resolved config.
"""

MODES = {"predict": "predict", "fit": "train", "train": "train", "validate": "validate", "test": "test",
         "export": "export"}


def _main(mode: str, args: Any, whole_process: Optional[bool] = None) -> int:
    """`whole_process`: the command line's own process (default: when `args` is None, i.e. read from sys.argv),
    not a call from Python code."""
    # OpenMP threads that sleep between parallel regions instead of spinning: with another busy process on the
    # machine, spinning threads wait for descheduled peers at every region, and the fast path's many small CPU ops
    # ran several times slower (docs/MEASUREMENTS.md, "W6 on a busy machine"). Read when PyTorch loads, below.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    whole_process = args is None if whole_process is None else whole_process
    args = normalize_args(list(args) if args is not None else sys.argv[1:])
    with StopOnSignals(ignore_after=whole_process) as signals:
        try:
            from lit_fast.cli import app
        except Stopped as stop:
            print(f"error: {stop} while starting; nothing was written", file=sys.stderr)
            return stop.exit_code
        return app.run(mode, args, signals)


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIGS.glob("*.yaml"))


def normalize_args(args: list[str]) -> list[str]:
    """`--config NAME` names a shipped config (lit_fast/configs/NAME.yaml) unless NAME is a file here;
    `--trainer.precision auto` is the same as leaving it unset."""
    out = list(args)
    for k, arg in enumerate(out):
        if arg == "--trainer.precision" and k + 1 < len(out) and out[k + 1] == "auto":
            out[k + 1] = "null"  # unset is auto (app.auto_precision); Lightning's own choices have no "auto"
        elif arg == "--trainer.precision=auto":
            out[k] = "--trainer.precision=null"
        if arg == "--config" and k + 1 < len(out):
            out[k + 1] = _config_path(out[k + 1])
        elif arg.startswith("--config="):
            out[k] = "--config=" + _config_path(arg.split("=", 1)[1])
    return out


def _config_path(value: str) -> str:
    if Path(value).expanduser().exists() or "/" in value or os.sep in value:
        return value
    shipped = CONFIGS / (value if value.endswith((".yaml", ".yml")) else f"{value}.yaml")
    return str(shipped) if shipped.is_file() else value


def predict_main(args: Any = None) -> int:
    """`python predict.py --config X --data.path IN --output OUT` (the same as `lit-fast predict`)."""
    return _main("predict", args)


def train_main(args: Any = None) -> int:
    """`python train.py --config X [--export_dir DIR]` (the same as `lit-fast fit`): fit, test on held-out rows,
    export the best."""
    return _main("train", args)


def main(argv: Optional[list[str]] = None) -> int:
    """`lit-fast SUBCOMMAND [--config NAME|PATH] [--key value ...]`."""
    whole_process = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "configs":
        for name in shipped_configs():
            print(name)
        return 0
    if command in ("--version", "version"):
        from lit_fast import __version__

        print(__version__)
        return 0
    if command not in MODES:
        print(f"error: unknown command {command!r}; use one of predict, fit, validate, test, export, configs "
              "(lit-fast --help)", file=sys.stderr)
        return 2
    return _main(MODES[command], rest, whole_process)
