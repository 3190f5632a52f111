"""Padding removal and restoration (lit_fast.fastpath.encoder.padding) and the CUDA-graph buckets, on random masks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_fast.fastpath.encoder import padding
from lit_fast.fastpath.encoder.layer_graphs import bucket_max_len, bucket_tokens

pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")

masks = st.integers(1, 5).flatmap(
    lambda batch: st.integers(1, 9).flatmap(
        lambda seq_len: st.lists(st.lists(st.booleans(), min_size=seq_len, max_size=seq_len),
                                 min_size=batch, max_size=batch)))


@settings(max_examples=60, deadline=None)
@given(masks)
def test_pack_then_unpack_keeps_every_real_token_and_zeroes_padding(rows):
    valid = torch.tensor(rows)
    batch, seq_len = valid.shape
    hidden = torch.randn(batch, seq_len, 3)
    packing = padding.plan(valid, batch, seq_len, hidden.device)
    tokens = padding.pack(hidden, packing)
    assert tokens.shape == (int(valid.sum()), 3)
    assert packing.lengths == tuple(valid.sum(1).tolist())
    assert packing.cu_seqlens.tolist() == [0] + valid.sum(1).cumsum(0).tolist()
    assert packing.max_len == max(packing.lengths)
    restored = padding.unpack(tokens, packing)
    torch.testing.assert_close(restored, hidden * valid.unsqueeze(-1))
    if bool(valid.all()):
        assert packing.indices is None


@settings(max_examples=40, deadline=None)
@given(masks)
def test_nested_view_round_trips_the_packed_tokens(rows):
    valid = torch.tensor(rows)
    valid[:, 0] = True  # the fused kernel's nested tensors need at least one token per sequence
    batch, seq_len = valid.shape
    hidden = torch.randn(batch, seq_len, 4)
    packing = padding.plan(valid, batch, seq_len, hidden.device)
    tokens = padding.pack(hidden, packing)
    nested = padding.to_nested(tokens, packing)
    assert [t.shape[0] for t in nested.unbind()] == list(packing.lengths)
    torch.testing.assert_close(padding.from_nested(nested), tokens)


def test_valid_tokens_reads_the_2d_and_both_4d_mask_forms():
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    sdpa = mask.bool()[:, None, None, :].expand(2, 1, 3, 3)
    eager = torch.zeros(2, 1, 3, 3).masked_fill(~sdpa, torch.finfo(torch.float32).min)
    for form in (mask, sdpa, eager):
        assert torch.equal(padding.valid_tokens(form, 2, 3), mask.bool())
    assert padding.valid_tokens(None, 2, 3) is None
    with pytest.raises(ValueError, match="2-D or 4-D"):
        padding.valid_tokens(torch.ones(2, 3, 3), 2, 3)


@given(st.integers(1, 200_000))
def test_token_buckets_add_at_most_64_tokens_or_a_32nd(count):
    bucket = bucket_tokens(count)
    assert count <= bucket < count + max(64, count / 32)


@given(st.integers(1, 4096))
def test_max_len_bound_is_a_power_of_two_at_least_the_longest(longest):
    bound = bucket_max_len(longest)
    assert bound >= longest and bound & (bound - 1) == 0 and bound < max(2 * longest, 17)
