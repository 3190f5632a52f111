"""lit_fast: fast Hugging Face encoders and decoders under PyTorch Lightning.

The public API lives here and nowhere else.
"""

from lit_fast.errors import (
    ConfigError,
    InputDataError,
    LitFastError,
    ModelLoadError,
    OutputExistsError,
    UnsupportedModelError,
)

from lit_fast.data import TextDataModule
from lit_fast.fastpath import fast_path_architectures, is_fast_path, revert_fast_path, to_fast_path
from lit_fast.generation import CausalLM
from lit_fast.seq2seq import Seq2SeqLM
from lit_fast.lora import LoraSettings
from lit_fast.qlora import export_qlora, prepare_qlora
from lit_fast.precision_checks import check_strategy_precision
from lit_fast.quantization import (
    QUANTIZATION_MODES,
    bnb_config,
    quantize_embeddings,
    weight_footprint,
)
from lit_fast.module import LitTransformer
from lit_fast.tasks import Classifier, Embedder
from lit_fast.writers import PredictionWriter

__version__ = "0.1.0"

__all__ = [
    "CausalLM",
    "LoraSettings",
    "QUANTIZATION_MODES",
    "Seq2SeqLM",
    "bnb_config",
    "check_strategy_precision",
    "export_qlora",
    "prepare_qlora",
    "quantize_embeddings",
    "weight_footprint",
    "Classifier",
    "Embedder",
    "LitTransformer",
    "PredictionWriter",
    "TextDataModule",
    "fast_path_architectures",
    "is_fast_path",
    "revert_fast_path",
    "to_fast_path",
    "ConfigError",
    "InputDataError",
    "LitFastError",
    "ModelLoadError",
    "OutputExistsError",
    "UnsupportedModelError",
]
