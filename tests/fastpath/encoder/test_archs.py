"""Encoder fast path beyond text: ViT, Wav2Vec2 (both layer-norm variants), HuBERT and the BART-family encoders.

Same protocol as test_plan.py: tiny random-init models, HF eager as the reference, fp32 on the CPU, max abs
diff <= 1e-4 on real positions.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

from lit_fast.errors import UnsupportedModelError
from lit_fast.fastpath import is_fast_path, to_fast_path
from _encoder_models import ATOL, assert_close_on_tokens, audio_batch, paths_run, text_batch, tiny_audio, tiny_seq2seq, tiny_vit

pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")

BACKENDS = ("fused", "packed")


@pytest.mark.parametrize("backend", BACKENDS)
def test_vit_matches_hf_eager(backend):
    model = tiny_vit()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = model(pixel_values=pixels)
        to_fast_path(model, backend)
        out = model(pixel_values=pixels)
    assert paths_run(model) == {backend}
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, atol=ATOL, rtol=0)


def test_vit_classifier_and_its_hidden_states_match():
    model = tiny_vit(task=True)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = model(pixel_values=pixels, output_hidden_states=True)
        to_fast_path(model)
        out = model(pixel_values=pixels, output_hidden_states=True)
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=0)
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    for got, expected in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("model_type", ["wav2vec2", "hubert"])
@pytest.mark.parametrize("stable", [False, True], ids=["post-ln", "stable-ln"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding", ["right", "none", "one"])
def test_audio_encoders_match_hf_eager(model_type, stable, backend, padding):
    model = tiny_audio(model_type, stable)
    values, mask = audio_batch(padding)
    with torch.inference_mode():
        ref = model(input_values=values, attention_mask=mask).last_hidden_state
        frames = model._get_feature_vector_attention_mask(ref.shape[1], mask)
        to_fast_path(model, backend)
        out = model(input_values=values, attention_mask=mask).last_hidden_state
    assert paths_run(model) == {backend}
    assert_close_on_tokens(out, ref, frames)


@pytest.mark.parametrize("model_type", ["wav2vec2", "hubert"])
def test_audio_classifier_matches_hf_eager(model_type):
    model = tiny_audio(model_type, stable=True, task=True)
    values, mask = audio_batch("right")
    with torch.inference_mode():
        ref = model(input_values=values, attention_mask=mask).logits
        to_fast_path(model)
        out = model(input_values=values, attention_mask=mask).logits
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_audio_attention_adapters_are_refused():
    model = tiny_audio("wav2vec2", stable=True)
    model.config.adapter_attn_dim = 8
    with pytest.raises(UnsupportedModelError, match="adapter_attn_dim"):
        to_fast_path(model)


@pytest.mark.parametrize("model_type", ["bart", "mbart", "marian"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding", ["right", "left", "none", "one"])
def test_seq2seq_encoders_match_hf_eager(model_type, backend, padding):
    model = tiny_seq2seq(model_type)
    activation = model.config.activation_function
    if backend == "fused" and activation not in ("gelu", "relu"):
        pytest.skip(f"{model_type}'s default activation {activation} is packed-only")
    ids, mask = text_batch(padding)
    decoder_ids = torch.full((ids.shape[0], 3), 2)
    with torch.inference_mode():
        ref = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids)
        to_fast_path(model, backend)
        out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids)
    assert paths_run(model) == {backend}
    assert_close_on_tokens(out.encoder_last_hidden_state, ref.encoder_last_hidden_state, mask)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=ATOL, rtol=0)


def test_bart_classifier_and_marian_generation_are_unchanged():
    classifier = tiny_seq2seq("bart", task=True)
    ids, mask = text_batch("right")
    ids[torch.arange(4), mask.sum(1) - 1] = 2  # BART classifies from the eos token
    with torch.inference_mode():
        ref = classifier(input_ids=ids, attention_mask=mask).logits
        to_fast_path(classifier)
        torch.testing.assert_close(classifier(input_ids=ids, attention_mask=mask).logits, ref, atol=ATOL, rtol=0)

    translator = tiny_seq2seq("marian", task=True)
    ids, mask = text_batch("left")
    with torch.inference_mode():
        expected = translator.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        to_fast_path(translator)
        got = translator.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert is_fast_path(translator)
    assert torch.equal(got, expected)
