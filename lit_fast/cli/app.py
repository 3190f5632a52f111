"""The commands' LightningCLI: parsing, the checks before any weights load, the run, and what it prints.

Config: `model` is any `LitTransformer` subclass (`class_path: lit_fast.Embedder`, ...), `data` is the
`TextDataModule`, `trainer` is Lightning's Trainer (devices, strategy, precision, plugins...). Every key can be
overridden on the command line (`--model.pretrained DIR`, `--trainer.devices 2`); `--print_config` shows the
whole resolved config.

Errors a user can fix (bad input, unknown keys, missing models) print as one line on stderr and exit with status
2; no traceback, no output file. A run stopped by SIGTERM, SIGINT or SIGHUP exits with 128 + the signal number
(143 for SIGTERM) and one line saying what was and was not written.
"""

from __future__ import annotations

import logging
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from lit_fast.checkpoints import LastCheckpoint, best_checkpoint_callback, continue_run, named_checkpoint, run_roots
from lit_fast.cli.export import export, export_checkpoint
from lit_fast.models import sharding
from lit_fast.console import HeldLogs, config_message, lit_fast_cause, one_line, quiet_libraries
from lit_fast.data.datamodule import TextDataModule
from lit_fast.errors import ConfigError, LitFastError
from lit_fast.tasks.causal_lm import CausalLM  # noqa: F401 - the task classes a config names, by short name too
from lit_fast.tasks.base import LitTransformer
from lit_fast.tasks.seq2seq import Seq2SeqLM  # noqa: F401
from lit_fast.tasks.classifier import Classifier  # noqa: F401
from lit_fast.tasks.embedder import Embedder  # noqa: F401
from lit_fast.tasks.reranker import Reranker  # noqa: F401
from lit_fast.tasks.token_classifier import TokenClassifier  # noqa: F401
from lit_fast.outputs import check_export_dir, check_output_file
from lit_fast.data.progress import ThroughputProgressBar
from lit_fast.models.precision_checks import (auto_precision, check_strategy_precision, explain_precision_errors,
                                              saved_dtype)
from lit_fast.models.quantization import quantizes_embeddings, training_refused
from lit_fast.data.readers import resolve_data_path
from lit_fast.signals import SIGNALS, StopOnSignals, Stopped
from lit_fast.data.writers import PredictionWriter

log = logging.getLogger("lit_fast")

# What a config may name as a class_path; anything else is refused before it is imported (--allow_import widens it).
ALLOWED_IMPORTS = ("lit_fast", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric",
                   "torch.optim")


class RunEvents(Callback):
    """What the command needs to know while the Trainer runs: when the run has really started (held log lines are
    printed), and the checkpoint left when a stop landed. Where a stop may land in training (a step boundary, never
    inside a step or its validation) is checkpoints.LastCheckpoint's to say."""

    def __init__(self, signals: StopOnSignals, logs: HeldLogs) -> None:
        self.signals, self.logs = signals, logs
        self.phase = "starting"
        self.checkpoint: Optional[str] = None
        self.last: Optional[LastCheckpoint] = None  # fit: the callback that writes last.ckpt

    def _started(self, phase: str) -> None:
        self.phase = phase
        self.logs.release()

    def on_predict_start(self, trainer, pl_module) -> None:
        self._started("predicting")

    def on_fit_start(self, trainer, pl_module) -> None:
        self._started("training")
        if trainer.world_size > 1:
            # With several ranks, Lightning stops them together on SIGTERM at a step boundary (its own handler); a
            # stop raised by one rank alone could leave the others waiting in a collective.
            self.signals.hold(signal_numbers=[s for s in SIGNALS if s.name == "SIGTERM"])

    def on_test_start(self, trainer, pl_module) -> None:
        self._started("testing")

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.phase == "starting":  # `lit-fast validate`; in fit, validation starts after training has
            self._started("validating")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        last = self.last
        if last is None or trainer.state.fn != "fit" or not isinstance(exception, (Stopped, SIGTERMException)):
            return
        epoch = trainer.fit_loop.epoch_progress.current
        if isinstance(exception, SIGTERMException) and trainer.global_step > 0 and epoch.completed < epoch.ready:
            # all ranks stopped together at a step boundary (Lightning's SIGTERM handling). Not where an epoch has
            # just ended: Lightning would resume that state inside the next epoch; the last checkpoint stands
            last.save(trainer)
        # a single process: LastCheckpoint wrote it at the boundary where the stop landed
        if last.saved_step is not None and last.path is not None:
            self.checkpoint = str(last.path)


class RunConfig(SaveConfigCallback):
    """config.yaml in the run's folder: the whole resolved config, so that `lit-fast fit --config THAT` repeats the
    run. A resumed run writes the same folder again (overwrite). Where it resumed from (ckpt_path) is left out, so a
    repeat starts from the beginning, and so is allow_import, which only the command line may say."""

    def __init__(self, parser, config, **kwargs) -> None:
        config = config.clone()
        config.ckpt_path, config.allow_import = None, None
        super().__init__(parser, config, **{**kwargs, "overwrite": True})


class LitCLI(LightningCLI):
    def __init__(self, mode: str, args: Any = None, events: Optional[RunEvents] = None):
        self.mode = mode
        self.events = events
        self.checkpoint: Optional[Path] = None  # fit: the checkpoint resumed from; export: the one exported
        super().__init__(
            LitTransformer,
            TextDataModule,
            subclass_mode_model=True,
            run=False,
            args=args,
            save_config_callback=RunConfig if mode == "train" else None,
            # train: LightningCLI's --optimizer / --lr_scheduler, handed to the task (below); export takes them too,
            # so that a training run's config.yaml serves it
            auto_configure_optimizers=mode in ("train", "export"),
            parser_kwargs={"exit_on_error": False},
            trainer_defaults={"default_root_dir": "runs"} if mode == "train" else
            {"logger": False, "enable_checkpointing": False, "enable_model_summary": False},
        )

    def add_arguments_to_parser(self, parser) -> None:
        # every subcommand takes these, so that one config serves them all (fit's export_dir, predict's output)
        parser.add_argument("--output", type=Optional[str], default=None,
                            help="predict: where predictions go (.jsonl or .parquet), one row per input row, in order")
        parser.add_argument("--export_dir", type=Optional[str], default=None,
                            help="fit: after training, write the best model here in Hugging Face format")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="replace an existing --output file, or an earlier lit_fast export in --export_dir")
        parser.add_argument("--ckpt_path", type=Optional[str], default=None,
                            help="fit: resume from this checkpoint; last: the newest last.ckpt under "
                                 "trainer.default_root_dir (none there: start from the beginning). export: the "
                                 "checkpoint to export (a file, last, or best)")
        parser.add_argument("--checkpoint_every", type=Optional[int], default=None,
                            help="fit: write last.ckpt (resume with --ckpt_path last) every N optimizer steps, "
                                 "atomically; also written at the end and when a stop lands")
        parser.add_argument("--allow_import", type=Optional[str], default=None,
                            help="modules (comma-separated) a class_path may name besides lit_fast, Lightning and "
                                 "torch.optim; command line only: a config cannot widen what it may import")

    def before_instantiate_classes(self) -> None:
        config = self.config
        if config.get("allow_import") != _allow_import_argument(self._args):
            raise ConfigError("allow_import can be given only on the command line (--allow_import MODULE): a config "
                              "file cannot widen what it may import")
        data = config.data
        inputs = [str(resolve_data_path(p)) for p in (data.get("path"), data.get("val_path"), data.get("test_path"))
                  if p]
        if config.get("ckpt_path") and self.mode not in ("train", "export"):
            raise ConfigError("--ckpt_path is for fit (resume) and export; to score a checkpoint, export it "
                              "(lit-fast export --ckpt_path PATH --export_dir DIR) and pass --model.pretrained DIR")
        LastCheckpoint(config.get("checkpoint_every"))  # checks the value
        # fail before loading any weights when the output cannot be written
        if self.mode == "predict":
            if not config.get("output"):
                raise ConfigError("no output file: pass --output PATH (.jsonl or .parquet)")
            check_output_file(config.output, config.overwrite, inputs)
        elif self.mode == "export":
            if not config.get("ckpt_path") or not config.get("export_dir"):
                raise ConfigError("export needs --ckpt_path (a checkpoint file, last or best) and --export_dir DIR, "
                                  "with the --config (and --model.*) of the training run")
            self.checkpoint = self._checkpoint_named(config.ckpt_path, ("last", "best"))
            if self.checkpoint is None:
                raise ConfigError(f"--ckpt_path {config.ckpt_path}: no {config.ckpt_path} checkpoint under "
                                  f"{self._root()} (trainer.default_root_dir); give the checkpoint file")
        if self.mode in ("train", "export") and config.get("export_dir"):
            protected = {f"the input {p}": p for p in inputs}
            protected["the checkpoints (trainer.default_root_dir)"] = self._root()
            if self.checkpoint is not None:
                protected["the checkpoint"] = str(self.checkpoint.parent)
            pretrained = config.model.init_args.get("pretrained") if config.model.get("init_args") else None
            if pretrained and Path(pretrained).expanduser().is_dir():
                protected["the model it starts from"] = pretrained
            check_export_dir(config.export_dir, config.overwrite, protected)
        trainer, model = config.trainer, config.model
        quantization = model.init_args.get("quantization") if model.get("init_args") else None
        if self.mode == "train" and quantizes_embeddings(quantization):
            raise training_refused(quantization)
        if quantization or trainer.get("plugins"):
            # bitsandbytes with FSDP/DeepSpeed, two quantization routes, the plugin on CPU: say so before loading
            check_strategy_precision(trainer.get("strategy"), trainer.get("plugins"), quantization,
                                     trainer.get("accelerator"), trainer.get("precision"))

    def _root(self) -> str:
        return self.config.trainer.get("default_root_dir") or "runs"

    def _checkpoint_named(self, value: str, words: tuple[str, ...], loggers: Any = ()) -> Optional[Path]:
        model = self.config.model
        run = (model.get("class_path"), model.init_args.get("pretrained") if model.get("init_args") else None)
        return named_checkpoint(value, words, run_roots(self._root(), loggers), run)

    def parse_arguments(self, parser, args) -> None:
        self._args = list(args) if args is not None else sys.argv[1:]
        super().parse_arguments(parser, args)

    def _add_configure_optimizers_method_to_model(self, subcommand: Optional[str]) -> None:
        # LightningCLI would build --optimizer on the model's parameters now, but the weights exist only after
        # configure_model: the task builds it then (LitTransformer.configure_optimizers)
        if self.auto_configure_optimizers:
            self.model.set_cli_optimizer(self._get(self.config_init, "optimizer"),
                                         self._get(self.config_init, "lr_scheduler"))

    def instantiate_trainer(self, **kwargs: Any):
        if self.mode == "train" and self._get(self.config_init, "trainer", {}).get("logger") in (None, True):
            # CSV unless --trainer.logger says otherwise (Lightning's default turns to TensorBoard where it is installed)
            from lightning.pytorch.loggers import CSVLogger

            root = self._get(self.config_init, "trainer", {}).get("default_root_dir") or "runs"
            kwargs.setdefault("logger", CSVLogger(save_dir=root))
        trainer_config = self._get(self.config_init, "trainer", {})
        if trainer_config.get("precision") is None and not trainer_config.get("plugins"):
            kwargs["precision"], why = auto_precision("train" if self.mode == "train" else "predict",
                                                      trainer_config.get("accelerator"), saved_dtype(self.model))
            log.info("precision: %s (auto: %s; set --trainer.precision to choose)", kwargs["precision"], why)
        try:
            with explain_precision_errors(getattr(self.model.hparams, "quantization", None)):
                trainer = super().instantiate_trainer(**kwargs)
        except LitFastError:
            raise
        except (ValueError, MisconfigurationException) as err:  # Lightning's own checks of the trainer settings
            raise ConfigError(f"the trainer settings do not work together: {one_line(err)}") from err
        if self.events is not None:
            trainer.callbacks.insert(0, self.events)  # first: held log lines print before the progress bar starts
        if self.mode == "predict":
            hold = self.events.signals.hold if self.events is not None else None
            trainer.callbacks.append(PredictionWriter(self.config.output, self.config.overwrite, before_publish=hold))
            bars = [c for c in trainer.callbacks if type(c) in (TQDMProgressBar, RichProgressBar)]
            if bars and trainer.progress_bar_callback is bars[0]:
                # Lightning's default bar, not one the user configured: show rows/s and tokens/s instead
                trainer.callbacks[trainer.callbacks.index(bars[0])] = ThroughputProgressBar()
        elif self.mode == "train":
            checkpoints = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
            if not any(c.monitor for c in checkpoints):
                # keep only the best model by the task's own metric (val_acc for classifiers, else val_loss); a
                # resumed run that repeats a killed run's save writes the same name, not best-...-v1
                for c in checkpoints:
                    trainer.callbacks.remove(c)
                monitor, mode = self.model.monitor
                trainer.callbacks.insert(0, ModelCheckpoint(monitor=monitor, mode=mode, save_top_k=1,
                                                            filename="best-{step}", enable_version_counter=False))
            last = LastCheckpoint(self.config.get("checkpoint_every"),
                                  self.events.signals if self.events is not None else None)
            trainer.callbacks.append(last)  # after the ModelCheckpoint, whose state last.ckpt holds
            if self.events is not None:
                self.events.last = last
            if self.config.get("ckpt_path"):
                self.checkpoint = self._checkpoint_named(self.config.ckpt_path, ("last",), trainer.loggers)
                if self.checkpoint is None:
                    log.info("--ckpt_path last: no last.ckpt under %s yet; starting from the beginning", self._root())
                else:
                    continue_run(trainer, self.checkpoint)
        return trainer


def _allow_import_argument(args: Optional[list[str]]) -> Optional[str]:
    """The value of --allow_import on the command line, read before parsing (which already imports)."""
    value = None
    args = list(args or [])
    for k, arg in enumerate(args):
        if arg == "--allow_import" and k + 1 < len(args):
            value = args[k + 1]
        elif arg.startswith("--allow_import="):
            value = arg.split("=", 1)[1]
    return value


def _modules(value: Optional[str]) -> list[str]:
    return [m.strip() for m in (value or "").split(",") if m.strip()]


@contextmanager
def _import_policy(extra: Optional[list[str]]) -> Iterator[None]:
    """Class paths in a config may import only ALLOWED_IMPORTS (and `extra`): checked by jsonargparse before it
    imports anything."""
    from jsonargparse import set_parsing_settings
    from jsonargparse._common import parsing_settings  # restored afterwards: the policy belongs to this run

    saved = {key: parsing_settings.get(key) for key in ("import_path_verdicts", "import_paths_enforced")}
    set_parsing_settings(import_path_denylist=["*"], import_path_allowlist=[*ALLOWED_IMPORTS, *(extra or [])])
    try:
        yield
    finally:
        parsing_settings.update(saved)


def _stopped_message(mode: str, stop: BaseException, events: RunEvents, config: Any) -> str:
    name = stop.name if isinstance(stop, Stopped) else "SIGTERM"
    if mode == "predict":
        output = config.get("output") if config is not None else None
        return (f"stopped by {name} before the predictions were complete; "
                + (f"nothing was written to {output} (a file already there is as it was)" if output else
                   "nothing was written"))
    parts = [f"stopped by {name} while {events.phase}"]
    if events.checkpoint:
        parts.append(f"a resumable checkpoint is at {events.checkpoint}")
    export_dir = config.get("export_dir") if config is not None else None
    if export_dir:
        parts.append(f"no export was written to {export_dir} (an earlier export there is as it was)")
    return "; ".join(parts)


def run(mode: str, args: Any, signals: StopOnSignals) -> int:
    """The command of `mode` (predict, train, validate or test), under `signals` (lit_fast/cli/__init__.py installs
    them)."""
    from jsonargparse import ArgumentError

    quiet_libraries()
    # the commands always pass their (normalized) arguments explicitly; Lightning warns when sys.argv holds some too
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter", category=UserWarning)
    body = {"predict": _predict, "train": _train, "validate": _evaluate, "test": _evaluate,
            "export": _export_command}[mode]
    cli: Optional[LitCLI] = None
    with HeldLogs() as logs, _import_policy(_modules(_allow_import_argument(
            args if args is not None else sys.argv[1:]))):
        events = RunEvents(signals, logs)
        try:
            cli = LitCLI(mode, args=args, events=events)
            body(cli, events)
            return 0
        except (Stopped, SIGTERMException) as stop:
            config = cli.config if cli is not None else None
            _error(_stopped_message(mode, stop, events, config))
            return stop.exit_code if isinstance(stop, Stopped) else 128 + 15
        except LitFastError as err:
            _error(one_line(err))
        except (ArgumentError, ValueError, TypeError, ImportError) as err:
            cause = lit_fast_cause(err)
            if cause is not None:
                _error(one_line(cause))
            elif (isinstance(err, ArgumentError) or type(err).__module__.startswith("jsonargparse")
                  or "Union subtypes" in str(err)):
                _error(f"invalid configuration: {config_message(err)} (see --help)")
            else:
                logs.release()  # a bug: show what led up to it with the traceback
                raise
        except BaseException:
            logs.release()
            raise
        finally:
            _leave_process_group()
    return 2


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def _leave_process_group() -> None:
    """Tear down torch.distributed before the interpreter exits. Left to the interpreter's exit, the process
    group's threads were destroyed while still joinable and a rank aborted after its work was done
    ("terminate called without an active exception"; seen with gloo under torchrun)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _predict(cli: LitCLI, events: RunEvents) -> None:
    """`predict`: one row per input row, written to --output in input order."""
    cli.trainer.predict(cli.model, datamodule=cli.datamodule, return_predictions=False)
    if cli.trainer.is_global_zero:
        writer = next(c for c in cli.trainer.callbacks if isinstance(c, PredictionWriter))
        print(f"wrote {writer.rows_written} rows to {writer.output}")


def _evaluate(cli: LitCLI, events: RunEvents) -> None:
    """`validate` / `test`: the model's metrics on every row of --data.path (or of the val/test file)."""
    cli.datamodule.evaluate_only = True
    run = cli.trainer.validate if cli.mode == "validate" else cli.trainer.test
    run(cli.model, datamodule=cli.datamodule)


def _train(cli: LitCLI, events: RunEvents) -> None:
    """`train`: fit, test on held-out rows, export the best model to --export_dir."""
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    if cli.checkpoint is not None:
        log.info("resuming from %s", cli.checkpoint)
        # the run goes on in its own folder, so Lightning's warning about a checkpoint folder with files is expected
        warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
    trainer.fit(model, datamodule=data, ckpt_path=str(cli.checkpoint) if cli.checkpoint else None, weights_only=True)
    chosen = _load_best(trainer, model, data)
    if "test" in data.splits:
        trainer.test(model, datamodule=data)
    if cli.config.get("export_dir"):
        events.phase = "exporting"
        fsdp = sharding.is_fsdp(trainer.strategy)
        state = sharding.full_state_dict(trainer) if fsdp else None  # a collective: every rank takes part
        if trainer.is_global_zero:
            export(model, cli.config.export_dir, cli.config.overwrite, state, before_publish=events.signals.hold)
            print(f"exported {chosen} to {cli.config.export_dir}")


def _load_best(trainer, model: LitTransformer, data: TextDataModule) -> str:
    """Load the best checkpoint's weights into `model`; where no validation ran during training (max_steps ended
    before the first one), validate the final model instead. Returns what will be exported, for the log."""
    callback = best_checkpoint_callback(trainer)
    best = callback.best_model_path if callback is not None else ""
    if best:
        if sharding.is_fsdp(trainer.strategy):  # sharded or full FSDP checkpoints: the strategy loads its own format
            trainer.strategy.load_model_state_dict(trainer.strategy.load_checkpoint(best), strict=True)
        else:
            model.load_weights(best)  # weights_only=True
        # a run resumed from a checkpoint outside its run folder knows the best path but not its score (Lightning)
        score = f"={float(callback.best_model_score):.4g}" if callback.best_model_score is not None else ""
        log.info("best checkpoint: %s (%s%s)", best, callback.monitor, score)
        return f"the best model ({callback.monitor}{score}, {Path(best).name})"
    if "val" not in data.splits:
        log.info("no validation rows: the final model (step %d) is the one exported", trainer.global_step)
        return f"the final model (step {trainer.global_step}; no validation rows)"
    log.info("no validation ran during training (it ended at step %d, before the first validation); validating the "
             "final model", trainer.global_step)
    metrics = trainer.validate(model, datamodule=data, verbose=False)[0]
    monitor = callback.monitor if callback is not None else None
    score = f", {monitor}={metrics[monitor]:.4g}" if monitor in metrics else ""
    log.info("exporting the final model (step %d%s): the only one validated", trainer.global_step, score)
    return f"the final model (step {trainer.global_step}{score}; validated after training)"


def _export_command(cli: LitCLI, events: RunEvents) -> None:
    """`export`: a checkpoint of a run -> the export `fit` writes (no training)."""
    events._started("exporting")
    export_checkpoint(cli.model, cli.checkpoint, cli.config.export_dir, cli.config.overwrite,
                      before_publish=events.signals.hold)
    print(f"exported {cli.checkpoint} to {cli.config.export_dir}")
