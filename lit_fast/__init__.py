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

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "InputDataError",
    "LitFastError",
    "ModelLoadError",
    "OutputExistsError",
    "UnsupportedModelError",
]
