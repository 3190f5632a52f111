"""Packing rows of contiguous tokens on CUDA with few launches (Triton): the front's plan, gather and scatter.

When every row of the mask holds its real tokens in one run (right padding, left padding, no padding), the packing
is fully described by each row's start and length, and nothing needs the flat index of every token:

- `row_plan` is one kernel over the mask (and the token ids): per row the length and the first real position,
  the offsets `cu_seqlens` (a running sum in a single program up to `ONE_PROGRAM_MAX` positions, atomic adds
  of a program per row beyond), and over the batch the number of rows with
  holes, the longest row and the range of the ids. One transfer brings it all to the host: the batch's only wait.
  (`padding.plan` takes ~10 launches for the same.) Kernels that need only the device-side plan, such as the
  front's embeddings, are queued before that wait, so the GPU has work while the host plans on.
- `pack_rows` / `unpack_rows` gather the real tokens of a padded `(batch, seq_len, width)` tensor and scatter them
  back (zeros in the padding) from the starts and `cu_seqlens`, each one pass over memory.

The host is often what limits a fast GPU here: every launch costs host time, and the GPU idles through every launch
between the start of a forward and its first GEMM. Rows with holes in the mask fall
back to `padding.plan`'s flat indices.
"""

from __future__ import annotations

import logging

import torch

from lit_fast.fastpath.encoder.kernels import MAX_WIDTH, launch, next_power_of_2, triton

if triton is not None:
    import triton.language as tl

log = logging.getLogger(__name__)

ROW_BLOCK = 1024  # mask positions per step of the plan kernel
MAX_ROW_PLAN = 1 << 20  # batch * seq_len above which `padding.plan` (plain PyTorch) runs instead
# Masks up to this many positions are planned by one program that walks all rows (its stores need no zeroed buffer,
# so the launch is the only host step); larger ones by one program a
# row, summing `cu_seqlens` with atomic adds into a buffer copied from a template first.
ONE_PROGRAM_MAX = 1 << 16
ONE_PROGRAM_TILE = 4096  # mask positions a step of the one-program kernel reads


def row_plan_fits(mask: torch.Tensor, ids: torch.Tensor | None) -> bool:
    return (triton is not None and mask.is_cuda and mask.dim() == 2 and 0 < mask.numel() <= MAX_ROW_PLAN
            and (ids is None or (ids.shape == mask.shape and ids.device == mask.device)))


PLAN_TAIL = 4  # after the per-row values: rows with holes, the longest row, the least and the greatest id
INT32_MAX, INT32_MIN = 2**31 - 1, -(2**31)
_templates: dict[tuple, torch.Tensor] = {}


def row_plan(mask: torch.Tensor, ids: torch.Tensor | None, copy: HostCopy | None = None,
             spread: bool = False) -> torch.Tensor:
    """One int32 buffer: `cu_seqlens` (batch + 1), each row's length (batch) and first real position (batch; 0 for
    an empty row), then the number of rows whose real tokens are not one run, the longest row, and the least and
    greatest id among all real tokens (INT32_MAX and INT32_MIN when there are none, or no ids). Ids outside int32
    are clamped to its range, which lies outside every table, so a range check on these values still fires.

    `copy`: the buffer also goes to the host through it (`copy.tolist()` then waits for it). A kernel writes it into
    the pinned buffer itself (pinned memory is mapped into the device's address space), which saves the copy's
    launch and lets the host read it as soon as it is written. `spread`: a program per row even for a small mask
    (three steps instead of one: cheap inside a CUDA graph, and several times less device time for a large batch)."""
    batch, seq_len = mask.shape
    mask_arg = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    ids_arg = ids if ids is not None else mask_arg
    size = plan_size(batch)
    host = copy.target(size, mask.device) if copy is not None and copy.mapped else None
    args = (mask_arg, mask_arg.stride(0), mask_arg.stride(1), ids_arg, ids_arg.stride(0), ids_arg.stride(1))
    if batch * seq_len <= ONE_PROGRAM_MAX and not spread:
        out = torch.empty(size, dtype=torch.int32, device=mask.device)
        block_s = min(next_power_of_2(seq_len), ONE_PROGRAM_TILE)
        meta = {"HAS_IDS": ids is not None, "BLOCK_R": max(1, ONE_PROGRAM_TILE // block_s), "BLOCK_S": block_s,
                "num_warps": 8}
        if host is not None and _wrote_host(copy, _row_plan_one_kernel, (1,), *args, out, host, batch, seq_len,
                                            TO_HOST=True, **meta):
            return out
        launch(_row_plan_one_kernel, (1,), *args, out, out, batch, seq_len, TO_HOST=False, **meta)
    else:
        key = (batch, mask.device)
        if key not in _templates:  # the initial values: zeros, and the neutral elements of the id min / max
            template = torch.zeros(size, dtype=torch.int32)
            template[-2:] = torch.tensor([INT32_MAX, INT32_MIN], dtype=torch.int32)
            _templates[key] = template.to(mask.device)
        out = _templates[key].clone()
        launch(_row_plan_kernel, (batch,), *args, out, batch, seq_len, HAS_IDS=ids is not None,
               BLOCK=min(ROW_BLOCK, next_power_of_2(seq_len)), BLOCK_B=min(ROW_BLOCK, next_power_of_2(batch)))
        if host is not None and _wrote_host(copy, _to_host_kernel, (-(-size // ROW_BLOCK),), out, host, size,
                                            BLOCK=ROW_BLOCK):
            return out
    if copy is not None:
        copy.start(out)
    return out


def plan_size(batch: int) -> int:
    """The values in a plan buffer of `batch` rows."""
    return 3 * batch + 1 + PLAN_TAIL


def _wrote_host(copy: HostCopy, kernel, grid: tuple, *args, **constexprs) -> bool:
    """Launch `kernel`, which writes the plan into `copy.target`'s pinned buffer, and tell `copy`; False when Triton
    refuses that address (pinned memory not mapped here): nothing was launched, and `copy` is copied into from now
    on."""
    try:
        launch(kernel, grid, *args, **constexprs)
    except ValueError as refused:
        copy.mapped = False
        log.info("fast path: the plan kernel cannot write pinned host memory here (%s); it is copied instead", refused)
        return False
    copy.written()
    return True


SENTINEL = INT32_MIN + 1  # what a mapped buffer holds until the kernel has written each value


class HostCopy:
    """Device values on their way to the host, into a pinned buffer kept from call to call (one transfer in flight at
    a time: each is read by `tolist` before the next starts).

    Two ways in: `target` hands out the pinned memory for a kernel to write itself (filled with SENTINEL first), and
    `written` says the kernel is queued; `tolist` then reads the values as soon as none is SENTINEL any more, without
    waiting for the kernels queued after it (the front's embeddings). A value that really is SENTINEL, or a device
    still busy with earlier work after SPINS looks, ends the polling with a wait for the stream, after which every
    value is final. Or `start` queues a non-blocking copy of device values and an event behind it, and `tolist` waits
    for that event only."""

    SPINS = 1000  # looks at the buffer (~1 us each) before waiting for the stream instead

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.array = None  # the buffer as a numpy array (cheap to poll)
        self.event: torch.cuda.Event | None = None
        self.values: torch.Tensor | None = None
        self.waiting: str | None = None  # "event" (a copy is in flight behind `event`) or "mapped" (a kernel writes)
        self.in_graph = False  # being captured into a CUDA graph (front_graphs): nothing to wait for at capture
        self.device: torch.device | None = None  # where the kernel writing `target` runs
        self.mapped = True  # kernels may write the pinned buffer directly (cleared if Triton refuses its address)

    def __deepcopy__(self, memo) -> HostCopy:
        copy = HostCopy()  # a copied model gets its own buffer (CUDA events cannot be copied)
        copy.mapped = self.mapped
        return copy

    def target(self, count: int, device: torch.device) -> torch.Tensor | None:
        """`count` int32 values of pinned host memory, set to SENTINEL, for a kernel on `device` to write (None off
        CUDA); queue the kernel, then call `written`."""
        if device.type != "cuda":
            return None
        self.values = self._slot(count, torch.int32)
        self.array[:count] = SENTINEL
        self.device = device
        return self.values

    def written(self) -> HostCopy:
        """The kernel that writes `target`'s memory is queued: `tolist` polls for its values."""
        if not self.in_graph:
            self.waiting = "mapped"
        return self

    def _slot(self, count: int, dtype: torch.dtype) -> torch.Tensor:
        """The first `count` values of the pinned buffer, allocated (with the event) when missing or unfit."""
        if self.buffer is None or self.buffer.dtype != dtype or self.buffer.numel() < count:
            self.buffer = torch.empty(max(count, 1024), dtype=dtype, pin_memory=True)
            self.array = self.buffer.numpy()
            self.event = torch.cuda.Event()
        return self.buffer[:count]

    def start(self, values: torch.Tensor) -> HostCopy:
        if self.in_graph:
            raise RuntimeError("the plan's copy to the host is not captured into CUDA graphs")
        if not values.is_cuda:  # (Triton's interpreter runs the row path on CPU tensors): nothing to wait for
            self.values = values
            return self
        self.values = self._slot(values.numel(), values.dtype)
        self.values.copy_(values.reshape(-1), non_blocking=True)
        self.event.record(torch.cuda.current_stream(values.device))
        self.waiting = "event"
        return self

    def tolist(self) -> list:
        values, waiting = self.values, self.waiting
        self.values, self.waiting = None, None
        if waiting == "event":
            self.event.synchronize()
        elif waiting == "mapped":
            array = self.array[:values.numel()]
            for _ in range(self.SPINS):
                if not (array == SENTINEL).any():
                    return array.tolist()
            torch.cuda.current_stream(self.device).synchronize()
        return values.tolist()


def with_checks(plan: torch.Tensor, checks: torch.Tensor | None) -> torch.Tensor:
    """What a plan brings to the host: the plan buffer, then the `checks` values (int64 then) when there are any."""
    return plan if checks is None else torch.cat([plan, checks])


def cu_seqlens_of(plan: torch.Tensor, batch: int) -> torch.Tensor:
    return plan[:batch + 1]


def starts_of(plan: torch.Tensor, batch: int) -> torch.Tensor:
    return plan[2 * batch + 1:3 * batch + 1]


def pack_rows(hidden: torch.Tensor, starts: torch.Tensor, cu_seqlens: torch.Tensor, count: int,
              max_len: int) -> torch.Tensor:
    """The real tokens of `hidden` (batch, seq_len, width), row b's at `starts[b]`, as a `(count, width)` matrix."""
    batch, seq_len, width = hidden.shape
    out = torch.empty((count, width), dtype=hidden.dtype, device=hidden.device)
    if count:
        launch(_pack_rows_kernel, (max_len, batch), hidden, hidden.stride(0), hidden.stride(1), starts, cu_seqlens,
               out, width, BLOCK=next_power_of_2(width))
    return out


def unpack_rows(tokens: torch.Tensor, starts: torch.Tensor, cu_seqlens: torch.Tensor, batch: int,
                seq_len: int) -> torch.Tensor:
    """`(batch, seq_len, width)` with row b's tokens from `starts[b]` on and zeros elsewhere (inverse of pack)."""
    width = tokens.shape[-1]
    out = torch.empty((batch, seq_len, width), dtype=tokens.dtype, device=tokens.device)
    if batch and seq_len:
        launch(_unpack_rows_kernel, (seq_len, batch), tokens, starts, cu_seqlens, out, seq_len, width,
               BLOCK=next_power_of_2(width))
    return out


def rows_fit(tokens_or_hidden: torch.Tensor) -> bool:
    """Whether pack_rows / unpack_rows take this tensor (CUDA, rows that fit one program, last dim contiguous)."""
    return (triton is not None and tokens_or_hidden.is_cuda and tokens_or_hidden.shape[-1] <= MAX_WIDTH
            and tokens_or_hidden.stride(-1) == 1)


if triton is not None:

    @triton.jit
    def _row_plan_kernel(Mask, s_mb, s_ms, Ids, s_ib, s_is, Out, batch, seq_len,
                         HAS_IDS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_B: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        count = tl.zeros([BLOCK], tl.int32)
        first = tl.full([BLOCK], 2147483647, tl.int32)
        last = tl.full([BLOCK], -1, tl.int32)
        low = tl.full([BLOCK], 9223372036854775807, tl.int64)
        high = tl.full([BLOCK], -9223372036854775807, tl.int64)
        for begin in range(0, seq_len, BLOCK):
            pos = begin + cols
            inside = pos < seq_len
            real = (tl.load(Mask + row * s_mb + pos * s_ms, mask=inside, other=0) != 0) & inside
            count += real.to(tl.int32)
            first = tl.minimum(first, tl.where(real, pos, 2147483647))
            last = tl.maximum(last, tl.where(real, pos, -1))
            if HAS_IDS:
                ids = tl.load(Ids + row * s_ib + pos * s_is, mask=real, other=0).to(tl.int64)
                low = tl.minimum(low, tl.where(real, ids, 9223372036854775807))
                high = tl.maximum(high, tl.where(real, ids, -9223372036854775807))
        length = tl.sum(count, axis=0)
        real_row = length > 0
        start = tl.where(real_row, tl.min(first, axis=0), 0)
        tl.store(Out + batch + 1 + row, length)
        tl.store(Out + 2 * batch + 1 + row, start)
        tail = Out + 3 * batch + 1
        one_run = (tl.max(last, axis=0) + 1 - start) == length  # first..last holds no padding
        tl.atomic_add(tail, tl.where(real_row & ~one_run, 1, 0))
        tl.atomic_max(tail + 1, length)
        if HAS_IDS:
            lo = tl.minimum(tl.maximum(tl.min(low, axis=0), -2147483648), 2147483647).to(tl.int32)
            hi = tl.minimum(tl.maximum(tl.max(high, axis=0), -2147483648), 2147483647).to(tl.int32)
            tl.atomic_min(tail + 2, lo, mask=real_row)
            tl.atomic_max(tail + 3, hi, mask=real_row)
        # cu_seqlens[k + 1] = sum of the lengths of rows 0..k: this row adds its length to every k >= row
        for begin in range(0, batch, BLOCK_B):
            k = begin + tl.arange(0, BLOCK_B)
            tl.atomic_add(Out + 1 + k, tl.zeros([BLOCK_B], tl.int32) + length, mask=(k >= row) & (k < batch))

    @triton.jit
    def _row_plan_one_kernel(Mask, s_mb, s_ms, Ids, s_ib, s_is, Out, Host, batch, seq_len, HAS_IDS: tl.constexpr,
                             TO_HOST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
        """`_row_plan_kernel`'s buffer from a single program: BLOCK_R rows at a time, their `cu_seqlens` as a running
        sum (no atomics, nothing to zero first). TO_HOST: every value is stored to `Host` (pinned memory) too."""
        big, small = 9223372036854775807, -9223372036854775807
        r_off = tl.arange(0, BLOCK_R)
        c_off = tl.arange(0, BLOCK_S)
        zero = tl.sum(tl.zeros([BLOCK_R], tl.int32), axis=0)
        carry, holes, longest = zero, zero, zero
        lo = zero + 2147483647
        hi = zero - 2147483647 - 1
        _put(Out, Host, 0, zero, True, TO_HOST)
        for first_row in range(0, batch, BLOCK_R):
            row = first_row + r_off
            row_ok = row < batch
            count = tl.zeros([BLOCK_R], tl.int32)
            first = tl.full([BLOCK_R], 2147483647, tl.int32)
            last = tl.full([BLOCK_R], -1, tl.int32)
            low = tl.full([BLOCK_R], big, tl.int64)
            high = tl.full([BLOCK_R], small, tl.int64)
            for begin in range(0, seq_len, BLOCK_S):
                pos = begin + c_off
                inside = row_ok[:, None] & (pos < seq_len)[None, :]
                real = (tl.load(Mask + row[:, None] * s_mb + pos[None, :] * s_ms, mask=inside, other=0) != 0) & inside
                count += tl.sum(real.to(tl.int32), axis=1)
                first = tl.minimum(first, tl.min(tl.where(real, pos[None, :], 2147483647), axis=1))
                last = tl.maximum(last, tl.max(tl.where(real, pos[None, :], -1), axis=1))
                if HAS_IDS:
                    ids = tl.load(Ids + row[:, None] * s_ib + pos[None, :] * s_is, mask=real, other=0).to(tl.int64)
                    low = tl.minimum(low, tl.min(tl.where(real, ids, big), axis=1))
                    high = tl.maximum(high, tl.max(tl.where(real, ids, small), axis=1))
            real_row = count > 0
            start = tl.where(real_row, first, 0)
            _put(Out, Host, batch + 1 + row, count, row_ok, TO_HOST)
            _put(Out, Host, 2 * batch + 1 + row, start, row_ok, TO_HOST)
            _put(Out, Host, 1 + row, carry + tl.cumsum(count, axis=0), row_ok, TO_HOST)
            carry += tl.sum(count, axis=0)
            holes += tl.sum(tl.where(real_row & ((last + 1 - start) != count), 1, 0), axis=0)
            longest = tl.maximum(longest, tl.max(count, axis=0))
            if HAS_IDS:
                low32 = tl.minimum(tl.maximum(low, -2147483648), 2147483647).to(tl.int32)
                high32 = tl.minimum(tl.maximum(high, -2147483648), 2147483647).to(tl.int32)
                lo = tl.minimum(lo, tl.min(tl.where(real_row, low32, 2147483647), axis=0))
                hi = tl.maximum(hi, tl.max(tl.where(real_row, high32, -2147483647 - 1), axis=0))
        tail = 3 * batch + 1
        _put(Out, Host, tail, holes, True, TO_HOST)
        _put(Out, Host, tail + 1, longest, True, TO_HOST)
        _put(Out, Host, tail + 2, lo, True, TO_HOST)
        _put(Out, Host, tail + 3, hi, True, TO_HOST)

    @triton.jit
    def _put(Out, Host, offset, value, mask, TO_HOST: tl.constexpr):
        tl.store(Out + offset, value, mask=mask)
        if TO_HOST:
            tl.store(Host + offset, value, mask=mask)

    @triton.jit
    def _to_host_kernel(Out, Host, size, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Host + offsets, tl.load(Out + offsets, mask=offsets < size), mask=offsets < size)

    @triton.jit
    def _pack_rows_kernel(Hidden, s_hb, s_hs, Starts, CU, Out, width, BLOCK: tl.constexpr):
        j, row = tl.program_id(0), tl.program_id(1)
        begin = tl.load(CU + row)
        if j >= tl.load(CU + row + 1) - begin:
            return
        cols = tl.arange(0, BLOCK)
        inside = cols < width
        src = Hidden + row.to(tl.int64) * s_hb + (tl.load(Starts + row) + j).to(tl.int64) * s_hs
        values = tl.load(src + cols, mask=inside)
        tl.store(Out + (begin + j).to(tl.int64) * width + cols, values, mask=inside)

    @triton.jit
    def _unpack_rows_kernel(Tokens, Starts, CU, Out, seq_len, width, BLOCK: tl.constexpr):
        pos, row = tl.program_id(0), tl.program_id(1)
        begin = tl.load(CU + row)
        length = tl.load(CU + row + 1) - begin
        start = tl.load(Starts + row)
        cols = tl.arange(0, BLOCK)
        inside = cols < width
        dst = Out + (row.to(tl.int64) * seq_len + pos) * width + cols
        j = pos - start
        if (j >= 0) & (j < length):
            tl.store(dst, tl.load(Tokens + (begin + j).to(tl.int64) * width + cols, mask=inside), mask=inside)
        else:
            tl.store(dst, tl.zeros([BLOCK], Out.dtype.element_ty), mask=inside)
