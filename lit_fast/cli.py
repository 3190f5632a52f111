"""LightningCLI front ends: `predict.py` and `train.py` are thin wrappers around `predict_main` / `train_main`.

Config: `model` is any `LitTransformer` subclass (`class_path: lit_fast.Embedder`, ...), `data` is the
`TextDataModule`, `trainer` is Lightning's Trainer (devices, strategy, precision, plugins...). Every key can be
overridden on the command line (`--model.pretrained DIR`, `--trainer.devices 2`); `--print_config` shows the
whole resolved config.

Errors a user can fix (bad input, unknown keys, missing models) print as one line on stderr and exit with status
2; no traceback, no output file.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI

from lit_fast import sharding
from lit_fast.data import TextDataModule
from lit_fast.errors import ConfigError, LitFastError, OutputExistsError
from lit_fast.module import LitTransformer
from lit_fast.progress import ThroughputProgressBar
from lit_fast.precision_checks import check_strategy_precision, explain_precision_errors
from lit_fast.quantization import quantizes_embeddings, training_refused
from lit_fast.writers import PredictionWriter, check_output

log = logging.getLogger("lit_fast")


class LitCLI(LightningCLI):
    def __init__(self, mode: str, args: Any = None):
        self.mode = mode
        predict = mode == "predict"
        super().__init__(
            LitTransformer,
            TextDataModule,
            subclass_mode_model=True,
            run=False,
            args=args,
            save_config_callback=None,
            auto_configure_optimizers=False,
            parser_kwargs={"exit_on_error": False},
            trainer_defaults={"logger": False, "enable_checkpointing": False, "enable_model_summary": False}
            if predict
            else {"default_root_dir": "runs"},
        )

    def add_arguments_to_parser(self, parser) -> None:
        if self.mode == "predict":
            parser.add_argument("--output", type=Optional[str], default=None,
                                help="where predictions go (.jsonl or .parquet): one row per input row, in input order")
        else:
            parser.add_argument("--export_dir", type=Optional[str], default=None,
                                help="after training, write the best model here in Hugging Face format")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="replace an existing --output / --export_dir")

    def before_instantiate_classes(self) -> None:
        # fail before loading any weights when the output cannot be written
        if self.mode == "predict":
            if not self.config.get("output"):
                raise ConfigError("no output file: pass --output PATH (.jsonl or .parquet)")
            check_output(self.config.output, self.config.overwrite)
        elif self.config.get("export_dir"):
            out = Path(self.config.export_dir)
            if out.exists() and any(out.iterdir()) and not self.config.overwrite:
                raise OutputExistsError(f"--export_dir {out} exists and is not empty; pass --overwrite true")
        trainer, model = self.config.trainer, self.config.model
        quantization = model.init_args.get("quantization") if model.get("init_args") else None
        if self.mode == "train" and quantizes_embeddings(quantization):
            raise training_refused(quantization)
        if quantization or trainer.get("plugins"):
            # bitsandbytes with FSDP/DeepSpeed, two quantization routes, the plugin on CPU: say so before loading
            check_strategy_precision(trainer.get("strategy"), trainer.get("plugins"), quantization,
                                     trainer.get("accelerator"), trainer.get("precision"))

    def instantiate_trainer(self, **kwargs: Any):
        with explain_precision_errors(getattr(self.model.hparams, "quantization", None)):
            trainer = super().instantiate_trainer(**kwargs)
        if self.mode == "predict":
            trainer.callbacks.append(PredictionWriter(self.config.output, self.config.overwrite))
            bars = [c for c in trainer.callbacks if type(c) in (TQDMProgressBar, RichProgressBar)]
            if bars and trainer.progress_bar_callback is bars[0]:
                # Lightning's default bar, not one the user configured: show rows/s and tokens/s instead
                trainer.callbacks[trainer.callbacks.index(bars[0])] = ThroughputProgressBar()
        else:
            checkpoints = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
            if not any(c.monitor for c in checkpoints):
                # keep only the best model by the task's own metric (val_acc for classifiers, else val_loss)
                for c in checkpoints:
                    trainer.callbacks.remove(c)
                monitor, mode = self.model.monitor
                trainer.callbacks.insert(0, ModelCheckpoint(monitor=monitor, mode=mode, save_top_k=1,
                                                            filename="best-{step}"))
        return trainer


def _quiet_libraries() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "huggingface_hub", "transformers", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for message in (".*does not have many workers.*", ".*IterableDataset. has .__len__. defined.*",
                    ".*Couldn't infer the batch indices.*", ".*LeafSpec.*is deprecated.*", ".*No seed found.*"):
        warnings.filterwarnings("ignore", message=message)
    warnings.filterwarnings("ignore", message=".*tensorboardX.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines) if lines else type(err).__name__


def _lit_fast_cause(err: BaseException) -> Optional[LitFastError]:
    """jsonargparse wraps errors raised while instantiating classes; find ours in the chain."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, LitFastError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _config_message(err: BaseException) -> str:
    text = _one_line(err)
    # "Problem with given class_path 'lit_fast.Embedder': Option 'bogus' is not accepted - Expected ..." -> the middle
    match = re.search(r"class_path '([^']+)': (.+?)(?: - Expected a <class 'NoneType'>| Given value|$)", text)
    if match:
        return f"{match.group(1)}: {match.group(2).strip()}"
    return text


def _run(mode: str, body, args: Any = None) -> int:
    from jsonargparse import ArgumentError

    _quiet_libraries()
    try:
        cli = LitCLI(mode, args=args)
        body(cli)
        return 0
    except LitFastError as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
    except (ArgumentError, ValueError, TypeError) as err:
        cause = _lit_fast_cause(err)
        if cause is not None:
            print(f"error: {_one_line(cause)}", file=sys.stderr)
        elif isinstance(err, ArgumentError) or type(err).__module__.startswith("jsonargparse") or "Union subtypes" in str(err):
            print(f"error: invalid configuration: {_config_message(err)} (see --help)", file=sys.stderr)
        else:
            raise
    finally:
        _leave_process_group()
    return 2


def _leave_process_group() -> None:
    """Tear down torch.distributed before the interpreter exits. Left to the interpreter's exit, the process
    group's threads were destroyed while still joinable and a rank aborted after its work was done
    ("terminate called without an active exception"; seen with gloo under torchrun)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def predict_main(args: Any = None) -> int:
    """`python predict.py --config configs/X.yaml --data.path IN --output OUT`."""

    def body(cli: LitCLI) -> None:
        cli.trainer.predict(cli.model, datamodule=cli.datamodule, return_predictions=False)
        if cli.trainer.is_global_zero:
            writer = next(c for c in cli.trainer.callbacks if isinstance(c, PredictionWriter))
            print(f"wrote {writer.rows_written} rows to {writer.output}")

    return _run("predict", body, args)


def train_main(args: Any = None) -> int:
    """`python train.py --config configs/X.yaml [--export_dir DIR]`: fit, test on held-out rows, export the best."""

    def body(cli: LitCLI) -> None:
        trainer, model, data = cli.trainer, cli.model, cli.datamodule
        trainer.fit(model, datamodule=data)
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        fsdp = sharding.is_fsdp(trainer.strategy)
        if best:
            if fsdp:  # sharded or full FSDP checkpoints: the strategy knows how to load its own format
                trainer.strategy.load_model_state_dict(trainer.strategy.load_checkpoint(best), strict=True)
            else:
                model.load_weights(best)  # weights_only=True
            log.info("best checkpoint: %s (%s=%s)", best, trainer.checkpoint_callback.monitor,
                     trainer.checkpoint_callback.best_model_score)
        if "test" in data.splits:
            trainer.test(model, datamodule=data)
        if cli.config.get("export_dir"):
            state = sharding.full_state_dict(trainer) if fsdp else None  # a collective: every rank takes part
            if trainer.is_global_zero:
                export(model, cli.config.export_dir, state)
                print(f"exported the {'best' if best else 'last'} model to {cli.config.export_dir}")

    return _run("train", body, args)


def export(model: LitTransformer, directory: str, gathered: Optional[dict] = None) -> None:
    """Write into a temporary sibling folder, then swap it in: no half-written export.

    `gathered`: the full state dict of a sharded (FSDP) model, exported through a fresh unsharded copy.
    """
    out = Path(directory).resolve()
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        if gathered is not None:
            sharding.export_consolidated(model, str(tmp), gathered)
        else:
            model.export(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
