"""The LightningModule base: loading, optimisation, and the switch between training and prediction paths.

Task modules (encoder.py: `Embedder`, `Classifier`; causal_lm.py: `CausalLM`; seq2seq.py: `Seq2SeqLM`) say what a
row means (`codec()`, tasks/codecs.py), what the loss is (`compute_loss`) and what a prediction row holds
(`predict_rows`), and what validation measures (`evaluate_batch`, `metrics()`: tasks/metrics.py).
This base owns the rest: where weights come from (`build_model`, called from `configure_model` so that strategies
such as FSDP can build on the meta device), the optimiser and schedule (tasks/optim.py, or LightningCLI's
--optimizer / --lr_scheduler), which metric picks the best checkpoint (`monitor`), the fast path seam for predict,
and whether training runs on packed rows (`packed_batches`; the losses then read a `PackedBatch`:
docs/PACKED_TRAINING.md).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

import lightning as L
import torch

from lit_fast.models import sharding
from lit_fast.training.ranks import rank_share
from lit_fast.tasks.optim import OptimizerName, build_optimizer, build_scheduler, check_optimizer
from lit_fast.errors import ConfigError, LitFastError, UnsupportedModelError
from lit_fast.models.loading import (
    load_config,
    load_pretrained,
    load_tokenizer,
    parse_dtype,
    refused_pickle,
    resolve_pretrained,
)

if TYPE_CHECKING:
    import torchmetrics

log = logging.getLogger(__name__)

FastPath = Literal["auto", "fused", "packed", "off"]
CudaGraphs = Literal["auto", "on", "off"]  # the fast path's CUDA graphs (fastpath/graphs.py)
CUDA_GRAPHS = {"auto": "auto", "on": True, "off": False}
Attention = Literal["sdpa", "eager", "flash_attention_2"]
Packing = Union[bool, Literal["auto"]]  # packed (padding-free) training rows: docs/PACKED_TRAINING.md


class LitTransformer(L.LightningModule):
    """Base class; not used directly in configs."""

    auto_model_class: Any = None  # transformers Auto* class, set by subclasses
    needs_label = False  # training rows need data.label_column
    needs_target = False  # training rows need data.target_column
    monitor = ("val_loss", "min")  # what "best" means for checkpoints and export (model.monitor chooses another)
    # what the task logs on validation and test (without the val_/test_ prefix), and which way is better
    metric_modes: dict[str, str] = {"loss": "min"}
    # model types this task trains on packed rows (lit_fast/training/heads.py); empty: padded batches only
    packing_types: frozenset[str] = frozenset()
    packs_on_cuda = True  # `packing: auto` packs on CUDA too (see _packing_measured_slower)

    def __init__(
        self,
        pretrained: str,
        *,
        revision: Optional[str] = None,
        trust_remote_code: bool = False,
        dtype: Optional[str] = None,
        attention: Attention = "sdpa",
        fast_path: FastPath = "auto",
        cuda_graphs: CudaGraphs = "auto",
        quantization: Optional[str] = None,
        max_length: Optional[int] = None,
        gradient_checkpointing: bool = False,
        packing: Packing = False,
        lr: float = 5e-5,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.06,
        optimizer: OptimizerName = "adamw",
        optimizer_kwargs: Optional[dict[str, Any]] = None,
        lr_scheduler: str = "linear",
        lr_scheduler_kwargs: Optional[dict[str, Any]] = None,
        monitor: Optional[str] = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        check_optimizer(optimizer, lr_scheduler)
        if monitor is not None:
            self.monitor = self._monitor_of(monitor)
        self._cli_optimizer: tuple[Any, Any] = (None, None)
        parse_dtype(dtype)  # validate early: a wrong name should fail before any weights load
        if cuda_graphs not in CUDA_GRAPHS:
            raise ConfigError(f"model.cuda_graphs={cuda_graphs!r} is unknown; use auto, on or off")
        if quantization:
            from lit_fast.models.quantization import check_fast_path, normalize_mode

            normalize_mode(quantization)
            check_fast_path(quantization, fast_path)
        if max_length is not None and max_length < 1:
            raise ConfigError(f"model.max_length must be a positive number of tokens, got {max_length}")
        self.source = resolve_pretrained(pretrained)
        self.tokenizer = load_tokenizer(pretrained, revision=revision, trust_remote_code=trust_remote_code)
        self.hf_config = load_config(pretrained, revision=revision, trust_remote_code=trust_remote_code)
        limit = position_limit(self.hf_config)
        if max_length is not None and limit is not None and max_length > limit and not _rotary(self.hf_config):
            raise ConfigError(f"model.max_length {max_length} is more than {pretrained} can take ({limit} positions); "
                              f"use at most {limit}")
        if packing not in ("auto", True, False):
            raise ConfigError(f"model.packing must be auto, true or false, got {packing!r}")
        if packing is True:  # what the config alone rules out fails before any data is read
            reason = self._packing_refusal(strategy=None)
            if reason:
                raise ConfigError(f"model.packing is true, but {reason}; use model.packing: auto or false")
        self._packing: Optional[bool] = None  # decided once, by packed_batches()
        self.model: Optional[torch.nn.Module] = None
        self.fast_path_used: Optional[str] = None
        self.default_max_length: Optional[int] = None  # a task may know better than the tokenizer (e.g. ST config)

    # ---- building ------------------------------------------------------------------------------------------
    @property
    def max_length(self) -> int:
        limit = self.hparams.max_length or self.default_max_length or getattr(self.tokenizer, "model_max_length", None)
        if not limit or limit > 1_000_000:  # tokenizers without a limit report a huge sentinel
            limit = 512
        return int(limit)

    def model_kwargs(self) -> dict[str, Any]:
        """Extra `from_pretrained` arguments of a task (e.g. num_labels)."""
        return {}

    def _strategy_kwargs(self) -> dict[str, Any]:
        """`from_pretrained` arguments the strategy needs (tensor parallel: the plan and the device mesh)."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        return sharding.tensor_parallel_kwargs(strategy) if sharding.is_model_parallel(strategy) else {}

    def quantization_config(self) -> Any:
        mode = self.hparams.quantization
        if not mode:
            return None
        from lit_fast.models.quantization import bnb_config

        return bnb_config(mode, compute_dtype=parse_dtype(self.hparams.dtype) if self.hparams.dtype else None)

    def build_model(self) -> torch.nn.Module:
        hp = self.hparams
        model = load_pretrained(
            hp.pretrained,
            self.auto_model_class,
            dtype=self._weights_dtype(),
            attention=hp.attention,
            revision=hp.revision,
            trust_remote_code=hp.trust_remote_code,
            quantization_config=self.quantization_config(),
            **self.model_kwargs(),
            **self._strategy_kwargs(),
        )
        if hp.quantization:
            from lit_fast.models.quantization import prepare_quantized_model

            prepare_quantized_model(model, hp.quantization)  # CPU kernel guards, footprint log line
        return model

    def _weights_dtype(self) -> Optional[str]:
        """model.dtype if set; else float32 under full and mixed precision, whose matmuls (or master weights) are
        fp32 but which leave the module as loaded: a model saved in fp16 ran fp16 on the CPU under "32-true"
        (several times slower; docs/MEASUREMENTS.md, W8) and would train fp16 weights under bf16-mixed. Else as
        saved (16-true / bf16-true convert it)."""
        hp = self.hparams
        if hp.dtype or hp.quantization or self._trainer is None:
            return hp.dtype
        return "float32" if str(self.trainer.precision) in ("32-true", "32", "16-mixed", "bf16-mixed") else None

    def build_empty_model(self) -> torch.nn.Module:
        """The same architecture without loading weights (for ranks that receive them from rank 0)."""
        from lit_fast.models.loading import load_config

        hp = self.hparams
        config = load_config(hp.pretrained, revision=hp.revision, trust_remote_code=hp.trust_remote_code,
                             **self.model_kwargs())
        return self.auto_model_class.from_config(config, attn_implementation=hp.attention,
                                                 trust_remote_code=hp.trust_remote_code)

    def configure_model(self) -> None:
        if not hasattr(self, "val_metrics"):  # here, after setup (a classifier knows its labels), before devices
            self.val_metrics = torch.nn.ModuleDict(self.metrics())
            self.test_metrics = torch.nn.ModuleDict(self.metrics())
        if self.model is not None:
            return
        strategy = self._trainer.strategy if self._trainer is not None else None
        if sharding.is_fsdp(strategy):
            lora = getattr(self, "lora", None)
            self.model = sharding.build_for_fsdp(self.build_model, self.build_empty_model, strategy,
                                                 lora.fsdp_units if lora is not None else "separate")
        else:
            self.model = self.build_model()
        self._no_decay_names = _no_decay_names(self.model)  # before FSDP flattens the parameters
        if self.hparams.get("gradient_checkpointing"):
            # recompute each block's activations in backward: much less memory for ~30% more compute
            kwargs = {"use_reentrant": False}
            if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.2x
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    # ---- task hooks (subclasses) ---------------------------------------------------------------------------
    def prepare_data_splits(self, splits: dict[str, list[dict]]) -> None:
        """Called by the DataModule with the records of every split before encoding (e.g. to learn labels)."""

    def codec(self):
        """What a row means to this task (tasks/codecs.py): handed to the DataModule and its loader workers."""
        raise NotImplementedError

    def compute_loss(self, batch: dict) -> torch.Tensor:
        raise ConfigError(f"{type(self).__name__} cannot be trained (no loss is defined for this task)")

    def evaluate_batch(self, batch: dict) -> dict[str, Any]:
        """Validation/test values of one batch (one forward): "loss" and whatever else the task measures. A name of
        `metrics()` maps to that metric's update arguments (a tuple); any other name to a scalar, logged as the
        batch-size-weighted mean over the epoch."""
        return {"loss": self.compute_loss(batch)}

    def metrics(self) -> dict[str, "torchmetrics.Metric"]:
        """Fresh torchmetrics objects of this task, by name without the val_/test_ prefix (tasks/metrics.py): one
        set for validation, one for test; updated per batch, computed per epoch, synchronised across ranks."""
        return {}

    def predict_rows(self, batch: dict) -> list[dict]:
        raise NotImplementedError

    def export(self, directory: str) -> None:
        """Write the model in Hugging Face format (plus tokenizer) so that plain transformers loads it."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)

    # ---- packed training (docs/PACKED_TRAINING.md) ----------------------------------------------------------
    def packed_batches(self) -> bool:
        """Whether training, validation and test batches are packed rows (`PackedBatch`): decided once (the
        DataModule asks in setup, before the weights load) from model.packing, the model type and the strategy,
        with one log line saying what runs and why."""
        if self._packing is None:
            self._packing = self._decide_packing()
        return self._packing

    def _decide_packing(self) -> bool:
        asked = self.hparams.get("packing", False)
        if not self.packing_types:
            if asked == "auto":
                log.info("packing: off (%s trains on padded batches only): padded batches", type(self).__name__)
            return False
        if asked is False:
            log.info("packing: off (model.packing is false): padded batches")
            return False
        strategy = self._trainer.strategy if self._trainer is not None else None
        reason = self._packing_refusal(strategy)
        if reason:
            if asked is True:
                raise ConfigError(f"model.packing is true, but {reason}; use model.packing: auto or false")
            log.info("packing: off (%s): padded batches", reason)
            return False
        slower = self._packing_measured_slower(_root_device_type(strategy)) if asked == "auto" else None
        if slower:
            log.info("packing: off (%s; docs/PACKED_TRAINING.md, W3): padded batches; model.packing: true packs "
                     "anyway", slower)
            return False
        log.info("packing: on (%s is supported): each batch is one row of its examples' real tokens, attention "
                 "inside each example; model.packing: false pads instead", self.hf_config.model_type)
        return True

    def _packing_measured_slower(self, device: Optional[str]) -> Optional[str]:
        """Why `auto` pads on this device although packing is supported: where W3 measured packed steps slower than
        padded ones at steady state (an H100: the packed BERT-base step, whose host work the GPU waits for). None
        where packing is on. Attention dropout no longer counts: flash varlen runs it at the speed of no dropout."""
        if device == "cuda" and not self.packs_on_cuda:
            return f"packed {type(self).__name__} steps measured slower than padded ones on CUDA"
        return None

    def _packing_refusal(self, strategy: Any) -> Optional[str]:
        """Why this run cannot train on packed rows, or None."""
        name, model_type = type(self).__name__, self.hf_config.model_type
        if not self.packing_types:
            return f"{name} trains on padded batches only"
        if model_type not in self.packing_types:
            return (f"{name} trains packed {', '.join(sorted(self.packing_types))} models, not {model_type} "
                    "(its head or attention is not checked against the padded model yet)")
        if self.hparams.attention != "sdpa":
            return f"model.attention is {self.hparams.attention}, and packed rows bring their own attention"
        if sharding.is_fsdp(strategy) or sharding.is_model_parallel(strategy):
            return f"packed rows are not implemented under {type(strategy).__name__}"
        return None

    def _packed_attention(self, on: bool) -> None:
        """The packed rows' attention for training and evaluation; the configured one back for predict, whose
        fast paths expect it (padded batches give the same numbers under both)."""
        if not self._packing or self.model is None:
            return
        from lit_fast.training.attention import NAME, use_packed_attention

        current = self.model.config._attn_implementation
        if on and current != NAME:
            use_packed_attention(self.model)
        elif not on and current == NAME:
            self.model.set_attn_implementation(self.hparams.attention)

    # ---- training ------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        from lit_fast.models.quantization import quantizes_embeddings, training_refused

        if quantizes_embeddings(self.hparams.quantization):  # own training loops; the CLI says so before loading
            raise training_refused(self.hparams.quantization)
        self._revert_fast_path()
        self._packed_attention(True)
        # from_pretrained returns the model in eval mode and Lightning keeps a module's mode: without this,
        # dropout would be off for the whole fine-tune
        self.model.train()

    def on_validation_start(self) -> None:
        self._packed_attention(True)  # `lit-fast validate`, or a predict before this fit in the same process

    def on_test_start(self) -> None:
        self._packed_attention(True)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=_rows(batch))
        if getattr(batch, "num_targets", 0) > 0:  # a packed batch's mean over num_targets units
            loss = loss * rank_share(batch.num_targets, loss.device)
        return loss

    def _eval_step(self, batch: dict, prefix: str) -> None:
        n = _rows(batch)
        metrics = getattr(self, f"{prefix}_metrics", None) or {}
        for name, value in self.evaluate_batch(batch).items():
            if name in metrics:  # Lightning computes, logs and resets the metric object at the epoch's end
                metrics[name].update(*value)
                self.log(f"{prefix}_{name}", metrics[name], prog_bar=True, on_step=False, on_epoch=True)
            else:
                self.log(f"{prefix}_{name}", value, prog_bar=True, batch_size=n, sync_dist=True)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def parameter_groups(self) -> list[dict]:
        """The trainable parameters of `self.model` in two groups: with weight decay, and without (biases, norms).
        A task with trainable parameters elsewhere adds its own groups to these."""
        decay, no_decay = [], []
        # by the shape each parameter had before any wrapping: under FSDP every parameter is a flat 1-D shard here
        shaped = getattr(self, "_no_decay_names", None) or _no_decay_names(self.model)
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if _plain_name(name) in shaped else decay).append(p)
        return [{"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    def set_cli_optimizer(self, optimizer: Any, lr_scheduler: Any) -> None:
        """LightningCLI's --optimizer / --lr_scheduler (class path and init args, not yet built): they replace the
        task's optimizer / schedule once the weights exist (configure_model runs after the CLI is done)."""
        self._cli_optimizer = (optimizer, lr_scheduler)

    def configure_optimizers(self):
        hp = self.hparams
        groups = self.parameter_groups()
        optimizer_init, scheduler_init = self._cli_optimizer
        if optimizer_init:
            from lightning.pytorch.cli import instantiate_class

            log.info("optimizer: %s from --optimizer (model.optimizer, lr, weight_decay and, without --lr_scheduler, "
                     "model.lr_scheduler are not used)", optimizer_init.get("class_path"))
            # the user's weight_decay (or the optimizer's default) applies; biases and norms still get none
            groups = [{"params": groups[0]["params"]}, *groups[1:]]
            optimizer = instantiate_class(groups, optimizer_init)
        else:
            optimizer = build_optimizer(hp.get("optimizer", "adamw"), groups, hp.lr, hp.get("optimizer_kwargs"))
        if scheduler_init:  # LightningCLI's semantics: stepped once per epoch
            from lightning.pytorch.cli import instantiate_class

            scheduler = instantiate_class(optimizer, scheduler_init)
            config = {"scheduler": scheduler}
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                config["monitor"] = getattr(scheduler, "monitor", None) or self.monitor[0]
            return {"optimizer": optimizer, "lr_scheduler": config}
        if optimizer_init:
            return {"optimizer": optimizer}
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = build_scheduler(hp.get("lr_scheduler", "linear"), optimizer, int(total * hp.warmup_ratio), total,
                                    hp.get("lr_scheduler_kwargs"))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _monitor_of(self, name: str) -> tuple[str, str]:
        """(name, mode) of a validation metric this task logs, or a ConfigError listing them."""
        modes = {f"val_{metric}": mode for metric, mode in self.metric_modes.items()}
        if name not in modes:
            raise ConfigError(f"model.monitor={name!r} is not a metric {type(self).__name__} logs; use one of "
                              f"{', '.join(modes)}")
        return name, modes[name]

    # ---- prediction ----------------------------------------------------------------------------------------
    def on_predict_start(self) -> None:
        self.model.eval()
        self._packed_attention(False)
        self._enable_fast_path()

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        return self.predict_rows(batch)

    def fast_path_options(self) -> "FastPathOptions":
        from lit_fast.fastpath import FastPathOptions

        return FastPathOptions(backend=self.hparams.fast_path, cuda_graphs=CUDA_GRAPHS[self.hparams.cuda_graphs])

    def _enable_fast_path(self) -> None:
        """The seam where the encoder fast path switches on (after the model is on its device and dtype): planned
        once, installed when it will run, one log line either way."""
        requested = self.hparams.fast_path
        attention = self.hparams.attention
        if requested == "off":
            self.fast_path_used = None
            log.info("fast path: off (model.fast_path=off); using %s attention", attention)
            return
        strategy = self._trainer.strategy if self._trainer is not None else None  # None: in-memory API
        if sharding.is_fsdp(strategy) or sharding.is_model_parallel(strategy):
            # the fast path calls layers' weights directly, around the hooks that sharded strategies rely on
            if requested != "auto":
                raise ConfigError(f"model.fast_path={requested} does not combine with sharded strategies; use ddp or auto")
            log.info("fast path: not used under %s; using %s attention", type(strategy).__name__,
                     attention)
            return
        from lit_fast.fastpath import plan_fast_path

        device = next(self.model.parameters()).device
        plan = plan_fast_path(self.model, self.fast_path_options(), device, self._compute_dtype())
        if plan.backend is None:
            log.info("fast path: not used (%s); using %s attention", plan.reason, attention)
            return
        # the requested mode stays on the model: under "auto" the fast path still hands a batch back to HF where it
        # would not be faster (e.g. almost no padding)
        plan.install()
        self.fast_path_used = plan.backend
        log.info("fast path: %s (%s)", plan.backend, plan.reason)

    def _revert_fast_path(self) -> None:
        if self.fast_path_used is None or self.model is None:
            return
        from lit_fast import fastpath

        fastpath.revert_fast_path(self.model)
        self.fast_path_used = None

    def _compute_dtype(self) -> torch.dtype:
        """The dtype matmuls run in under the trainer's precision (autocast included)."""
        precision = str(getattr(self.trainer, "precision", "32-true")) if self._trainer is not None else "32-true"
        if precision.startswith("bf16"):
            return torch.bfloat16
        if precision.startswith("16"):
            return torch.float16
        return next(self.model.parameters()).dtype

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def load_weights(self, checkpoint_path: str) -> None:
        """Load a Lightning checkpoint's weights safely (`weights_only=True`)."""
        try:
            state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure becomes one clear message
            refused = refused_pickle(checkpoint_path, err)
            if refused is not None:
                raise refused from None
            raise LitFastError(f"could not read checkpoint {checkpoint_path}: {err}".splitlines()[0]) from err
        self.load_state_dict(state["state_dict"])


def _rows(batch: Any) -> int:
    """Examples in a batch: a padded batch's, or a packed one's (`num_examples`: a `PackedBatch`, or a task's own
    packed batch such as the Embedder's `PackedContrastive`)."""
    return batch.num_examples if hasattr(batch, "num_examples") else len(batch["index"])


# Models whose position ids start after the padding index (RoBERTa's embeddings): that many fewer usable positions.
_POSITIONS_AFTER_PADDING = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "longformer")


def position_limit(config) -> Optional[int]:
    """How many tokens the model has position embeddings for; None for relative positions (T5)."""
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not positions:
        return None
    if getattr(config, "model_type", None) in _POSITIONS_AFTER_PADDING and config.pad_token_id is not None:
        positions -= config.pad_token_id + 1
    return int(positions)


def _rotary(config) -> bool:
    """Rotary positions (Llama family): the trained context is a default, not a table that ends there."""
    return any("rope" in key or "rotary" in key for key in config.to_dict())


_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _plain_name(name: str) -> str:
    """A parameter's name without the segments FSDP, activation checkpointing and torch.compile insert."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _no_decay_names(model: torch.nn.Module) -> set[str]:
    """Parameters that get no weight decay: biases, norm weights and other vectors (by their unwrapped shape)."""
    return {_plain_name(name) for name, p in model.named_parameters() if p.ndim < 2 or "norm" in name.lower()}


def _root_device_type(strategy: Any) -> Optional[str]:
    try:
        return strategy.root_device.type if strategy is not None else None
    except (AttributeError, TypeError, IndexError):  # a strategy not set up yet has no device to ask
        return None
