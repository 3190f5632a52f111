"""lit_fast: fast Hugging Face encoders and decoders under PyTorch Lightning.

The public API lives here and nowhere else. Names are imported when first used, so that `import lit_fast` (and
the commands, before they parse their arguments) does not pay for PyTorch, Lightning and transformers up front.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lit_fast.errors import (
    ConfigError,
    InputDataError,
    LitFastError,
    ModelLoadError,
    OutputExistsError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "TextDataModule": "lit_fast.data",
    "fast_path_architectures": "lit_fast.fastpath",
    "is_fast_path": "lit_fast.fastpath",
    "revert_fast_path": "lit_fast.fastpath",
    "to_fast_path": "lit_fast.fastpath",
    "CausalLM": "lit_fast.generation",
    "Seq2SeqLM": "lit_fast.seq2seq",
    "LoraSettings": "lit_fast.lora",
    "export_qlora": "lit_fast.qlora",
    "prepare_qlora": "lit_fast.qlora",
    "check_strategy_precision": "lit_fast.precision_checks",
    "QUANTIZATION_MODES": "lit_fast.quantization",
    "bnb_config": "lit_fast.quantization",
    "quantize_embeddings": "lit_fast.quantization",
    "weight_footprint": "lit_fast.quantization",
    "LitTransformer": "lit_fast.module",
    "Classifier": "lit_fast.tasks",
    "Embedder": "lit_fast.tasks",
    "PredictionWriter": "lit_fast.writers",
}

__all__ = sorted([*_LAZY, "ConfigError", "InputDataError", "LitFastError", "ModelLoadError", "OutputExistsError",
                  "UnsupportedModelError", "__version__"])


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lit_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from lit_fast.data import TextDataModule
    from lit_fast.fastpath import fast_path_architectures, is_fast_path, revert_fast_path, to_fast_path
    from lit_fast.generation import CausalLM
    from lit_fast.lora import LoraSettings
    from lit_fast.module import LitTransformer
    from lit_fast.precision_checks import check_strategy_precision
    from lit_fast.qlora import export_qlora, prepare_qlora
    from lit_fast.quantization import QUANTIZATION_MODES, bnb_config, quantize_embeddings, weight_footprint
    from lit_fast.seq2seq import Seq2SeqLM
    from lit_fast.tasks import Classifier, Embedder
    from lit_fast.writers import PredictionWriter
