"""Exports: the model in the ecosystem's own format (a Hugging Face folder; sentence-transformers files for an embedder;
merged weights or the adapter for LoRA), written whole or not at all. `fit` exports its best model after training;
`lit-fast export` exports any checkpoint of a run, without training.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

from lit_fast.checkpoints import STATE_KEY, check_labels, read_checkpoint
from lit_fast.errors import ConfigError
from lit_fast.models import sharding
from lit_fast.outputs import clean_stale, publish_dir, run_token, temp_sibling, write_export_marker
from lit_fast.tasks.base import LitTransformer

log = logging.getLogger("lit_fast")


def export(model: LitTransformer, directory: str, overwrite: bool = False, gathered: Optional[dict] = None,
           before_publish: Optional[Callable[[], None]] = None) -> None:
    """Write into a hidden sibling folder, mark it as an export, then swap it in: no half-written export, and only an
    earlier export is ever replaced (outputs.py).

    `gathered`: the full state dict of a sharded (FSDP) model, exported through a fresh unsharded copy.
    `before_publish`: called just before the swap (the command holds stops from then on).
    """
    out = Path(os.path.abspath(Path(directory).expanduser()))
    clean_stale(out)
    token = run_token()
    tmp = temp_sibling(out, "tmp", token)
    try:
        if gathered is not None:
            sharding.export_consolidated(model, str(tmp), gathered)
        else:
            model.export(str(tmp))
        write_export_marker(tmp, task=type(model).__name__, pretrained=model.hparams.get("pretrained"))
        if before_publish is not None:
            before_publish()
        publish_dir(tmp, out, overwrite, token)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_checkpoint(model: LitTransformer, checkpoint: Path, directory: str, overwrite: bool = False,
                      before_publish: Optional[Callable[[], None]] = None) -> None:
    """`lit-fast export`: the weights of a Lightning checkpoint in `model` (built from the same config as the
    training run), exported as `fit` exports them."""
    state = read_checkpoint(checkpoint)
    saved = (state.get(STATE_KEY) or {}).get("labels")
    if hasattr(model, "labels"):
        # a classifier learns its labels from the training data, which export does not read: the checkpoint says
        check_labels(saved, model.labels)
        if model.labels is None:
            if not saved:
                raise ConfigError(f"--ckpt_path {checkpoint} does not say the classifier's labels (written before "
                                  "lit_fast saved them): pass --model.labels in training order")
            model.labels = list(saved)
    model.configure_model()  # the weights to load into: the architecture (LoRA wrapping included) of training
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as err:  # missing, unexpected or differently shaped weights
        raise ConfigError(f"--ckpt_path {checkpoint} does not fit this config's model ({type(model).__name__} of "
                          f"{model.hparams.get('pretrained')}): {str(err).splitlines()[0][:300]}; give the config and "
                          "--model.* of the training run") from None
    log.info("exporting %s (step %s)", checkpoint, state.get("global_step"))
    export(model, directory, overwrite, before_publish=before_publish)
