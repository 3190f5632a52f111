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
    "TextDataModule": "lit_fast.data.datamodule",
    "FastPathOptions": "lit_fast.fastpath",
    "plan_fast_path": "lit_fast.fastpath",
    "fast_path_architectures": "lit_fast.fastpath",
    "is_fast_path": "lit_fast.fastpath",
    "revert_fast_path": "lit_fast.fastpath",
    "to_fast_path": "lit_fast.fastpath",
    "CausalLM": "lit_fast.tasks.causal_lm",
    "Seq2SeqLM": "lit_fast.tasks.seq2seq",
    "LoraSettings": "lit_fast.models.lora",
    "export_qlora": "lit_fast.models.qlora",
    "prepare_qlora": "lit_fast.models.qlora",
    "check_strategy_precision": "lit_fast.models.precision_checks",
    "QUANTIZATION_MODES": "lit_fast.models.quantization",
    "bnb_config": "lit_fast.models.quantization",
    "quantize_embeddings": "lit_fast.models.quantization",
    "weight_footprint": "lit_fast.models.quantization",
    "LitTransformer": "lit_fast.tasks.base",
    "Classifier": "lit_fast.tasks.classifier",
    "Embedder": "lit_fast.tasks.embedder",
    "quantization_ranges": "lit_fast.tasks.embedding",
    "Reranker": "lit_fast.tasks.reranker",
    "TokenClassifier": "lit_fast.tasks.token_classifier",
    "PredictionWriter": "lit_fast.data.writers",
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
    from lit_fast.data.datamodule import TextDataModule
    from lit_fast.fastpath import (FastPathOptions, fast_path_architectures, is_fast_path, plan_fast_path,
                                   revert_fast_path, to_fast_path)
    from lit_fast.tasks.causal_lm import CausalLM
    from lit_fast.models.lora import LoraSettings
    from lit_fast.tasks.base import LitTransformer
    from lit_fast.models.precision_checks import check_strategy_precision
    from lit_fast.models.qlora import export_qlora, prepare_qlora
    from lit_fast.models.quantization import QUANTIZATION_MODES, bnb_config, quantize_embeddings, weight_footprint
    from lit_fast.tasks.seq2seq import Seq2SeqLM
    from lit_fast.tasks.classifier import Classifier
    from lit_fast.tasks.embedder import Embedder
    from lit_fast.tasks.embedding import quantization_ranges
    from lit_fast.tasks.reranker import Reranker
    from lit_fast.tasks.token_classifier import TokenClassifier
    from lit_fast.data.writers import PredictionWriter
