"""Row packing (fastpath/encoder/rows.py and `padding.finish_rows`): one-kernel plan, gather and scatter of rows whose real
tokens are one run each, and the embedding kernel reading through it.

The Triton tests carry the `gpu` marker and run on CUDA (`python3 -m pytest -q -m gpu tests/test_fastpath_rows.py`).
With `TRITON_INTERPRET=1` and Triton importable they also run on CPU tensors through Triton's interpreter (slow,
for checking a kernel without a GPU). The host-side tests at the bottom need neither.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from lit_fast.fastpath.encoder import kernels, padding, rows

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and kernels.triton is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"



def plan_rows(mask, ids, checks=None):
    """The front's row plan in one call: the plan kernel, its values on the host, and the Packing they describe
    (None for rows with holes)."""
    plan = rows.row_plan(mask, ids)
    batch, seq_len = mask.shape
    return padding.finish_rows(plan, rows.with_checks(plan, checks).tolist(), batch, seq_len, ids is not None)

def triton_test(test):
    """CUDA (`gpu`), or CPU tensors under TRITON_INTERPRET=1 (`interpretable`: conftest then leaves it to run)."""
    for mark in (pytest.mark.gpu, pytest.mark.interpretable,
                 pytest.mark.skipif(kernels.triton is None or not (torch.cuda.is_available() or INTERPRET),
                                    reason="needs Triton on CUDA (or TRITON_INTERPRET=1)")):
        test = mark(test)
    return test


def masks(kind: str, batch: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """A (batch, seq_len) 0/1 int64 mask: right, left or no padding, empty rows, or holes inside rows."""
    lengths = torch.randint(0, seq_len + 1, (batch,), generator=generator)
    lengths[0] = seq_len
    if batch > 2:
        lengths[2] = 0
    pos = torch.arange(seq_len)[None]
    if kind == "right":
        mask = pos < lengths[:, None]
    elif kind == "left":
        mask = pos >= seq_len - lengths[:, None]
    elif kind == "none":
        mask = torch.ones(batch, seq_len, dtype=torch.bool)
    else:  # "holes": random positions
        mask = torch.rand(batch, seq_len, generator=generator) < 0.6
    return mask.long()


def reference_plan(mask: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    """What `rows.row_plan` computes, in plain PyTorch on the host."""
    batch, seq_len = mask.shape
    real = mask.cpu() != 0
    lengths = real.sum(1)
    pos = torch.arange(seq_len)[None].expand(batch, seq_len)
    empty = lengths == 0
    first = torch.where(real, pos, seq_len).amin(1).masked_fill(empty, 0)
    end = (torch.where(real, pos, -1).amax(1) + 1).masked_fill(empty, 0)
    holes = int(((end - first) != lengths).sum())
    low, high = rows.INT32_MAX, rows.INT32_MIN
    if ids is not None and real.any():
        chosen = ids.cpu().long()[real].clamp(rows.INT32_MIN, rows.INT32_MAX)
        low, high = int(chosen.min()), int(chosen.max())
    tail = torch.tensor([holes, int(lengths.max()) if batch else 0, low, high])
    cu = F.pad(lengths.cumsum(0), (1, 0))
    return torch.cat([cu, lengths, first, tail]).to(torch.int32)


@pytest.mark.parametrize("kind", ["right", "left", "none", "holes"])
@pytest.mark.parametrize("batch,seq_len", [(1, 1), (7, 40), (3, 1500), (1100, 9)])
@pytest.mark.parametrize("as_bool,with_ids", [(False, True), (True, False)])
@pytest.mark.parametrize("one_program", [True, False], ids=["one_program", "program_per_row"])
@triton_test
def test_row_plan_equals_the_reference(monkeypatch, kind, batch, seq_len, as_bool, with_ids, one_program):
    monkeypatch.setattr(rows, "ONE_PROGRAM_MAX", rows.ONE_PROGRAM_MAX if one_program else 0)
    assert (batch * seq_len <= rows.ONE_PROGRAM_MAX) == one_program
    generator = torch.Generator().manual_seed(batch * 31 + seq_len)
    mask = masks(kind, batch, seq_len, generator)
    ids = torch.randint(-5, 50_000, (batch, seq_len), generator=generator) if with_ids else None
    if with_ids and batch * seq_len > 1:
        ids[0, -1] = 1 << 40  # outside int32: clamped, and still outside any table
    want = reference_plan(mask, ids)
    mask = (mask.bool() if as_bool else mask).to(DEVICE)
    got = rows.row_plan(mask, None if ids is None else ids.to(DEVICE))
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("kind,one_program,spread", [("right", True, False), ("holes", True, False),
                                                      ("left", False, False), ("right", True, True)])
@triton_test
def test_row_plan_reaches_the_host_through_a_host_copy(monkeypatch, kind, one_program, spread):
    """Given a HostCopy, the plan comes back through it: on CUDA a kernel writes it straight into the pinned buffer
    (no copy launched; `spread`: a program per row, then a kernel that writes the host's buffer), elsewhere it is
    copied."""
    monkeypatch.setattr(rows, "ONE_PROGRAM_MAX", rows.ONE_PROGRAM_MAX if one_program else 0)
    generator = torch.Generator().manual_seed(7)
    mask = masks(kind, 6, 50, generator)
    ids = torch.randint(0, 1000, (6, 50), generator=generator)
    want = reference_plan(mask, ids)
    copy = rows.HostCopy()
    copied = []
    real_start = rows.HostCopy.start
    monkeypatch.setattr(rows.HostCopy, "start", lambda self, values: copied.append(1) or real_start(self, values))
    for _ in range(2):  # the pinned buffer is reused
        got = rows.row_plan(mask.to(DEVICE), ids.to(DEVICE), copy, spread=spread)
        assert copy.tolist() == want.tolist() and torch.equal(got.cpu(), want)
    assert copy.mapped
    assert len(copied) == (0 if DEVICE == "cuda" else 2)


@triton_test
def test_a_plan_value_equal_to_the_sentinel_still_reaches_the_host(monkeypatch):
    """The host polls a mapped plan until no value is SENTINEL; a value that really is SENTINEL (an id here) ends the
    polling with a wait for the stream, and the values read after it are final."""
    monkeypatch.setattr(rows.HostCopy, "SPINS", 5)
    mask = torch.ones(2, 8, dtype=torch.long)
    ids = torch.full((2, 8), 7)
    ids[1, 3] = rows.SENTINEL
    want = reference_plan(mask, ids)
    assert rows.SENTINEL in want.tolist()
    copy = rows.HostCopy()
    rows.row_plan(mask.to(DEVICE), ids.to(DEVICE), copy)
    assert copy.tolist() == want.tolist()


@pytest.mark.parametrize("kind", ["right", "left", "none"])
@pytest.mark.parametrize("dtype,width", [(torch.bfloat16, 768), (torch.float32, 1000), (torch.float16, 32)])
@triton_test
def test_pack_and_unpack_rows_equal_the_index_path(kind, dtype, width):
    generator = torch.Generator().manual_seed(width)
    batch, seq_len = 9, 33
    mask = masks(kind, batch, seq_len, generator).to(DEVICE)
    hidden = torch.randn(batch, seq_len, width, generator=generator).to(DEVICE, dtype)
    by_rows = plan_rows(mask, None)
    by_index = padding.plan(mask.bool(), batch, seq_len, mask.device)
    assert by_rows is not None and by_rows.lengths == by_index.lengths and by_rows.max_len == by_index.max_len
    assert torch.equal(by_rows.cu_seqlens.cpu(), by_index.cu_seqlens.cpu())
    if kind != "none":
        assert by_rows.starts is not None and by_rows.indices is None
        assert torch.equal(padding.flat_indices(by_rows), by_index.indices)
    packed = padding.pack(hidden, by_index)
    back = padding.unpack(packed * 2, by_index)  # zeros at the padding, tokens in place
    if by_rows.starts is not None:  # the kernels themselves (padding.pack takes them on CUDA only)
        args = (by_rows.starts, by_rows.cu_seqlens)
        assert torch.equal(rows.pack_rows(hidden, *args, by_rows.num_tokens, by_rows.max_len), packed)
        assert torch.equal(rows.unpack_rows(packed * 2, *args, batch, seq_len), back)
    assert torch.equal(padding.pack(hidden, by_rows), packed)
    assert torch.equal(padding.unpack(packed * 2, by_rows), back)



@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("with_types", [True, False])
@triton_test
def test_embedding_kernel_reads_rows_as_it_reads_indices(dtype, with_types):
    """MODE 2 (starts + cu_seqlens) is the same per-token arithmetic as MODE 1 (flat indices): equal bits."""
    generator = torch.Generator().manual_seed(5)
    batch, seq_len, width = 6, 40, 768
    word = torch.randn(500, width, generator=generator).to(DEVICE, dtype)
    position = torch.randn(64, width, generator=generator).to(DEVICE, dtype)
    token_type = torch.randn(2, width, generator=generator).to(DEVICE, dtype) if with_types else None
    norm = torch.nn.LayerNorm(width, eps=1e-12).to(DEVICE, dtype)
    ids = torch.randint(0, 500, (batch, seq_len), generator=generator).to(DEVICE)
    positions = torch.arange(seq_len, device=DEVICE)[None].expand(batch, seq_len)
    types = torch.randint(0, 2, (batch, seq_len), generator=generator).to(DEVICE) if with_types else None
    mask = masks("left", batch, seq_len, generator).to(DEVICE)
    packing = plan_rows(mask, ids)
    indices = padding.flat_indices(packing)
    args = (packing.num_tokens, seq_len, ids, positions, types, word, position, token_type, norm)
    with torch.inference_mode():
        by_rows = kernels.embed_layer_norm(*args, starts=packing.starts, cu_seqlens=packing.cu_seqlens,
                                           max_len=packing.max_len)
        by_index = kernels.embed_layer_norm(*args, indices=indices)
        # the front's call before the count is known: an upper bound on the tokens and on the row length
        ahead = kernels.embed_layer_norm(batch * seq_len, *args[1:], starts=packing.starts,
                                         cu_seqlens=packing.cu_seqlens, max_len=seq_len)
    assert by_rows.shape == (packing.num_tokens, width) and torch.equal(by_rows, by_index)
    assert torch.equal(ahead[:packing.num_tokens], by_index)



# Host side: finish_rows' reading of the plan buffer and flat_indices, with the kernel replaced by the reference.


@pytest.mark.parametrize("kind", ["right", "left", "none", "holes"])
def test_plan_rows_agrees_with_plan_or_declines_rows_with_holes(monkeypatch, kind):
    monkeypatch.setattr(rows, "row_plan", reference_plan)
    generator = torch.Generator().manual_seed(11)
    batch, seq_len = 8, 20
    mask = masks(kind, batch, seq_len, generator)
    ids = torch.randint(0, 1000, (batch, seq_len), generator=generator)
    extra = torch.tensor([-3, 7])
    got = plan_rows(mask, ids, extra)
    if kind == "holes":
        assert got is None
        return
    want = padding.plan(mask.bool(), batch, seq_len, mask.device)
    real = ids[mask.bool()]
    assert got.lengths == want.lengths and got.max_len == want.max_len
    assert got.checks == (int(real.min()), int(real.max()), -3, 7)
    assert torch.equal(got.cu_seqlens, want.cu_seqlens.to(got.cu_seqlens.dtype))
    if kind == "none":
        assert not got.padded and padding.flat_indices(got) is None
    else:
        assert got.padded and torch.equal(padding.flat_indices(got), want.indices)
        hidden = torch.randn(batch, seq_len, 4, generator=generator)
        packed = padding.pack(hidden, got)  # CPU: through flat_indices
        assert torch.equal(packed, hidden[mask.bool()])
        assert torch.equal(padding.unpack(packed, got), hidden * mask[..., None])


def test_plan_rows_without_ids_reports_zero_ids_and_an_all_empty_batch_packs_nothing(monkeypatch):
    monkeypatch.setattr(rows, "row_plan", reference_plan)
    mask = torch.zeros(3, 5, dtype=torch.long)
    got = plan_rows(mask, None)
    assert got.checks == (0, 0) and got.lengths == (0, 0, 0) and got.num_tokens == 0
    assert padding.flat_indices(got).numel() == 0


def test_a_kernel_refused_the_pinned_buffer_switches_the_plan_to_copies(monkeypatch):
    """`rows._wrote_host`: a launch that writes the host's buffer tells the HostCopy; one Triton refuses (the pinned
    buffer not mapped here) launched nothing, so the caller copies instead, from then on."""
    class Copy:
        waiting = False
        mapped = True

        def written(self):
            self.waiting = True

    launched = []
    monkeypatch.setattr(rows, "launch", lambda kernel, grid, *args, **meta: launched.append((kernel, grid, args)))
    copy = Copy()
    assert rows._wrote_host(copy, "kernel", (1,), "out", "host", BLOCK=4)
    assert launched == [("kernel", (1,), ("out", "host"))] and copy.waiting and copy.mapped

    def refuse(*args, **meta):
        raise ValueError("Pointer argument (at 1) cannot be accessed from Triton (cpu tensor?)")

    monkeypatch.setattr(rows, "launch", refuse)
    copy = Copy()
    assert not rows._wrote_host(copy, "kernel", (1,), "out", "host")
    assert not copy.waiting and not copy.mapped
