"""Sentence vectors from a packed row: a bare encoder's token states over the whole row, pooled per text.

`encoder_states` runs a bare encoder (`AutoModel`: BertModel, RobertaModel, DistilBertModel, ...) on a packed row of
texts: positions restart in each text (plus the architecture's offset: RoBERTa's padding_idx + 1), and the
boundaries reach the varlen attention (training/attention.py), so no text sees another.

`pool_packed` is tasks/embedding.py's `pool` on those states: each text's vector is computed over its own segment
of the row, with the same modes and the same edge cases (a text that is all prompt pools as an all-masked padded
row does), so a packed batch gives the padded batch's vectors up to summation order.
"""

from __future__ import annotations

import torch
from torch import nn

from lit_fast.errors import ConfigError, UnsupportedModelError
from lit_fast.models.sentence_transformers import POOLING_MODES
from lit_fast.training.heads import CLASSIFIER_HEADS, _check_attention, _encoder_inputs
from lit_fast.training.packing import PackedBatch


def encoder_states(model: nn.Module, batch: PackedBatch) -> torch.Tensor:
    """(T, H) last hidden states of a bare encoder on a packed row (`use_packed_attention(model)` must have run)."""
    _check_attention(model)
    spec = CLASSIFIER_HEADS.get(model.config.model_type)  # position offset and token types, per architecture
    if spec is None:
        raise UnsupportedModelError(f"packed encoder rows support {sorted(CLASSIFIER_HEADS)} models, not "
                                    f"{model.config.model_type}; train it padded (model.packing: false)")
    return model(**_encoder_inputs(model, spec, batch)).last_hidden_state[0]


def pool_packed(hidden: torch.Tensor, batch: PackedBatch, modes: tuple[str, ...] | str,
                prompt_length: int = 0) -> torch.Tensor:
    """Pool token states (T, H) of a packed row into (N, H * len(modes)), each text over its own tokens, leaving
    out each text's first `prompt_length` tokens (the prompt, with its leading special token)."""
    modes = (modes,) if isinstance(modes, str) else modes
    if hidden.dtype in (torch.float16, torch.bfloat16):
        hidden = hidden.float()  # sums in fp32, as sentence-transformers accumulates them
    n, width = batch.num_examples, hidden.shape[-1]
    position = batch.position_ids[0]  # 0 at each text's first token
    starts, ends = batch.cu_seqlens[:-1].long(), batch.cu_seqlens[1:].long()
    # each token's text: the number of starts at or before it, less one (no host sync: the size is known)
    text = torch.repeat_interleave(torch.arange(n, device=hidden.device), ends - starts, output_size=hidden.shape[0])
    kept = (position >= prompt_length).to(hidden.dtype)[:, None]
    # a text with no token after its prompt reads its first token for cls and lasttoken, as argmax over an all-zero
    # mask row does in the padded pooling
    has_tokens = ends - starts > prompt_length

    def per_text(values: torch.Tensor) -> torch.Tensor:
        return values.new_zeros((n, *values.shape[1:])).index_add(0, text, values)

    out = []
    for mode in modes:
        if mode == "cls":  # the first kept token
            out.append(hidden[torch.where(has_tokens, starts + prompt_length, starts)])
        elif mode in ("mean", "mean_sqrt_len"):
            count = per_text(kept).clamp(min=1e-9)
            out.append(per_text(hidden * kept) / (count if mode == "mean" else count.sqrt()))
        elif mode == "max":
            values = hidden.masked_fill(kept == 0, float("-inf"))
            out.append(values.new_zeros((n, width)).scatter_reduce(0, text[:, None].expand(-1, width), values,
                                                                  "amax", include_self=False))
        elif mode == "weightedmean":  # weights 1, 2, ... from each text's first token
            weights = (position[:, None] + 1).to(hidden.dtype) * kept
            out.append(per_text(hidden * weights) / per_text(weights).clamp(min=1e-9))
        elif mode == "lasttoken":
            out.append(hidden[torch.where(has_tokens, ends - 1, starts)])
        else:
            raise ConfigError(f"unknown pooling '{mode}'; use one of {', '.join(POOLING_MODES)}")
    return out[0] if len(out) == 1 else torch.cat(out, dim=-1)
