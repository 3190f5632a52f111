"""The encoder fast path: plan (check once, install), packing, the front, the layer stack, layers and kernels."""
