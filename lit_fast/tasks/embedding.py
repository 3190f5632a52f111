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

# "float32" and "float16" round the values; "binary" / "ubinary" pack one bit a dimension (> 0) into int8 / uint8, as
# sentence-transformers' quantize_embeddings does. int8 / uint8 need ranges calibrated over many vectors.
PRECISIONS = ("float32", "float16", "binary", "ubinary")


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
        vectors = pool(hidden, mask, self.modes, self.prompt_length)
        if len(self.dense):
            vectors = self.dense(vectors.to(self.dense[0].weight.dtype))
        if self.normalize:
            vectors = F.normalize(vectors, p=2, dim=-1)
        return vectors[..., : self.truncate_dim] if self.truncate_dim else vectors


def quantize(vectors: torch.Tensor, precision: str) -> np.ndarray:
    """Vectors as float32 numpy rows, rounded to float16, or packed to bits (binary: int8, ubinary: uint8)."""
    array = vectors.float().cpu().numpy()
    if precision == "float32":
        return array
    if precision == "float16":
        return array.astype(np.float16)
    packed = np.packbits(array > 0, axis=-1)
    return (packed.astype(np.int16) - 128).astype(np.int8) if precision == "binary" else packed
