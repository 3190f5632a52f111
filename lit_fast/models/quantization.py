"""bitsandbytes 4-bit / 8-bit weights: validated configs, footprints, QLoRA preparation, Lightning glue.

Two routes quantize a model, and this file serves both:

* ``--model.quantization nf4|nf4-dq|fp4|fp4-dq|int8`` (recommended): transformers loads the checkpoint straight
  into bitsandbytes layers through :func:`bnb_config`. Full-precision weights never reach the GPU, it runs on CPU
  too, heads stay in full precision, and QLoRA (lit_fast.models.qlora) builds on it.
* Lightning's ``BitsandbytesPrecision`` plugin (``--trainer.plugins``): swaps every ``nn.Linear`` of any module
  at setup, CUDA only. ``lit_fast.models.precision_checks`` refuses the strategy / precision combinations that cannot
  work, up front and with a message that says what works instead.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from lit_fast.errors import ConfigError

log = logging.getLogger(__name__)

QUANTIZATION_MODES: tuple[str, ...] = ("nf4", "nf4-dq", "fp4", "fp4-dq", "int8")
# A 4-bit mode + "+emb": the input embedding table and the output head in 4 bits too (`quantize_embeddings`);
# for inference (bitsandbytes can neither train nor save quantized embedding tables).
EMBEDDINGS_SUFFIX = "+emb"
EMBEDDING_MODES: tuple[str, ...] = tuple(m + EMBEDDINGS_SUFFIX for m in QUANTIZATION_MODES if m != "int8")

# Task heads and poolers stay in full precision: they are small, often freshly initialised (a classifier about to
# be fine-tuned), and the last layer before a softmax is the most sensitive to weight error. Passing any skip list
# to transformers replaces its own default (tied/output embeddings), so `lm_head` must be named here too.
# Each name works as a top-level prefix or a suffix of the module path in transformers 5.17 and 5.24 alike.
DEFAULT_SKIP_MODULES: tuple[str, ...] = (
    "lm_head", "score", "classifier", "qa_outputs", "classification_head", "cls", "pooler.dense",
)

_INSTALL_HINT = "install it with `pip install 'lit_fast[quant]'` (bitsandbytes + accelerate)"
_MIN_BNB = {"cuda": (0, 43), "cpu": (0, 46)}  # CPU kernels for 4-bit and int8 arrived with the 0.46 backends
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "32": torch.float32, "32-true": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "bf16-true": torch.bfloat16, "bf16-mixed": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "16": torch.float16,
    "16-true": torch.float16, "16-mixed": torch.float16,
}


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())


def require_bitsandbytes(device_type: str = "cuda") -> Any:
    """Import bitsandbytes (and check accelerate), or raise ConfigError saying how to install it."""
    try:
        import bitsandbytes
    except ImportError as exc:
        raise ConfigError(f"quantization needs the bitsandbytes package, which is not installed: {_INSTALL_HINT}, "
                          "or drop --model.quantization.") from exc
    try:
        importlib.metadata.version("accelerate")
    except importlib.metadata.PackageNotFoundError as exc:
        raise ConfigError(f"transformers needs accelerate to load bitsandbytes weights: {_INSTALL_HINT}.") from exc
    floor = _MIN_BNB.get(device_type, _MIN_BNB["cuda"])
    if _version_tuple(bitsandbytes.__version__) < floor:
        raise ConfigError(f"bitsandbytes {bitsandbytes.__version__} cannot run quantized weights on {device_type} "
                          f"(needs >= {'.'.join(map(str, floor))}): upgrade with `pip install -U 'lit_fast[quant]'`.")
    return bitsandbytes


def resolve_device_type(device: str | torch.device | None = None) -> str:
    """'cuda' or 'cpu' (or another torch device type) for a device, a Lightning accelerator name, or None (auto)."""
    if device is None or str(device) in ("auto", "gpu"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return torch.device(device).type
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device {device!r} for quantization: use 'cpu', 'cuda' or 'auto'.") from exc


def _cpu_has_native_bf16() -> bool:
    # AVX512-BF16 / AMX make bf16 matmuls (and bitsandbytes' fused CPU 4-bit kernel) fast; without them bf16 on CPU
    # is emulated and slower than fp32, so fp32 is the better default there.
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(check()) for check in checks if callable(check))


def resolve_compute_dtype(compute_dtype: str | torch.dtype | None = None,
                          device: str | torch.device | None = None) -> torch.dtype:
    """The dtype that quantized layers compute in; default bf16 where the device runs it natively.

    Default: CUDA -> bf16 if the GPU supports it (sm80+) else fp16; CPU -> bf16 with AVX512-BF16/AMX, else fp32.
    Raises ConfigError for an unknown dtype, float64, or bf16 on a GPU without bf16.
    """
    device_type = resolve_device_type(device)
    if compute_dtype is None or compute_dtype == "auto":
        if device_type == "cuda":
            return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device_type == "cpu" and _cpu_has_native_bf16() else torch.float32
    dtype = compute_dtype if isinstance(compute_dtype, torch.dtype) else _DTYPES.get(str(compute_dtype).lower())
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ConfigError(f"compute dtype {compute_dtype!r} cannot run bitsandbytes layers: "
                          "use one of bf16, fp16, fp32 (or leave it unset for bf16 where supported).")
    if dtype == torch.bfloat16 and device_type == "cuda" and torch.cuda.is_available() \
            and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"this GPU ({torch.cuda.get_device_name()}) has no bf16: set the compute dtype to fp16.")
    return dtype


def normalize_mode(mode: str | None) -> str | None:
    """The canonical mode name (lower case), None for no quantization; ConfigError for an unknown mode."""
    if mode is None or str(mode).strip().lower() in ("", "none", "null", "false", "off"):
        return None
    name = str(mode).strip().lower().replace("_", "-")
    if name == "int8" + EMBEDDINGS_SUFFIX:
        raise ConfigError(f"--model.quantization {mode!r}: 4-bit embedding tables go with the 4-bit modes "
                          f"({', '.join(EMBEDDING_MODES)}); int8 keeps its embeddings in full precision.")
    if name not in QUANTIZATION_MODES + EMBEDDING_MODES:
        raise ConfigError(f"unknown quantization mode {mode!r} (--model.quantization): "
                          f"choose one of {', '.join(QUANTIZATION_MODES)} (4-bit modes + '{EMBEDDINGS_SUFFIX}': "
                          "embedding tables in 4 bits too, for inference), or leave it unset.")
    return name


def base_mode(mode: str | None) -> str | None:
    """The bitsandbytes mode of the linear layers: `mode` without the 4-bit-embeddings suffix."""
    name = normalize_mode(mode)
    return name.removesuffix(EMBEDDINGS_SUFFIX) if name else None


def training_refused(mode: str | None) -> ConfigError:
    """The error for training with a "+emb" mode (bitsandbytes can neither train nor save 4-bit embeddings)."""
    return ConfigError(f"--model.quantization {mode} puts the embedding tables in 4 bits, which is for inference: "
                       f"bitsandbytes can neither train nor save them. Fine-tune with {base_mode(mode)} (QLoRA) and "
                       f"predict with {mode}.")


def quantizes_embeddings(mode: str | None) -> bool:
    """Whether `mode` also puts the embedding tables in 4 bits (the "+emb" modes)."""
    name = normalize_mode(mode)
    return bool(name) and name.endswith(EMBEDDINGS_SUFFIX)


def bnb_config(mode: str | None, compute_dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = None,
               skip_modules: Iterable[str] | None = None) -> Any:
    """A validated ``transformers.BitsAndBytesConfig`` for ``mode``, or None when mode is None.

    Args:
        mode: one of QUANTIZATION_MODES ("-dq" = double quantization of the 4-bit scales), or None.
        compute_dtype: dtype of the matmuls in 4-bit layers (default: :func:`resolve_compute_dtype`). int8 layers
            compute in the dtype of their input, so load int8 models with ``dtype=`` this value.
        device: where the model will run ('cpu', 'cuda', 'cuda:1', 'auto'/None); checked for bitsandbytes support.
        skip_modules: modules kept in full precision, added to DEFAULT_SKIP_MODULES (prefix or suffix of the module
            path, e.g. "encoder.layer.5" or "output.dense").
    """
    name = base_mode(mode)
    if name is None:
        return None
    device_type = resolve_device_type(device)
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--model.quantization {name} on CUDA, but no CUDA device is visible: "
                          "run on a GPU or use --trainer.accelerator cpu (bitsandbytes >= 0.46 runs on CPU).")
    if device_type not in ("cuda", "cpu"):
        raise ConfigError(f"--model.quantization {name} is supported on cpu and cuda, not {device_type!r}: "
                          "drop --model.quantization or run on one of those.")
    require_bitsandbytes(device_type)
    dtype = resolve_compute_dtype(compute_dtype, device_type)
    from transformers import BitsAndBytesConfig

    skips = list(dict.fromkeys([*DEFAULT_SKIP_MODULES, *(skip_modules or ())]))
    if name == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skips)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=name[:3], bnb_4bit_use_double_quant=name.endswith("-dq"),
        bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=skips,
    )


def _bnb_layer_types() -> tuple[type, ...]:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return ()
    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt, bnb.nn.Embedding4bit, bnb.nn.Embedding8bit)


def quantized_module_names(model: torch.nn.Module) -> list[str]:
    """Paths of the bitsandbytes layers in ``model`` (empty if it is not quantized)."""
    types = _bnb_layer_types()
    return [name for name, module in model.named_modules() if types and isinstance(module, types)]


def is_quantized(model: torch.nn.Module) -> bool:
    """True when ``model`` holds bitsandbytes layers (either route)."""
    return bool(quantized_module_names(model))


def prepare_quantized_model(model: torch.nn.Module, mode: str | None = None) -> torch.nn.Module:
    """Call right after loading a bitsandbytes model: guards a CPU kernel limit and logs the footprint.

    On CPUs with AVX512-BF16, bitsandbytes repacks each 4-bit weight at its first inference call into the layout
    of a fused kernel that (1) computes in bf16 whatever the compute dtype says and (2) needs out_features % 32 == 0
    and in_features % blocksize == 0 (other layers, e.g. a hidden size of 32, fail with "shape '[32, 0]' is
    invalid"). Layers that compute in fp32 or do not fit keep the generic dequantize-and-matmul path.
    """
    mode = normalize_mode(mode)
    if quantizes_embeddings(mode):
        quantize_embeddings(model, mode)
    names = quantized_module_names(model)
    if not names:
        return model
    import bitsandbytes as bnb

    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, bnb.nn.Linear4bit):
            blocksize = getattr(module.weight.quant_state, "blocksize", None) or module.weight.blocksize
            if module.out_features % 32 or module.in_features % blocksize or module.compute_dtype == torch.float32:
                module.support_avx512bf16_for_cpu = False
    log.info("quantization %s: %s", mode or "bitsandbytes", weight_footprint(model))
    return model


@dataclass(frozen=True)
class WeightFootprint:
    """Bytes of a model's weights, each shared tensor counted once, quantization scales included."""

    total_bytes: int
    quantized_bytes: int  # packed weights + their scales (absmax, nested absmax, code, SCB)
    full_precision_bytes: int  # everything else: embeddings, norms, heads, biases, buffers
    quantized_modules: int

    def __str__(self) -> str:
        return (f"weights {self.total_bytes / 1e6:.1f} MB ({self.quantized_bytes / 1e6:.1f} MB in "
                f"{self.quantized_modules} quantized layers, {self.full_precision_bytes / 1e6:.1f} MB full precision)")


def _quant_state_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    # int8 row scales live on the weight until the first forward, then on the layer's state (CB is the data)
    tensors = [getattr(weight, "SCB", None), getattr(getattr(module, "state", None), "SCB", None)]
    if state is not None:
        tensors += [state.absmax, state.code]
        if getattr(state, "state2", None) is not None:
            tensors += [state.state2.absmax, state.state2.code]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def weight_footprint(model: torch.nn.Module) -> WeightFootprint:
    """Measure the weight bytes of ``model`` (parameters, buffers and bitsandbytes scales, shared storage once).

    Note: on CPUs with AVX512-BF16 bitsandbytes repacks 4-bit weights at the first inference call (bf16 scales,
    no double quantization), so measure right after loading to see what the mode itself costs.
    """
    seen: set[tuple[str, int]] = set()

    def size(tensor: torch.Tensor) -> int:
        key = (tensor.device.type, tensor.untyped_storage().data_ptr()) if tensor.numel() else ("", id(tensor))
        if key in seen:
            return 0
        seen.add(key)
        return tensor.numel() * tensor.element_size()

    names = quantized_module_names(model)
    quantized = 0
    for name in names:
        module = model.get_submodule(name)
        quantized += size(module.weight) + sum(size(t) for t in _quant_state_tensors(module))
    full = sum(size(p) for p in model.parameters()) + sum(size(b) for b in model.buffers())
    return WeightFootprint(quantized + full, quantized, full, len(names))


def quantize_embeddings(model: torch.nn.Module, mode: str = "nf4") -> torch.nn.Module:
    """Also quantize the input embedding table and the output head (tied or not) to 4 bits, in place.

    transformers keeps both in full precision; for a 128k vocabulary they are a fifth of a 1B model, so 4-bit
    weights alone stay above 0.4x bf16 bytes. Inference only (bitsandbytes cannot save quantized embeddings).
    A tied head shares the embedding's packed table. Returns ``model``.
    """
    name = base_mode(mode)
    if name is None or name == "int8":
        raise ConfigError(f"quantize_embeddings supports the 4-bit modes, not {mode!r}.")
    bnb = require_bitsandbytes(resolve_device_type(next(model.parameters()).device))
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(embedding, torch.nn.Embedding):
        raise ConfigError(f"quantize_embeddings: input embedding of {type(model).__name__} is not an nn.Embedding.")
    weight = embedding.weight
    quant_type = name[:3]
    table = bnb.nn.Embedding4bit(weight.shape[0], weight.shape[1], dtype=weight.dtype, quant_type=quant_type,
                                 device="meta")
    table.weight = bnb.nn.Params4bit(weight.data, requires_grad=False, quant_type=quant_type,
                                     compress_statistics=False, module=table)
    table.weight = table.weight.to(weight.device)  # quantizes
    table.padding_idx = embedding.padding_idx
    tied = isinstance(head, torch.nn.Linear) and head.weight is weight
    model.set_input_embeddings(table)
    if isinstance(head, torch.nn.Linear) and not isinstance(head, bnb.nn.Linear4bit):
        linear = bnb.nn.Linear4bit(head.in_features, head.out_features, bias=head.bias is not None,
                                   compute_dtype=weight.dtype, quant_type=quant_type, device="meta")
        linear.support_avx512bf16_for_cpu = False  # its CPU repacking would corrupt a table shared with `table`
        if tied:
            linear.weight = table.weight
        else:
            linear.weight = bnb.nn.Params4bit(head.weight.data, requires_grad=False, quant_type=quant_type,
                                              compress_statistics=False, module=linear).to(head.weight.device)
        linear.quant_state = linear.weight.quant_state
        if head.bias is not None:
            linear.bias = head.bias
        model.set_output_embeddings(linear)
    if hasattr(model.config, "tie_word_embeddings") and tied:
        model.config.tie_word_embeddings = False  # transformers must not re-tie the replaced modules
    return model


def fast_path_refusal(mode: str | None = None, model: torch.nn.Module | None = None,
                      module: torch.nn.Module | None = None) -> str | None:
    """Why the encoder fast path cannot take quantized weights, or None: for a `--model.quantization` mode, a loaded
    `model`, or one layer `module` that is not the plain torch module it reads. The one place these reasons live.

    The fused/packed encoder kernels read plain float `nn.Linear` weights; quantized models keep HF SDPA."""
    advice = ("quantized models keep running HF SDPA: use fast_path: auto or off, or load the model without "
              "quantization")
    if normalize_mode(mode) is not None:
        return f"--model.quantization {normalize_mode(mode)} gives quantized weights, and {advice}"
    if model is not None:
        quantized = getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False)
        bnb = next((m for m in model.modules() if type(m).__module__.startswith("bitsandbytes")), None)
        if quantized or bnb is not None:
            kind = type(bnb).__name__ if bnb is not None else "quantized weights"
            return f"its kernels need plain float weights, and it has {kind}: {advice}"
    if module is not None:
        kind = type(module).__name__
        if "4bit" in kind or "8bit" in kind or "Quant" in kind or type(module).__module__.startswith("bitsandbytes"):
            return f"{kind} holds quantized weights: {advice}"
    return None


def check_fast_path(quantization: str | None, fast_path: str | None) -> None:
    """ConfigError when a quantized model is asked to take the encoder fast path by force (with `auto` the module
    logs that it keeps SDPA instead)."""
    refusal = fast_path_refusal(quantization)
    if refusal is not None and fast_path not in (None, "auto", "off"):
        raise ConfigError(f"--model.fast_path {fast_path} cannot run: {refusal}")
