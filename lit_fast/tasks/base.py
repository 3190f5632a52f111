"""The LightningModule base: loading, optimisation, and the switch between training and prediction paths.

Task modules (encoder.py: `Embedder`, `Classifier`; causal_lm.py: `CausalLM`; seq2seq.py: `Seq2SeqLM`) say what a
row means (`codec()`, tasks/codecs.py), what the loss is (`compute_loss`) and what a prediction row holds
(`predict_rows`).
This base owns the rest: where weights come from (`build_model`, called from `configure_model` so that strategies
such as FSDP can build on the meta device), the optimiser, and the fast path seam for predict.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal, Optional

import lightning as L
import torch

from lit_fast.models import sharding
from lit_fast.errors import ConfigError, LitFastError, UnsupportedModelError
from lit_fast.models.loading import (
    load_config,
    load_pretrained,
    load_tokenizer,
    parse_dtype,
    refused_pickle,
    resolve_pretrained,
)

log = logging.getLogger(__name__)

FastPath = Literal["auto", "fused", "packed", "off"]
CudaGraphs = Literal["auto", "on", "off"]  # the fast path's CUDA graphs (fastpath/graphs.py)
CUDA_GRAPHS = {"auto": "auto", "on": True, "off": False}
Attention = Literal["sdpa", "eager", "flash_attention_2"]


class LitTransformer(L.LightningModule):
    """Base class; not used directly in configs."""

    auto_model_class: Any = None  # transformers Auto* class, set by subclasses
    needs_label = False  # training rows need data.label_column
    needs_target = False  # training rows need data.target_column
    monitor = ("val_loss", "min")  # what "best" means for checkpoints and export

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
        lr: float = 5e-5,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.06,
    ):
        super().__init__()
        self.save_hyperparameters()
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
            dtype=hp.dtype,
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

    def build_empty_model(self) -> torch.nn.Module:
        """The same architecture without loading weights (for ranks that receive them from rank 0)."""
        from lit_fast.models.loading import load_config

        hp = self.hparams
        config = load_config(hp.pretrained, revision=hp.revision, trust_remote_code=hp.trust_remote_code,
                             **self.model_kwargs())
        return self.auto_model_class.from_config(config, attn_implementation=hp.attention,
                                                 trust_remote_code=hp.trust_remote_code)

    def configure_model(self) -> None:
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

    def evaluate_batch(self, batch: dict) -> dict[str, torch.Tensor]:
        """Validation/test metrics of one batch: "loss" and whatever else the task measures (one forward)."""
        return {"loss": self.compute_loss(batch)}

    def predict_rows(self, batch: dict) -> list[dict]:
        raise NotImplementedError

    def export(self, directory: str) -> None:
        """Write the model in Hugging Face format (plus tokenizer) so that plain transformers loads it."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)

    # ---- training ------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        from lit_fast.models.quantization import quantizes_embeddings, training_refused

        if quantizes_embeddings(self.hparams.quantization):  # own training loops; the CLI says so before loading
            raise training_refused(self.hparams.quantization)
        self._revert_fast_path()
        # from_pretrained returns the model in eval mode and Lightning keeps a module's mode: without this,
        # dropout would be off for the whole fine-tune
        self.model.train()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["index"]))
        return loss

    def _eval_step(self, batch: dict, prefix: str) -> None:
        n = len(batch["index"])
        for name, value in self.evaluate_batch(batch).items():
            self.log(f"{prefix}_{name}", value, prog_bar=True, batch_size=n, sync_dist=True)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        # by the shape each parameter had before any wrapping: under FSDP every parameter is a flat 1-D shard here
        shaped = getattr(self, "_no_decay_names", None) or _no_decay_names(self.model)
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if _plain_name(name) in shaped else decay).append(p)
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = all(p.is_cuda for p in decay + no_decay) and bool(decay + no_decay)
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, fused=fused or None)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(total * hp.warmup_ratio)

        def schedule(step: int) -> float:  # linear warm-up, then linear decay to 0
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(1, total - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- prediction ----------------------------------------------------------------------------------------
    def on_predict_start(self) -> None:
        self.model.eval()
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
        if sharding.is_fsdp(self.trainer.strategy) or sharding.is_model_parallel(self.trainer.strategy):
            # the fast path calls layers' weights directly, around the hooks that sharded strategies rely on
            if requested != "auto":
                raise ConfigError(f"model.fast_path={requested} does not combine with sharded strategies; use ddp or auto")
            log.info("fast path: not used under %s; using %s attention", type(self.trainer.strategy).__name__,
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

