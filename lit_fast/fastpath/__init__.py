"""The encoder fast path: the successor of optimum's BetterTransformer for transformers 5.

`to_fast_path(model)` makes a Hugging Face encoder skip padding in inference: its layers run on the real tokens
only, through PyTorch's fused encoder-layer kernel ("fused") or packed tokens with varlen attention
("packed"). Training, autograd and `output_hidden_states` keep HF's own forward. See README.md, "Fast path".
"""

from lit_fast.fastpath.convert import (
    choose_backend,
    fast_path_architectures,
    is_fast_path,
    revert_fast_path,
    to_fast_path,
)

__all__ = ["choose_backend", "fast_path_architectures", "is_fast_path", "revert_fast_path", "to_fast_path"]
