"""From token states to sentence vectors, as sentence-transformers computes them: pooling (one mode or several,
concatenated; prompt tokens optionally left out), Dense layers, normalisation, Matryoshka truncation and the output
precision."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lit_fast.errors import ConfigError
from lit_fast.models.sentence_transformers import ACTIVATIONS, POOLING_MODES, SentenceTransformerSpec
from lit_fast.training.packing import PackedBatch
from lit_fast.training.pooling import pool_packed

# "float32" and "float16" round the values; "int8" / "uint8" put each dimension in one of 256 buckets between its
# calibrated minimum and maximum; "binary" / "ubinary" pack one bit a dimension (> 0) into int8 / uint8 - all as
# sentence-transformers' quantize_embeddings does.
PRECISIONS = ("float32", "float16", "int8", "uint8", "binary", "ubinary")
CALIBRATED = ("int8", "uint8")


def pool(hidden: torch.Tensor, mask: torch.Tensor, modes: tuple[str, ...] | str, prompt_length: int = 0
         ) -> torch.Tensor:
    """Pool token states [B, T, H] into [B, H * len(modes)] over the tokens the attention mask keeps, leaving out each
    row's first `prompt_length` real tokens (the prompt, with its leading special token)."""
    modes = (modes,) if isinstance(modes, str) else modes
    if hidden.dtype in (torch.float16, torch.bfloat16):
        hidden = hidden.float()  # sums in fp32, as sentence-transformers accumulates them
    start = mask.int().argmax(1, keepdim=True)  # where each row's tokens start (left padding too)
    if prompt_length:
        positions = torch.arange(mask.shape[1], device=mask.device)[None]
        mask = mask * (positions >= start + prompt_length)
    m = mask.to(hidden.dtype).unsqueeze(-1)
    out = []
    for mode in modes:
        if mode == "cls":  # the first kept token: position 0, or the first after the prompt
            first = mask.int().argmax(1)
            out.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), first])
        elif mode in ("mean", "mean_sqrt_len"):
            summed = (hidden * m).sum(1)
            count = m.sum(1).clamp(min=1e-9)
            out.append(summed / (count if mode == "mean" else count.sqrt()))
        elif mode == "max":
            out.append(hidden.masked_fill(m == 0, float("-inf")).max(1).values)
        elif mode == "weightedmean":  # weights 1, 2, ... from each row's first token
            weights = (torch.arange(1, mask.shape[1] + 1, device=mask.device)[None] - start).unsqueeze(-1) * m
            out.append((hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9))
        elif mode == "lasttoken":  # the last kept token of each row, for right or left padding
            positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
            last = (positions * mask).argmax(1)
            out.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
        else:
            raise ConfigError(f"unknown pooling '{mode}'; use one of {', '.join(POOLING_MODES)}")
    return out[0] if len(out) == 1 else torch.cat(out, dim=-1)


class EmbeddingHead(nn.Module):
    """What follows the transformer in a sentence-transformers model: pooling, Dense layers, normalisation, then
    truncation to `truncate_dim` (after normalising, as sentence-transformers does: truncated vectors are not
    renormalised)."""

    def __init__(self, spec: SentenceTransformerSpec, truncate_dim: Optional[int] = None, prompt_length: int = 0):
        super().__init__()
        self.modes = spec.pooling
        self.prompt_length = prompt_length if not spec.include_prompt else 0
        layers = []
        for dense in spec.dense:
            linear = nn.Linear(dense.weight.shape[1], dense.weight.shape[0], bias=dense.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(dense.weight)
                if dense.bias is not None:
                    linear.bias.copy_(dense.bias)
            layers += [linear, ACTIVATIONS[dense.activation]()]
        self.dense = nn.Sequential(*layers)
        self.normalize = spec.normalize
        if truncate_dim is not None and truncate_dim < 1:
            raise ConfigError(f"model.truncate_dim must be a positive number of dimensions, got {truncate_dim}")
        self.truncate_dim = truncate_dim

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self._finish(pool(hidden, mask, self.modes, self.prompt_length))

    def packed(self, hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """The vectors of a packed row's texts from its token states (T, H): each pooled over its own tokens."""
        return self._finish(pool_packed(hidden, batch, self.modes, self.prompt_length))

    def _finish(self, vectors: torch.Tensor) -> torch.Tensor:
        """Dense layers, normalisation and truncation of pooled vectors (padded and packed alike)."""
        if len(self.dense):
            vectors = self.dense(vectors.to(self.dense[0].weight.dtype))
        if self.normalize:
            vectors = F.normalize(vectors, p=2, dim=-1)
        return vectors[..., : self.truncate_dim] if self.truncate_dim else vectors


def quantization_ranges(vectors) -> np.ndarray:
    """The int8 / uint8 ranges of a set of vectors: [2, dim], each dimension's minimum and maximum (what
    sentence-transformers' quantize_embeddings computes from its calibration embeddings). Compute them once on a
    representative sample and use them for every vector you will compare (queries and corpus alike)."""
    array = vectors.float().cpu().numpy() if isinstance(vectors, torch.Tensor) else np.asarray(vectors, np.float32)
    if array.ndim != 2 or len(array) < 2:
        raise ConfigError(f"int8 ranges need several vectors (an array [rows, dim]), got shape {array.shape}")
    return np.vstack((array.min(0), array.max(0))).astype(np.float32)


def read_ranges(path: str) -> np.ndarray:
    """Ranges saved with numpy.save (a [2, dim] float array), checked."""
    try:
        ranges = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.quantization_ranges {path}: not a readable .npy array ({err}); save the ranges "
                          "with numpy.save(path, lit_fast.quantization_ranges(vectors))") from None
    if ranges.ndim != 2 or ranges.shape[0] != 2 or not np.issubdtype(ranges.dtype, np.floating):
        raise ConfigError(f"model.quantization_ranges {path}: expected a float array [2, dim] (minimum and maximum "
                          f"of each dimension), got {ranges.dtype} {ranges.shape}")
    return ranges.astype(np.float32)


def quantize(vectors: torch.Tensor | np.ndarray, precision: str, ranges: Optional[np.ndarray] = None) -> np.ndarray:
    """Vectors as float32 numpy rows, rounded to float16, bucketed to int8 / uint8 between `ranges` (as
    `quantization_ranges` makes them), or packed to bits (binary: int8, ubinary: uint8)."""
    array = vectors.float().cpu().numpy() if torch.is_tensor(vectors) else np.asarray(vectors, dtype=np.float32)
    if precision == "float32":
        return array
    if precision == "float16":
        return array.astype(np.float16)
    if precision in CALIBRATED:
        if ranges is None:
            raise ConfigError(f"model.precision {precision} needs quantization ranges (each dimension's minimum and "
                              "maximum over a calibration sample)")
        if ranges.shape[1] != array.shape[-1]:
            raise ConfigError(f"the quantization ranges have {ranges.shape[1]} dimensions but the vectors have "
                              f"{array.shape[-1]}: compute them with this model (and the same truncate_dim)")
        starts = ranges[0]
        steps = (ranges[1] - starts) / 255
        steps = np.where(steps == 0, 1, steps)
        buckets = np.clip(np.floor((array - starts) / steps), 0, 255)
        return buckets.astype(np.uint8) if precision == "uint8" else (buckets - 128).astype(np.int8)
    packed = np.packbits(array > 0, axis=-1)
    return (packed.astype(np.int16) - 128).astype(np.int8) if precision == "binary" else packed
