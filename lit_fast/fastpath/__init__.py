"""The fast paths: for encoders, packed tokens and fused kernels (encoder/, the successor of optimum's
BetterTransformer for transformers 5); for decoders, a static KV cache and CUDA-graph decoding loop (decoder/). Both
use one CUDA-graph cache (cuda_graphs.py). See docs/FAST_PATH.md.

`to_fast_path(model, options)` makes a Hugging Face encoder skip padding in inference; training, autograd and
`output_hidden_states` keep HF's own forward. `plan_fast_path` says what would run, and why, without converting.
"""

from lit_fast.fastpath.encoder.plan import (
    FastPathPlan,
    choose_backend,
    fast_path_architectures,
    fast_path_options,
    is_fast_path,
    plan_fast_path,
    revert_fast_path,
    to_fast_path,
)
from lit_fast.fastpath.options import FastPathOptions

__all__ = ["FastPathOptions", "FastPathPlan", "choose_backend", "fast_path_architectures", "fast_path_options",
           "is_fast_path", "plan_fast_path", "revert_fast_path", "to_fast_path"]
