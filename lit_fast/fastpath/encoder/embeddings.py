"""The embeddings of a text encoder's real tokens only, straight into the packed matrix (front.py's `FastFront`).

`EmbeddingInputs` derives the index grids a BERT-family embedding module reads (ids, positions, token types) the way
the HF module would, collects the range checks of the grids the user passed (brought to the host with the plan, in
the batch's one wait), and embeds: one Triton kernel on CUDA (`kernels.embed_layer_norm`; with the row plan it is
queued before the wait into `batch * seq_len` rows, `embed_ahead`), HF's own op order elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lit_fast.errors import InputDataError
from lit_fast.fastpath.encoder import kernels, padding, rows

# With the row plan, the embeddings are queued before the batch's wait into a buffer of batch * seq_len rows (the
# count is not known yet), up to this many bytes; larger batches embed after the wait, into exactly `count` rows.
EMBED_AHEAD_BYTES = 256 << 20


@dataclass
class EmbeddingInputs:
    """The index grids one call's embeddings read, as the HF module would derive them, and their range checks."""

    module: nn.Module
    ids: torch.Tensor  # (batch, seq_len)
    positions: torch.Tensor  # (batch or 1, seq_len)
    types: torch.Tensor | None  # (batch or 1, seq_len); None for a model without token types
    ranges: list[torch.Tensor]  # [min, max] of every grid besides the ids that needs checking, on the device
    limits: list[tuple[str, int, str]]  # (what, table size, what to do): the ids first, then one per `ranges`
    kernel: bool = True  # the Triton kernel where it fits (FastPathOptions.embed_kernel)

    @classmethod
    def of(cls, module: nn.Module, ids: torch.Tensor, token_type_ids, position_ids, batch: int, seq_len: int,
           kernel: bool = True):
        positions_table = module.position_embeddings.num_embeddings
        tokenizer = "use the tokenizer that belongs to this model"
        too_long = "truncate the inputs to the model's maximum length"
        ranges, limits = [], [("input_ids", module.word_embeddings.num_embeddings, tokenizer)]
        if position_ids is not None:
            positions = position_ids
            ranges.append(torch.aminmax(position_ids))
            limits.append(("position_ids", positions_table, "pass positions inside the table, or none"))
        elif hasattr(module, "create_position_ids_from_input_ids"):  # RoBERTa family: offsets past padding_idx
            positions = module.create_position_ids_from_input_ids(ids, module.padding_idx)
            ranges.append(torch.aminmax(positions))
            limits.append(("position ids (counted over the non-padding tokens)", positions_table, too_long))
        else:  # 0 .. seq_len - 1: the module's arange buffer (built in __init__, never loaded) or a new arange
            buffer = getattr(module, "position_ids", None)
            _check_length(seq_len - 1, positions_table, "sequence length - 1")
            positions = buffer[:, :seq_len] if buffer is not None else torch.arange(seq_len, device=ids.device)[None]
        counting = position_ids is None and not hasattr(module, "create_position_ids_from_input_ids")
        types = None
        table = getattr(module, "token_type_embeddings", None)
        if table is not None:
            if token_type_ids is not None:
                types = token_type_ids
                ranges.append(torch.aminmax(token_type_ids))
                limits.append(("token_type_ids", table.num_embeddings, tokenizer))
            elif hasattr(module, "token_type_ids"):  # HF reads its all-zero buffer at the positions
                buffer = module.token_type_ids.to(positions.device)
                if counting:  # at positions 0 .. seq_len - 1: the same values as a view, without a kernel
                    types = buffer[:, :seq_len]
                else:  # (clamped: a position outside the table is reported by the range check, not by gather)
                    buffer = buffer.expand(positions.shape[0], -1)
                    types = torch.gather(buffer, 1, positions.clamp(0, buffer.shape[1] - 1))
            else:
                types = torch.zeros_like(positions)
        return cls(module, ids, positions.expand(batch, seq_len), None if types is None else types.expand(
            batch, seq_len), ranges, limits, kernel)

    def checks(self, with_ids: bool) -> torch.Tensor | None:
        """The [min, max] pairs to bring to the host with the plan, in `limits` order (`with_ids`: the ids' own
        pair too, which the row plan (rows.row_plan) computes itself)."""
        pairs = ([torch.aminmax(self.ids)] if with_ids else []) + self.ranges
        return torch.stack([value.to(torch.int64) for pair in pairs for value in pair]) if pairs else None

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
        """(word, position, token type or None) tables, and whether the Triton kernel takes them."""
        module = self.module
        word, position = module.word_embeddings.weight, module.position_embeddings.weight
        token_type = module.token_type_embeddings.weight if self.types is not None else None
        tables = [position] + ([token_type] if token_type is not None else [])
        fits = self.kernel and kernels.embed_layer_norm_fits(word, tables, module.LayerNorm)
        return word, position, token_type, fits

    def _ahead_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """The tables for `embed_ahead`, or None where it does not apply (the kernel does not take them, or the
        upper bound on the tokens is large)."""
        word, position, token_type, fits = self._tables()
        if not fits or self.ids.numel() * word.shape[1] * word.element_size() > EMBED_AHEAD_BYTES:
            return None
        return word, position, token_type

    def ahead_fits(self) -> bool:
        return self._ahead_tables() is not None

    def embed_ahead(self, plan: torch.Tensor) -> torch.Tensor | None:
        """The embeddings of the real tokens from a `rows.row_plan` buffer still on the device: `(batch * seq_len,
        width)`, of which the first `count` rows are the tokens (the host learns `count` at the wait that follows).
        Indices are clamped in the kernel; the caller checks them after the wait and discards this if one was out of
        range. None where the kernel does not apply or the upper bound is large (then `embed` runs after the wait)."""
        tables = self._ahead_tables()
        if tables is None:
            return None
        word, position, token_type = tables
        batch, seq_len = self.ids.shape
        return kernels.embed_layer_norm(batch * seq_len, seq_len, self.ids, self.positions, self.types, word, position,
                                        token_type, self.module.LayerNorm, starts=rows.starts_of(plan, batch),
                                        cu_seqlens=rows.cu_seqlens_of(plan, batch), max_len=seq_len)

    def embed(self, packing: padding.Packing) -> torch.Tensor:
        """The embeddings of the real tokens, `(tokens, width)`, in the packing's order."""
        word, position, token_type, fits = self._tables()
        norm = self.module.LayerNorm
        if fits:
            return kernels.embed_layer_norm(packing.num_tokens, packing.seq_len, self.ids, self.positions, self.types,
                                            word, position, token_type, norm, packing.indices, packing.starts,
                                            packing.cu_seqlens, packing.max_len)
        indices = padding.flat_indices(packing)

        def real(grid: torch.Tensor) -> torch.Tensor:
            flat = grid.reshape(-1)
            return flat if indices is None else flat.index_select(0, indices)

        # HF's own order of operations, on the real tokens only: (word + token type) + position, then the norm.
        hidden = F.embedding(real(self.ids), word)
        if token_type is not None:
            hidden = hidden + F.embedding(real(self.types), token_type)
        hidden = hidden + F.embedding(real(self.positions), position)
        return norm(hidden)


def raise_if_out_of_range(module: nn.Module, limits: list[tuple[str, int, str]], values: tuple[int, ...]) -> None:
    """Raise if a [min, max] pair of `values` (the plan's checks) falls outside its table (EmbeddingInputs.limits)."""
    for (what, size, fix), low, high in zip(limits, values[0::2], values[1::2]):
        if low < 0 or high >= size:
            raise InputDataError(
                f"{what} hold values from {low} to {high}, outside the model's table of {size} entries "
                f"({type(module).__name__}): {fix}."
            )


def _check_length(largest: int, table: int, what: str) -> None:
    if largest >= table:
        raise InputDataError(
            f"The batch needs position {largest} ({what}), but the model has {table} position embeddings: "
            f"truncate the inputs to the model's maximum length."
        )
