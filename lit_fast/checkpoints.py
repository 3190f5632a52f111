"""Checkpoints a run can be resumed from, bit for bit: `last.ckpt` written atomically at step boundaries, the random
number generators' states and the task's learned labels in every checkpoint, and what `--ckpt_path last|best` means.

Lightning saves the model, optimizer, schedule, loop progress and stateful loaders (data/batching.EpochLoader: the
position inside the epoch). It does not save the random generators; dropout draws from them, so a resumed run would
drift from an uninterrupted one without them (docs/TRAINING.md, "Resuming").
"""

from __future__ import annotations

import csv
import logging
import os
import pickle
import random
import re
import shutil
import signal
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only

from lit_fast.errors import ConfigError, LitFastError
from lit_fast.outputs import clean_stale, run_token, temp_sibling

log = logging.getLogger(__name__)

LAST = "last.ckpt"
STATE_KEY = "lit_fast"  # our part of a checkpoint: {"rng": [one state per rank], "labels": [...] or None}


class LastCheckpoint(Checkpoint):
    """`last.ckpt` beside the best checkpoint: every `every` optimizer steps, at the end of training, and where a stop
    lands. Also the step boundary where a held stop lands (single process: `signals`).

    A boundary is after the step's validation when one follows the step: a checkpoint taken before it would make
    Lightning skip that validation on resume, and one taken during it would resume scoring part of the rows. It is
    a Checkpoint so that Lightning runs it after the ModelCheckpoint that picks the best model, whose state it saves.
    """

    def __init__(self, every: Optional[int] = None, signals: Any = None) -> None:
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ConfigError(f"checkpoint_every must be a number of optimizer steps >= 1, or null for none; got "
                              f"{every!r}")
        self.every, self.signals = every, signals
        self.path: Optional[Path] = None
        self.saved_step: Optional[int] = None
        self._holding = False
        self._seen_step = 0
        self._stepped = False  # the last training batch ended with an optimizer step (not inside an accumulation)
        self._rng_to_restore: Optional[dict] = None

    # ---- where ------------------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        best = best_checkpoint_callback(trainer)
        self.path = Path(best.dirpath) / LAST if best is not None and best.dirpath else None
        if self.path is not None and trainer.is_global_zero:
            clean_stale(self.path)  # what a run killed while writing it left

    # ---- when -------------------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning drops a stateful loader's saved position when configure_optimizers asked for
        # estimated_stepping_batches (our schedules do): the loader was made before the checkpoint was read
        # (Lightning-AI/pytorch-lightning#20550). Our loader plans its epoch at the first batch, so loading it now works.
        trainer.fit_loop._load_combined_loader_states()
        if self._rng_to_restore is not None:
            # here, not when the checkpoint is read: building the model and optimizer since then drew numbers that
            # the uninterrupted run drew before the checkpoint
            _set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        self._seen_step = trainer.global_step
        # several ranks: Lightning stops them together at a step boundary on SIGTERM (RunEvents)
        self._holding = self.signals is not None and trainer.world_size == 1
        if self._holding:
            self.signals.hold()
            # one process: the stop is ours alone. Lightning's SIGTERM handler (set over ours for the fit) would
            # also stop the run at its own next check, which can come after an epoch has ended, in a state it does
            # not resume exactly (an epoch shortened by the batches of the one before)
            ours = trainer._signal_connector._original_handlers.get(signal.SIGTERM)
            if callable(ours):
                signal.signal(signal.SIGTERM, ours)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._stepped, self._seen_step = trainer.global_step != self._seen_step, trainer.global_step
        if self._stepped and not _validation_follows(trainer):
            self._boundary(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking and self._stepped:
            self._boundary(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        stopping = self._holding and self.signals.pending is not None
        if (self.every is not None or stopping) and trainer.global_step > 0 and self.saved_step != trainer.global_step:
            self.save(trainer)  # the final state: `lit-fast export --ckpt_path last` exports the last step's model
        if self._holding:
            self._holding = False
            self.signals.raise_pending()

    def _boundary(self, trainer) -> None:
        stopping = self._holding and self.signals.pending is not None
        due = self.every is not None and trainer.global_step % self.every == 0
        if (due or stopping) and self.saved_step != trainer.global_step:
            self.save(trainer)
        if self._holding:
            self.signals.raise_pending()  # a stop that arrived since the last boundary lands here
            self.signals.hold()

    # ---- how --------------------------------------------------------------------------------------------------
    def save(self, trainer) -> Optional[Path]:
        """Write last.ckpt: into a hidden sibling, flushed to disk, then renamed over the old one, so that whenever
        the run is killed the file there is a complete checkpoint (Lightning's own writes go through a temporary in
        the system's temp folder and a copy). Every rank calls it (a sharded checkpoint is written by all)."""
        if self.path is None or trainer.fast_dev_run:
            return None
        tmp = Path(trainer.strategy.broadcast(str(temp_sibling(self.path, "tmp", run_token()))))
        try:
            trainer.save_checkpoint(str(tmp), weights_only=False)
            if trainer.is_global_zero:
                _fsync(tmp)
                if self.path.is_dir() and not self.path.is_symlink():  # a sharded (FSDP) checkpoint is a folder
                    shutil.rmtree(self.path)
                os.replace(tmp, self.path)
                _fsync(self.path.parent)
        finally:
            if trainer.is_global_zero and os.path.lexists(tmp):  # a failed write: the old last.ckpt stays
                shutil.rmtree(tmp) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink()
        trainer.strategy.barrier("LastCheckpoint.save")
        self.saved_step = trainer.global_step
        return self.path

    # ---- what -------------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        states = [_rng_state()]
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            states = [None] * trainer.world_size  # every rank's own generators (all ranks save together)
            torch.distributed.all_gather_object(states, _rng_state())
        labels = getattr(pl_module, "labels", None)
        checkpoint[STATE_KEY] = {"rng": states, "labels": list(labels) if labels else None}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        saved = checkpoint.get(STATE_KEY) or {}
        check_labels(saved.get("labels"), getattr(pl_module, "labels", None))
        states = saved.get("rng") or []
        if not states:
            log.warning("the checkpoint holds no random generator states (not written by lit_fast): the resumed run "
                        "draws other dropout masks than an uninterrupted one would")
            return
        if len(states) != trainer.world_size:
            log.warning("the checkpoint was written by %d ranks, this run has %d: every rank resumes with rank 0's "
                        "random generators", len(states), trainer.world_size)
        self._rng_to_restore = states[trainer.global_rank] if len(states) == trainer.world_size else states[0]


def best_checkpoint_callback(trainer) -> Optional[ModelCheckpoint]:
    """The ModelCheckpoint that picks the best model (its folder holds last.ckpt too)."""
    return next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)


def check_labels(saved: Optional[list], current: Optional[list]) -> None:
    if saved and current and list(saved) != list(current):
        raise ConfigError(f"the checkpoint was trained with the labels {list(saved)}, but this run's are "
                          f"{list(current)}; resume on the same data, or pass --model.labels in the checkpoint's order")


def _validation_follows(trainer) -> bool:
    """Whether Lightning validates right after this training batch: its own test (loops/training_epoch_loop.py),
    and a validation split with batches (validation over no batches runs no hooks)."""
    loop = trainer.fit_loop.epoch_loop
    if getattr(loop, "_skip_next_val", False) or not loop._should_check_val_fx(trainer.fit_loop._data_fetcher):
        return False
    loop.val_loop.setup_data()  # what the validation does first (no work when its loaders exist)
    return not loop.val_loop.skip


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries (and, for a checkpoint folder, its files), to the disk."""
    paths = [path] if not path.is_dir() else [*(p for p in path.rglob("*") if p.is_file()), path]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError:  # some filesystems cannot fsync a folder; the rename is still atomic there
            pass
        finally:
            os.close(fd)


# ---- random generators ------------------------------------------------------------------------------------------
def _rng_state() -> dict:
    """torch (CPU and CUDA), Python's and NumPy's global generators, in types a weights-only load accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                       "gauss": float(gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            log.warning("the checkpoint has CUDA generator states of %d devices, this machine %d: not restored",
                        len(state["cuda"]), torch.cuda.device_count())


# ---- --ckpt_path ------------------------------------------------------------------------------------------------
def find_checkpoint(which: str, roots: list[Path]) -> Optional[Path]:
    """`last`: the newest last.ckpt in a `checkpoints` folder under `roots` (the runs' folders); `best`: the newest
    best checkpoint (`best-*.ckpt`). None when there is none."""
    pattern = LAST if which == "last" else "best-*.ckpt"
    found = {p for root in roots if root.is_dir() for p in root.rglob(pattern) if p.parent.name == "checkpoints"}
    return max(found, key=lambda p: (p.stat().st_mtime, str(p))) if found else None


def run_roots(default_root_dir: str, loggers: Any = ()) -> list[Path]:
    """Where runs keep their checkpoints: trainer.default_root_dir, and a logger's folder where it is elsewhere."""
    roots = [Path(default_root_dir).expanduser()]
    roots += [Path(lg.save_dir).expanduser() for lg in loggers or () if getattr(lg, "save_dir", None)]
    return roots


def named_checkpoint(value: str, words: tuple[str, ...], roots: list[Path],
                     run: tuple[Optional[str], Optional[str]]) -> Optional[Path]:
    """What `--ckpt_path` names: one of the `words` (last, best) or a checkpoint file (or a sharded checkpoint's
    folder). A word with nothing to find is None; a path that does not exist is an error, and so is a word that finds
    another experiment's checkpoint (the newest under a shared default_root_dir): `run` is this config's (model
    class_path, pretrained), compared with the config.yaml of the checkpoint's run."""
    if value not in words:
        path = Path(value).expanduser()
        if not path.exists():
            raise ConfigError(f"--ckpt_path {value}: no such checkpoint; give a .ckpt file of a run, or "
                              f"{' or '.join(words)}")
        return path
    path = find_checkpoint(value, roots)
    other = _other_run(path, run) if path is not None else None
    if other:
        raise ConfigError(f"--ckpt_path {value}: the newest {value} checkpoint under {roots[0]} is {path}, of another "
                          f"run ({other}); give the checkpoint's path, or use a --trainer.default_root_dir per "
                          "experiment")
    return path


def _other_run(checkpoint: Path, run: tuple[Optional[str], Optional[str]]) -> Optional[str]:
    """What differs (model class, pretrained weights) between `run` and the run of `checkpoint`, by the config.yaml
    in its run folder; None when they match or there is none."""
    import yaml

    saved_file = checkpoint.parent.parent / "config.yaml"
    try:
        saved = (yaml.safe_load(saved_file.read_text()) or {}).get("model") or {}
    except (OSError, yaml.YAMLError):
        return None
    theirs = (saved.get("class_path"), (saved.get("init_args") or {}).get("pretrained"))
    differ = [f"{key} {t}" for key, t, o in zip(("model", "pretrained"), theirs, run) if t != o]
    return ", ".join(differ) or None


def continue_run(trainer, checkpoint: Path) -> None:
    """A run resumed from a checkpoint in its own run folder (NAME/version_N/checkpoints/) continues in that folder:
    its logs and config.yaml go on there, and the best-model state the checkpoint holds applies (Lightning restores
    it only where the checkpoint folder is the same). Otherwise the run gets a new folder, as any run does."""
    logger = trainer.loggers[0] if trainer.loggers else None
    match = re.fullmatch(r"version_(\d+)", checkpoint.parent.parent.name)
    if logger is None or checkpoint.parent.name != "checkpoints" or match is None or not logger.save_dir:
        return
    folder = Path(logger.save_dir).expanduser() / (logger.name or "")
    if checkpoint.parent.parent.parent.resolve() != folder.resolve():
        return
    if getattr(logger, "_version", None) is None or not (folder / f"version_{logger._version}").exists():
        logger._version = int(match.group(1))  # CSV and TensorBoard loggers: the version to write, until first used
    if isinstance(logger, CSVLogger) and checkpoint.is_file():
        _keep_earlier_metrics(logger, checkpoint)


@rank_zero_only  # the logger's files are rank 0's
def _keep_earlier_metrics(logger, checkpoint: Path) -> None:
    """Lightning's CSV logger starts metrics.csv anew in a folder that has one: keep the rows of the steps the
    checkpoint holds (a row's step counts the optimizer steps before it), not those a killed run logged after it,
    which the resumed run logs again."""
    metrics = Path(logger.log_dir) / "metrics.csv"
    if not metrics.is_file():
        return
    try:
        step = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)["global_step"]
    except (OSError, RuntimeError, KeyError, pickle.UnpicklingError):
        return  # not a checkpoint it can read: loading it says so, with the reason
    with metrics.open(newline="") as file:
        rows = [{k: v for k, v in row.items() if v} for row in csv.DictReader(file)
                if (row.get("step") or "").isdigit() and int(row["step"]) < step]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "exists and is not empty ... will be deleted": the rows are in hand
        writer = logger.experiment
    writer.metrics = rows + writer.metrics
    writer.save()


def read_checkpoint(path: Path) -> dict:
    """A Lightning checkpoint file, read safely (`weights_only=True`: no pickled code runs)."""
    from lit_fast.models.loading import refused_pickle

    if path.is_dir():
        raise ConfigError(f"--ckpt_path {path} is a sharded checkpoint (a folder); export reads one file: train with "
                          "the FSDP strategy's state_dict_type: full, or consolidate it first "
                          "(python -m lightning.pytorch.utilities.consolidate_checkpoint)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure becomes one clear message
        refused = refused_pickle(str(path), err)
        if refused is not None:
            raise refused from None
        raise LitFastError(f"could not read checkpoint {path}: {err}".splitlines()[0]) from err
