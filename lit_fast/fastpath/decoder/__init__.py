"""The decoder fast path: a static KV cache and CUDA-graph decoding loop (loop.py), per-family adapters (archs.py) and
the SDPA kernel policy (sdpa.py)."""
