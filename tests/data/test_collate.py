"""Batch padding (lit_fast/collate.py) equals the tokenizer's own `pad`, on both sides."""

import pytest
import torch
from transformers import AutoTokenizer

from lit_fast.data.collate import pad_ids, padded_batch


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_tokenizer_pad(minilm_dir, side):
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    tokenizer.padding_side = side
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 30000, (int(n),), generator=generator).tolist()
            for n in torch.randint(1, 40, (17,), generator=generator)]
    rows.append([])  # an empty row pads to all padding
    want = tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt")
    got = padded_batch(tokenizer, rows)
    assert set(got) == {"input_ids", "attention_mask"}
    for key in got:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


def test_pad_ids_pads_labels_and_handles_an_empty_batch():
    ids, mask = pad_ids([[5, 6, 7], [8]], pad_id=-100)
    assert ids.tolist() == [[5, 6, 7], [8, -100, -100]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_ids([[5, 6, 7], [8]], pad_id=0, left=True)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_ids([], pad_id=0)
    assert ids.shape == (0, 0) and mask.shape == (0, 0)


def test_padded_batch_without_a_pad_token_raises_the_tokenizers_error(minilm_dir):
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match="pad"):
        padded_batch(tokenizer, [[1, 2], [3]])
