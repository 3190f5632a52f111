"""Lightning strategies and precision settings next to bitsandbytes quantization: what cannot work, said up front.

Two routes quantize a model (lit_fast.models.quantization): ``--model.quantization`` and Lightning's
``BitsandbytesPrecision`` plugin. :func:`check_strategy_precision` refuses, before the Trainer is built, the
combinations that Lightning or bitsandbytes cannot run, with a ConfigError that says what works instead;
:func:`explain_precision_errors` turns the bare errors Lightning raises for the rest into such ConfigErrors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from lit_fast.errors import ConfigError
from lit_fast.models.quantization import normalize_mode


def _class_name(obj: Any) -> str:
    """The class an object, a class path string, or a jsonargparse {class_path: ...} dict stands for."""
    if obj is None:
        return ""
    if isinstance(obj, Mapping):
        obj = obj.get("class_path", "")
    elif not isinstance(obj, (str, type)) and isinstance(getattr(obj, "class_path", None), str):
        obj = obj.class_path  # a jsonargparse Namespace, before instantiation
    if isinstance(obj, str):
        return obj.rsplit(".", 1)[-1]
    return obj.__name__ if isinstance(obj, type) else type(obj).__name__


def _is_bnb_precision(plugin: Any) -> bool:
    return "bitsandbytes" in _class_name(plugin).lower()


def check_strategy_precision(strategy: Any = None, plugins: Any = None, quantization: str | None = None,
                             accelerator: Any = None, precision: Any = None) -> None:
    """Refuse, with a ConfigError that says what works, combinations that Lightning or bitsandbytes cannot run.

    * both routes at once (``--model.quantization`` and a ``BitsandbytesPrecision`` plugin) would quantize twice;
    * bitsandbytes weights with a sharding strategy (FSDP, DeepSpeed, ModelParallel): Lightning's FSDP strategy
      only accepts ``FSDPPrecision`` (it raises a bare TypeError), and lit_fast does not shard 4/8-bit weights;
    * the plugin off CUDA (Lightning raises "Bitsandbytes is only supported on CUDA GPUs");
    * the plugin next to a ``precision`` setting (Lightning raises "Received both precision=... and plugins=...").
    Arguments may be objects, strings or (unparsed) jsonargparse class_path configs.
    """
    mode = normalize_mode(quantization)
    plugin_list = plugins if isinstance(plugins, (list, tuple)) else ([] if plugins is None else [plugins])
    plugin = next((p for p in plugin_list if _is_bnb_precision(p)), None)
    if plugin is not None and mode is not None:
        raise ConfigError(f"--model.quantization {mode} and the BitsandbytesPrecision plugin both quantize the "
                          "weights: keep one (--model.quantization is recommended; remove it from --trainer.plugins).")
    if plugin is None and mode is None:
        return
    what = f"--model.quantization {mode}" if mode else "the BitsandbytesPrecision plugin"
    strategy_name = _class_name(strategy).lower()
    if any(key in strategy_name for key in ("fsdp", "deepspeed", "modelparallel", "model_parallel")):
        raise ConfigError(
            f"{what} does not combine with the {strategy_name!r} strategy (Lightning's FSDP accepts only "
            "FSDPPrecision, and sharded 4/8-bit weights are not supported here). What works: "
            f"--trainer.strategy ddp (or a single device) with {what} - each GPU holds the small quantized copy; "
            "or FSDP without quantization (--trainer.precision bf16-true).")
    if plugin is not None and precision is not None:
        raise ConfigError(f"the BitsandbytesPrecision plugin sets the precision itself (its dtype): remove "
                          f"--trainer.precision {precision} (set it to null), or use --model.quantization instead.")
    accel = _class_name(accelerator).lower().replace("accelerator", "")
    if plugin is not None and accel in ("cpu", "mps", "xla", "tpu"):
        raise ConfigError("the BitsandbytesPrecision plugin runs on CUDA GPUs only: on CPU use "
                          "--model.quantization (bitsandbytes >= 0.46 runs 4-bit and int8 on CPU).")


@contextlib.contextmanager
def explain_precision_errors(quantization: str | None = None) -> Iterator[None]:
    """Turn Lightning's bare errors about bitsandbytes + strategy into ConfigErrors (wrap Trainer creation)."""
    try:
        yield
    except TypeError as exc:
        if "FSDPPrecision" not in str(exc) and "precision" not in str(exc).lower():
            raise
        raise ConfigError(
            f"{exc} - bitsandbytes weights do not combine with FSDP. What works: --trainer.strategy ddp (or a "
            "single device) with --model.quantization; or FSDP without quantization (--trainer.precision "
            "bf16-true).") from exc
    except ValueError as exc:
        if "Received both `precision=" not in str(exc) or "Bitsandbytes" not in str(exc):
            raise
        raise ConfigError("the BitsandbytesPrecision plugin sets the precision itself: set --trainer.precision "
                          "null, or use --model.quantization instead.") from exc
    except RuntimeError as exc:
        if "Bitsandbytes is only supported on CUDA" not in str(exc):
            raise
        raise ConfigError("the BitsandbytesPrecision plugin runs on CUDA GPUs only: on CPU use "
                          "--model.quantization instead.") from exc


def auto_precision(mode: str, accelerator: Any = None, saved_dtype: Any = None) -> tuple[str, str]:
    """What an unset `trainer.precision` means (and `precision="auto"` in the in-memory API). Returns the Lightning
    precision and why, for the log line.

    Training on a GPU: Lightning's mixed precision (bf16 where the GPU has it). Inference on a GPU: the weights and
    activations in half precision, bf16 for models saved in bf16 (most recent decoders were trained in it) and fp16
    for the rest: fp16 keeps 3 more bits, and MiniLM's embeddings in bf16 were only within cosine 0.9998 of fp32
    (fp16: 0.99999; docs/MEASUREMENTS.md, W8). CPU: fp32.
    """
    import torch

    if accelerator not in (None, "auto", "gpu", "cuda") or not torch.cuda.is_available():
        return "32-true", "no GPU"
    bf16 = torch.cuda.is_bf16_supported()
    if mode == "train":
        return ("bf16-mixed", "training on a GPU with bf16") if bf16 else ("16-mixed", "training on a GPU")
    if bf16 and str(saved_dtype).replace("torch.", "") == "bfloat16":
        return "bf16-true", "inference on a GPU, a model saved in bf16"
    return "16-true", "inference on a GPU, a model saved in fp16 or fp32"


def saved_dtype(task: Any) -> Any:
    """The dtype a task's model was saved in, or that model.dtype asks for."""
    asked = task.hparams.get("dtype") if hasattr(task, "hparams") else None
    if asked and asked != "auto":
        return asked
    config = getattr(task, "hf_config", None)
    return getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
