"""Packed rows (ids, restarting positions, boundaries, shifted causal targets) and the token-budget plan."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_fast.errors import ConfigError, InputDataError
from lit_fast.training.packing import IGNORE, PackedBatch, TokenBudgetPlan, first_fit, pack_causal, pack_classification


def test_pack_classification_concatenates_restarts_positions_and_marks_boundaries():
    examples = [{"index": 7, "input_ids": [101, 5, 6, 102], "labels": 2},
                {"index": 3, "input_ids": [101, 9, 102], "labels": 0}]
    batch = pack_classification(examples)
    assert batch.input_ids.tolist() == [[101, 5, 6, 102, 101, 9, 102]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert batch.cu_seqlens.dtype == torch.int32 and batch.cu_seqlens.tolist() == [0, 4, 7]
    assert batch.max_seqlen == 4 and batch.num_examples == 2 and batch.num_tokens == 7
    assert batch.labels.tolist() == [2, 0] and batch.index.tolist() == [7, 3] and batch.num_targets == 2
    assert batch.token_type_ids is None
    kwargs = batch.boundaries()
    assert kwargs["cu_seq_lens_q"] is batch.cu_seqlens and kwargs["max_length_q"] == 4


def test_pack_keeps_token_types_of_pairs():
    examples = [{"input_ids": [1, 2, 3], "token_type_ids": [0, 0, 1], "labels": 1},
                {"input_ids": [4, 5], "token_type_ids": [0, 1], "labels": 0}]
    assert pack_classification(examples).token_type_ids.tolist() == [[0, 0, 1, 0, 1]]


def test_pack_causal_shifts_targets_inside_each_example_only():
    # example 0: prompt [10, 11], completion [12, 13]; example 1: prompt [20], completion [21, 22]
    examples = [{"input_ids": [10, 11, 12, 13], "labels": [IGNORE, IGNORE, 12, 13]},
                {"input_ids": [20, 21, 22], "labels": [IGNORE, 21, 22]}]
    batch = pack_causal(examples)
    # position i is scored on token i + 1 of its own example; each example's last token on nothing
    assert batch.labels.tolist() == [[IGNORE, 12, 13, IGNORE, 21, 22, IGNORE]]
    assert batch.num_targets == 4
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    last_tokens = batch.cu_seqlens[1:].long() - 1
    assert (batch.labels[0, last_tokens] == IGNORE).all()


def test_pack_causal_without_labels_scores_every_next_token():
    batch = pack_causal([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}])
    assert batch.labels.tolist() == [[2, 3, IGNORE, 5, IGNORE]]


def test_pack_refuses_empty_examples_and_label_length_mismatch():
    with pytest.raises(InputDataError, match="example 4 has no tokens"):
        pack_classification([{"index": 4, "input_ids": [], "labels": 0}])
    with pytest.raises(InputDataError, match="3 labels for 2 tokens"):
        pack_causal([{"input_ids": [1, 2], "labels": [1, 2, 3]}])
    with pytest.raises(InputDataError, match="at least one example"):
        pack_causal([])


def test_packed_batch_moves_like_a_lightning_batch():
    from lightning.fabric.utilities.apply_func import move_data_to_device

    batch = pack_causal([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}])
    moved = move_data_to_device(batch, torch.device("cpu"))
    assert isinstance(moved, PackedBatch) and moved.max_seqlen == 3
    assert torch.equal(moved.cu_seqlens, batch.cu_seqlens) and moved.cu_seqlens.dtype == torch.int32
    assert torch.equal(batch.to("cpu").labels, batch.labels)


def _naive_first_fit(order, lengths, capacity, max_examples=None):
    batches, room = [], []
    for j in order:
        for b, batch in enumerate(batches):
            if room[b] >= lengths[j] and (max_examples is None or len(batch) < max_examples):
                batch.append(j)
                room[b] -= lengths[j]
                break
        else:
            batches.append([j])
            room.append(capacity - lengths[j])
    return batches


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 64), min_size=1, max_size=80), capacity=st.integers(64, 300),
       max_examples=st.none() | st.integers(1, 8), seed=st.integers(0, 2**16))
def test_first_fit_is_first_fit(lengths, capacity, max_examples, seed):
    import random

    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    batches = first_fit(order, lengths, capacity, max_examples)
    assert batches == _naive_first_fit(order, lengths, capacity, max_examples)
    assert sorted(j for b in batches for j in b) == list(range(len(lengths)))
    assert all(sum(lengths[j] for j in b) <= capacity for b in batches)
    assert max_examples is None or all(len(b) <= max_examples for b in batches)


def test_plan_is_seeded_per_epoch_and_not_sorted():
    lengths = tuple(torch.randint(32, 257, (400,), generator=torch.Generator().manual_seed(0)).tolist())
    plan = TokenBudgetPlan(lengths, max_tokens=2048, seed=5)
    first, again, second = plan(0), plan(0), plan(1)
    assert first == again and first != second
    tokens = [sum(lengths[j] for j in batch) for batch in first]
    assert all(t <= 2048 for t in tokens)
    assert sum(tokens[:-1]) / (len(tokens) - 1) > 0.95 * 2048  # first-fit packs the budget nearly full
    # batches keep the shuffled order's randomness: lengths inside a batch are not sorted
    assert any(b != sorted(b, key=lambda j: lengths[j]) and b != sorted(b, key=lambda j: -lengths[j]) for b in first)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_plan_gives_every_rank_the_same_steps_and_disjoint_examples(world):
    lengths = tuple(torch.randint(32, 257, (301,), generator=torch.Generator().manual_seed(1)).tolist())
    whole = TokenBudgetPlan(lengths, max_tokens=1500, seed=3)(2)
    ranks = [TokenBudgetPlan(lengths, max_tokens=1500, seed=3, rank=r, world=world)(2) for r in range(world)]
    assert len({len(r) for r in ranks}) == 1
    seen = [j for r in ranks for batch in r for j in batch]
    assert len(seen) == len(set(seen))
    # the same batches as one process, dealt out, less at most world - 1 of the last (emptiest) ones
    steps = len(ranks[0])
    assert [batch for step in range(steps) for batch in (r[step] for r in ranks)] == whole[: steps * world]
    assert len(whole) - steps * world < world


def test_evaluation_plan_keeps_every_example_once_in_input_order():
    lengths = tuple(range(1, 40))
    ranks = [TokenBudgetPlan(lengths, max_tokens=100, shuffle=False, rank=r, world=3)(0) for r in range(3)]
    assert sorted(j for r in ranks for batch in r for j in batch) == list(range(39))
    assert ranks[0][0] == list(range(0, ranks[0][0][-1] + 1))


def test_plan_refuses_examples_over_the_budget_and_too_few_batches():
    with pytest.raises(ConfigError, match="example 1 has 300 tokens, more than data.max_tokens=256"):
        TokenBudgetPlan((10, 300, 20), max_tokens=256)
    with pytest.raises(ConfigError, match="fewer than the 4 ranks"):
        TokenBudgetPlan((10, 20, 30), max_tokens=256, world=4, rank=1)(0)
    with pytest.raises(ConfigError, match="rank 2"):
        TokenBudgetPlan((10,), max_tokens=256, rank=2, world=2)
