"""Token ids the encoder codec makes: those of the tokenizer's own call, for any text and length."""

import pytest
from hypothesis import given, settings, strategies as st
from transformers import AutoTokenizer

from lit_fast.tasks.codecs import token_ids


@pytest.fixture(scope="module")
def minilm_tokenizer(minilm_dir):
    return AutoTokenizer.from_pretrained(minilm_dir)


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(st.text(min_size=0, max_size=400), min_size=1, max_size=8),
       max_length=st.sampled_from([8, 32, 256]))
def test_token_ids_are_the_tokenizers_own(minilm_tokenizer, texts, max_length):
    expected = minilm_tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    assert token_ids(minilm_tokenizer, texts, max_length) == expected
    # and the tokenizer's own call still behaves as before afterwards (truncation settings restored by it)
    assert minilm_tokenizer(texts, truncation=True, max_length=max_length)["input_ids"] == expected


def test_left_truncation_is_honoured(minilm_tokenizer):
    minilm_tokenizer.truncation_side = "left"
    try:
        text = ["one two three four five six seven eight nine ten"]
        assert token_ids(minilm_tokenizer, text, 6) == minilm_tokenizer(text, truncation=True, max_length=6)["input_ids"]
    finally:
        minilm_tokenizer.truncation_side = "right"
