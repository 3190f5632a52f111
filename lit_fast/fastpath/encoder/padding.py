"""Removing padding once and putting it back once: the frame every fast-path layer runs inside.

A padded batch `(batch, seq_len, hidden)` carries a mask of which positions are real tokens. The fast path
gathers the real tokens into one packed `(tokens, hidden)` matrix (row-major order, so each sequence's tokens
stay together and in order), runs every layer on that matrix, and scatters the result back into a zero-filled
padded tensor at the end. Left padding, right padding and even holes in the mask all work, because the gather
and the scatter use the same flat indices.

`Packing` keeps what both directions need: the flat indices, `cu_seqlens` (the start offset of every sequence in
the packed matrix, the format of flash-attention's varlen kernels) and the lengths on the host (for the CPU
attention loop and for building nested tensors).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lit_fast.fastpath.encoder import rows


@dataclass(frozen=True)
class Packing:
    """Where the real tokens of a padded `(batch, seq_len)` grid went in the packed token matrix."""

    batch: int
    seq_len: int
    indices: torch.Tensor | None  # flat positions of real tokens in batch*seq_len; None when nothing is padded
    cu_seqlens: torch.Tensor  # (batch + 1,) int32 offsets of each sequence in the packed matrix
    lengths: tuple[int, ...]  # tokens per sequence, on the host
    max_len: int  # the longest sequence (or an upper bound on it: all varlen attention needs)
    checks: tuple[int, ...] = ()  # the `checks` values `plan` brought to the host in the same wait
    # Where every row's real tokens are one run (the front's row plan, rows.py, CUDA): the first real position of each row, (batch,)
    # int32 on the device. The packing is then `starts` + `cu_seqlens`, and `indices` is None.
    starts: torch.Tensor | None = None

    @property
    def padded(self) -> bool:
        """Whether the batch has padding to remove (the tokens are a subset of the grid)."""
        return self.indices is not None or self.starts is not None

    @property
    def num_tokens(self) -> int:
        """Real tokens in the batch."""
        return sum(self.lengths)

    @property
    def padding_fraction(self) -> float:
        """Share of the padded grid that is padding (0.0 when nothing is padded)."""
        return 1.0 - self.num_tokens / max(1, self.batch * self.seq_len)


def valid_tokens(attention_mask: torch.Tensor | None, batch: int, seq_len: int) -> torch.Tensor | None:
    """The `(batch, seq_len)` bool mask of real tokens, from whatever mask the HF stack received.

    HF hands an encoder stack either the user's 2-D mask (1 = token), a 4-D boolean SDPA mask (True = attend) or a
    4-D additive eager mask (0 = attend, a large negative number = masked), or None when nothing is padded. In the
    4-D forms of a bidirectional encoder only keys are masked, so any query row holds the key mask; row 0 is read.
    Returns None only when there is no mask at all (deciding "nothing is padded" needs the host, see `pack`).
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        valid = attention_mask.bool()
    elif attention_mask.dim() == 4:
        keys = attention_mask[:, 0, 0, :]
        valid = keys if keys.dtype == torch.bool else keys == 0
    else:
        raise ValueError(f"expected a 2-D or 4-D attention mask, got shape {tuple(attention_mask.shape)}")
    return valid.expand(batch, seq_len)


def plan(valid: torch.Tensor | None, batch: int, seq_len: int, device: torch.device,
         checks: torch.Tensor | None = None) -> Packing:
    """Where the real tokens are, from the `(batch, seq_len)` mask of `valid_tokens` (None: nothing is padded).

    `checks` is an optional 1-D integer tensor on the device (counts of bad input, say) that comes back to the host
    in the same wait as the lengths; its values land in `Packing.checks`.
    """
    if valid is None:
        lengths = torch.full((batch,), seq_len, dtype=torch.int32, device=device)
        cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        host_checks = tuple(checks.tolist()) if checks is not None else ()
        return Packing(batch, seq_len, None, cu_seqlens, (seq_len,) * batch, seq_len, host_checks)

    lengths = valid.sum(dim=1, dtype=torch.int32)
    # The lengths on the host (the kernels' max_len, the CPU attention loop): one wait for the device per batch.
    on_host = lengths if checks is None else torch.cat([lengths, checks])  # int64 when checks are
    values = on_host.tolist()
    host_lengths, host_checks = tuple(values[:batch]), tuple(values[batch:])
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    longest = max(host_lengths, default=0)
    if all(length == seq_len for length in host_lengths):
        return Packing(batch, seq_len, None, cu_seqlens, host_lengths, longest, host_checks)
    # The host knows how many tokens there are, so the gather indices need no second wait for the device.
    indices = torch.nonzero_static(valid.reshape(-1), size=sum(host_lengths)).squeeze(1)
    return Packing(batch, seq_len, indices, cu_seqlens, host_lengths, longest, host_checks)


def finish_rows(plan: torch.Tensor, values: list[int], batch: int, seq_len: int, with_ids: bool) -> Packing | None:
    """The Packing of a `rows.row_plan` buffer from `values`, `rows.with_checks(plan, checks)` brought to the host
    (the batch's one wait for the device: work that needs only the device-side plan, `rows.starts_of` and
    `rows.cu_seqlens_of`, can be queued before it)."""
    tail = 3 * batch + 1
    holes, longest, low, high = values[tail:tail + rows.PLAN_TAIL]
    if holes:
        return None
    lengths, count = tuple(values[batch + 1:2 * batch + 1]), values[batch]
    host_checks = ((low, high) if with_ids and count else (0, 0)) + tuple(values[tail + rows.PLAN_TAIL:])
    cu_seqlens = rows.cu_seqlens_of(plan, batch)
    if count == batch * seq_len:  # no padding at all
        return Packing(batch, seq_len, None, cu_seqlens, lengths, seq_len, host_checks)
    return Packing(batch, seq_len, None, cu_seqlens, lengths, longest, host_checks, starts=rows.starts_of(plan, batch))


def flat_indices(packing: Packing) -> torch.Tensor | None:
    """The flat positions of the real tokens in batch*seq_len (None when nothing is padded), for any packing."""
    if packing.starts is None:
        return packing.indices
    device = packing.cu_seqlens.device
    lengths = packing.cu_seqlens[1:] - packing.cu_seqlens[:-1]
    row = torch.repeat_interleave(torch.arange(packing.batch, device=device), lengths,
                                  output_size=packing.num_tokens)
    offset = torch.arange(packing.num_tokens, device=device) - packing.cu_seqlens[row]
    return row * packing.seq_len + packing.starts[row] + offset


def pack(hidden: torch.Tensor, packing: Packing) -> torch.Tensor:
    """Gather the real tokens of `hidden` (batch, seq_len, hidden) into a `(tokens, hidden)` matrix."""
    if packing.starts is not None and rows.rows_fit(hidden):
        return rows.pack_rows(hidden, packing.starts, packing.cu_seqlens, packing.num_tokens, packing.max_len)
    flat = hidden.reshape(packing.batch * packing.seq_len, hidden.shape[-1])
    indices = flat_indices(packing)
    return flat if indices is None else flat.index_select(0, indices)


def unpack(tokens: torch.Tensor, packing: Packing) -> torch.Tensor:
    """Scatter a packed `(tokens, hidden)` matrix back to `(batch, seq_len, hidden)`; padding positions are 0."""
    width = tokens.shape[-1]
    if not packing.padded:
        return tokens.reshape(packing.batch, packing.seq_len, width)
    if packing.starts is not None and rows.rows_fit(tokens):
        return rows.unpack_rows(tokens.contiguous(), packing.starts, packing.cu_seqlens, packing.batch,
                                packing.seq_len)
    out = tokens.new_zeros(packing.batch * packing.seq_len, width)
    out.index_copy_(0, flat_indices(packing), tokens)
    return out.reshape(packing.batch, packing.seq_len, width)


def to_nested(tokens: torch.Tensor, packing: Packing) -> torch.Tensor:
    """A nested tensor of the packed tokens, one component per sequence, sharing the packed matrix's memory."""
    width = tokens.shape[-1]
    lengths = torch.tensor(packing.lengths, dtype=torch.int64)
    sizes = torch.stack([lengths, torch.full_like(lengths, width)], dim=1)
    strides = torch.tensor([[width, 1]], dtype=torch.int64).expand(packing.batch, 2).contiguous()
    offsets = F.pad(lengths.cumsum(0), (1, 0))[:-1] * width
    buffer = tokens.contiguous().reshape(-1)
    if buffer.storage_offset() or buffer.untyped_storage().nbytes() != buffer.numel() * buffer.element_size():
        buffer = buffer.clone()  # a view into a larger allocation (the front's embeddings): the kernel reads all of it
    return torch._nested_view_from_buffer(buffer, sizes, strides, offsets)


def from_nested(nested: torch.Tensor) -> torch.Tensor:
    """The packed `(tokens, hidden)` matrix of a nested tensor, components back to back (inverse of `to_nested`)."""
    return torch.cat(nested.unbind())
