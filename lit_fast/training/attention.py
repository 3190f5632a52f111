"""Varlen attention inside HF's own attention modules, for packed training rows.

transformers 5 calls attention through `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`, and its models
forward the keyword arguments of their top-level `forward` down to that call. `use_packed_attention(model)`
registers `varlen_attention` under the name `lit_fast_varlen` and selects it, so the model's projections, norms,
MLPs, rotary embeddings (and peft's LoRA layers inside them) run unchanged; only the attention sees the boundaries
of a packed row. They arrive as transformers' own flash-attention keywords: `cu_seq_lens_q` (int32 starts,
`[0, l1, l1+l2, ..., T]`) and `max_length_q` (`PackedBatch.boundaries()` makes them).

A call without boundaries (a padded validation batch) runs HF's SDPA with HF's mask: the same numbers as
`attn_implementation="sdpa"`. The mask function registered beside it builds no T x T mask for a packed row,
where the boundaries replace it.

Kernels: CUDA fp16/bf16 runs flash varlen attention: `torch.nn.attention.varlen.varlen_attn` (with a backward) without
attention dropout, the flash ops beneath it with dropout; fp32 on CUDA runs one SDPA call over the examples padded
inside the attention only; the CPU runs SDPA once per example, which there beats both padded groups and one call over
a block-diagonal mask (docs/PACKED_TRAINING.md). No token ever attends across an example boundary.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from lit_fast.errors import ConfigError, UnsupportedModelError

NAME = "lit_fast_varlen"


def use_packed_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Select `varlen_attention` as `model`'s attention (registered with transformers on first use); returns it.

    Padded batches still run exactly as under SDPA, so this can stay set for validation and predict."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention)
    AttentionMaskInterface.register(NAME, _mask)
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, AttributeError) as err:
        raise UnsupportedModelError(f"{type(model).__name__} cannot take a registered attention function ({err}); "
                                    "train it padded (model.packing: false)") from err
    if model.config._attn_implementation != NAME:  # transformers only warns for models with their own attention
        raise UnsupportedModelError(f"{type(model).__name__} does not call attention through transformers' "
                                    "AttentionInterface, so packed rows would attend across examples; train it "
                                    "padded (model.packing: false)")
    return model


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """An `AttentionInterface` function: query (1, H, T, D), key/value (1, H_kv, T, D) of a packed row ->
    output (1, T, H, D). Without boundaries it is HF's SDPA."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    starts = kwargs.get("cu_seq_lens_q")
    if starts is None and attention_mask is None:
        starts = _starts_from_positions(kwargs.get("position_ids"))
    if starts is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    _check_packed(module, query, starts, kwargs)
    # the sdpa function's default: decoders set is_causal on their attention modules, encoders clear it
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if not query.is_cuda:
        return _sdpa_per_example(query, key, value, starts.tolist(), dropout, scaling, causal), None
    longest = kwargs.get("max_length_q")
    longest = int(longest) if longest is not None else int((starts[1:] - starts[:-1]).max())
    if query.dtype in (torch.float16, torch.bfloat16):
        if dropout == 0.0 and _varlen() is not None:
            return _flash_varlen(query, key, value, starts, longest, scaling, causal), None
        if dropout > 0.0 and hasattr(torch.ops.aten, "_flash_attention_forward"):
            return _flash_varlen_dropout(query, key, value, starts, longest, dropout, scaling, causal), None
    return _sdpa_padded(query, key, value, starts, longest, dropout, scaling, causal), None


def _sdpa_per_example(query, key, value, bounds: list[int], dropout: float, scaling: float | None,
                      causal: bool) -> torch.Tensor:
    """SDPA on each example's own slice of the row; outputs concatenated in (1, T, H, D)."""
    outputs = [
        F.scaled_dot_product_attention(query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                                       dropout_p=dropout, scale=scaling, is_causal=causal).transpose(1, 2)
        for start, end in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outputs, dim=1)


def _sdpa_padded(query, key, value, starts: torch.Tensor, longest: int, dropout: float, scaling: float | None,
                 causal: bool) -> torch.Tensor:
    """One SDPA call over the row's examples padded to `longest` inside the attention only (the GEMMs around it
    stay on real tokens): CUDA's route for attention dropout and fp32, which flash varlen does not do. Keys past
    an example's end are masked; query rows there are computed and dropped. No host sync: `longest` is a Python
    int and the scatter and gather indices are built on the device."""
    heads, total, dim = query.shape[1], query.shape[2], query.shape[3]
    starts = starts.to(device=query.device, dtype=torch.long)
    lengths = starts[1:] - starts[:-1]
    count = lengths.numel()
    example = torch.repeat_interleave(torch.arange(count, device=query.device), lengths, output_size=total)
    slot = example * longest + torch.arange(total, device=query.device) - starts[:-1][example]

    def padded(t: torch.Tensor) -> torch.Tensor:  # (1, H, T, D) -> (N, H, longest, D), zeros past each end
        rows = t.new_zeros(count * longest, heads, dim).index_copy(0, slot, t[0].transpose(0, 1))
        return rows.view(count, longest, heads, dim).transpose(1, 2)

    keep = torch.arange(longest, device=query.device) < lengths[:, None]  # (N, longest): real keys
    mask = keep[:, None, None, :]
    if causal:
        mask = mask & torch.ones(longest, longest, dtype=torch.bool, device=query.device).tril()
    out = F.scaled_dot_product_attention(padded(query), padded(key), padded(value), attn_mask=mask,
                                         dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).reshape(count * longest, heads, dim)[slot].unsqueeze(0)


def _tokens_first(query, key, value, starts: torch.Tensor) -> tuple:
    """(1, H, T, D) q, k, v -> (T, H, D) contiguous, and the starts as int32 on their device: what flash takes."""
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
    return q, k, v, starts.to(device=q.device, dtype=torch.int32)


def _flash_varlen(query, key, value, starts: torch.Tensor, longest: int, scaling: float | None,
                  causal: bool) -> torch.Tensor:
    """`varlen_attn` on (T, H, D) views of the row."""
    q, k, v, starts = _tokens_first(query, key, value, starts)
    varlen_attn, causal_kwargs = _varlen()
    out = varlen_attn(q, k, v, starts, starts, longest, longest, scale=scaling, **(causal_kwargs if causal else {}))
    return out.unsqueeze(0)


def _flash_varlen_dropout(query, key, value, starts: torch.Tensor, longest: int, dropout: float,
                          scaling: float | None, causal: bool) -> torch.Tensor:
    """Flash varlen attention with attention dropout: `varlen_attn` fixes dropout at 0, so this calls the flash
    forward and backward ops beneath it (the same kernels, with their dropout) through `_FlashVarlenDropout`."""
    q, k, v, starts = _tokens_first(query, key, value, starts)
    return _FlashVarlenDropout.apply(q, k, v, starts, longest, dropout, scaling, causal).unsqueeze(0)


class _FlashVarlenDropout(torch.autograd.Function):
    """(T, H, D) q, k, v -> (T, H, D) through `aten._flash_attention_forward`/`_backward` with dropout. The forward's
    random state (its third and fourth outputs) goes to the backward, which replays the same dropout mask."""

    @staticmethod
    def forward(ctx, q, k, v, starts, longest, dropout, scaling, causal):
        out, lse, rng_a, rng_b, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, starts, starts, longest, longest, dropout, causal, False, scale=scaling)
        ctx.save_for_backward(q, k, v, out, lse, starts, rng_a, rng_b)
        ctx.settings = (longest, dropout, scaling, causal)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, starts, rng_a, rng_b = ctx.saved_tensors
        longest, dropout, scaling, causal = ctx.settings
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad.contiguous(), q, k, v, out, lse, starts, starts, longest, longest, dropout, causal, rng_a, rng_b,
            scale=scaling)
        return dq, dk, dv, None, None, None, None, None


@functools.cache
def _varlen():
    """(varlen_attn, the keywords that make it causal), or None where this torch lacks it. torch 2.10 took
    `is_causal`; later releases take a window, (-1, 0) being causal."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn, ({"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True})


def _starts_from_positions(position_ids: torch.Tensor | None) -> torch.Tensor | None:
    """Example starts of a row packed by position ids alone (transformers' DataCollatorWithFlattening layout): a
    new example wherever the position does not follow the previous one. None for an ordinary batch."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1 or position_ids.shape[1] < 2:
        return None
    row = position_ids[0]
    breaks = torch.nonzero(row[1:] != row[:-1] + 1).flatten() + 1
    if breaks.numel() == 0:
        return None
    edge = torch.tensor([0, row.numel()], device=row.device)
    return torch.cat([edge[:1], breaks, edge[1:]]).to(torch.int32)


def _check_packed(module: torch.nn.Module, query: torch.Tensor, starts: torch.Tensor, kwargs: dict) -> None:
    if query.shape[0] != 1:
        raise ConfigError(f"{type(module).__name__}: a packed row has batch size 1, got {query.shape[0]} rows with "
                          "cu_seq_lens_q; pack the examples into one row (lit_fast.training.pack_*)")
    if not starts.is_cuda and int(starts[-1]) != query.shape[2]:  # on CUDA this would wait for the device
        raise ConfigError(f"{type(module).__name__}: cu_seq_lens_q ends at {int(starts[-1])} but the row has "
                          f"{query.shape[2]} tokens; build boundaries and row together (PackedBatch)")
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
        raise UnsupportedModelError(f"{type(module).__name__} uses sliding-window or soft-capped attention, which "
                                    "packed training does not implement; train it padded (model.packing: false)")


def _mask(*, attention_mask: torch.Tensor | None = None, **kwargs):
    """The mask builder transformers calls for `lit_fast_varlen`: SDPA's mask for a padded batch; nothing for a
    row without a padding mask, whose example boundaries reach the attention instead of a T x T mask."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(attention_mask=attention_mask, **kwargs)
