"""The front of converted text encoders (lit_fast/fastpath/encoder/front.py): the base model's forward on packed
tokens - one plan, no HF mask, the embeddings of real tokens only, the pooler and output class HF declares - and the
calls it leaves to HF. fp32 on the CPU, against HF eager on the same weights (max abs diff <= 1e-4 on real tokens)."""

from __future__ import annotations

import pytest
import torch
import transformers.masking_utils as masking_utils

from lit_fast.fastpath import FastPathOptions, revert_fast_path, to_fast_path
from lit_fast.fastpath.encoder.front import FastFront
from lit_fast.fastpath.encoder.stack import FastStack
from _encoder_models import TEXT_MODELS, assert_close_on_tokens, paths_run, text_batch, tiny_text_model

pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")


def count_calls(monkeypatch, owner, name: str) -> list:
    calls = []
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


@pytest.mark.parametrize("model_type", list(TEXT_MODELS))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_front_runs_the_base_model_without_hf_mask_hf_embeddings_or_hf_forward(monkeypatch, model_type, attn):
    model = tiny_text_model(model_type, attn=attn)
    batches = [text_batch("left"), text_batch("right")]
    with torch.inference_mode():
        refs = [model(input_ids=ids, attention_mask=mask) for ids, mask in batches]
        to_fast_path(model)
        hf_embeddings = count_calls(monkeypatch, type(model.base_model.embeddings), "forward")
        hf_base = count_calls(monkeypatch, type(model), "forward")
        masks = count_calls(monkeypatch, masking_utils, "_preprocess_mask_arguments")
        outs = [model(input_ids=ids, attention_mask=mask) for ids, mask in batches]
    assert paths_run(model) == {"packed"}
    for (ids, mask), out, ref in zip(batches, outs, refs):
        assert type(out) is type(ref) or set(out.keys()) == set(ref.keys())
        assert_close_on_tokens(out.last_hidden_state, ref.last_hidden_state, mask)
    # BERT family and ALBERT pool the first position (a real token with right padding); ELECTRA and DistilBERT do not
    if getattr(refs[1], "pooler_output", None) is not None:
        torch.testing.assert_close(outs[1].pooler_output, refs[1].pooler_output, atol=1e-4, rtol=0)
    assert not masks and not hf_embeddings and not hf_base


@pytest.mark.parametrize("model_type", ["bert", "albert", "distilbert"])
def test_return_dict_false_gives_hf_s_tuple(model_type):
    model = tiny_text_model(model_type)
    ids, mask = text_batch("right")
    with torch.inference_mode():
        ref = model(input_ids=ids, attention_mask=mask, return_dict=False)
        to_fast_path(model)
        out = model(input_ids=ids, attention_mask=mask, return_dict=False)
    assert isinstance(out, tuple) and len(out) == len(ref)
    for got, want in zip(out, ref):
        torch.testing.assert_close(got * (mask[..., None] if got.dim() == 3 else 1),
                                   want * (mask[..., None] if want.dim() == 3 else 1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("model_type", ["bert", "roberta", "albert", "distilbert"])
def test_given_position_and_token_type_ids_positional_arguments_and_inputs_embeds(model_type):
    model = tiny_text_model(model_type)
    ids, mask = text_batch("right")
    extra = {"position_ids": torch.randint(0, 40, ids.shape)}
    if model_type != "distilbert":
        extra["token_type_ids"] = torch.randint(0, 2, ids.shape)
    embeds = model.get_input_embeddings()(ids)
    with torch.inference_mode():
        refs = [model(input_ids=ids, attention_mask=mask, **extra).last_hidden_state,
                model(ids, mask).last_hidden_state,
                model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state]
        to_fast_path(model)
        outs = [model(input_ids=ids, attention_mask=mask, **extra).last_hidden_state,
                model(ids, mask).last_hidden_state,
                model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state]  # HF's forward; the stack packs
    assert paths_run(model) == {"packed"}
    for out, ref in zip(outs, refs):
        assert_close_on_tokens(out, ref, mask)


def test_token_ids_outside_the_vocabulary_are_one_clear_error():
    model = to_fast_path(tiny_text_model("bert"))
    ids, mask = text_batch("right")
    ids[2, 3] = 99  # the vocabulary has 99 entries: 0..98
    with torch.inference_mode(), pytest.raises(ValueError, match=r"input_ids hold values from \d+ to 99.*99 entries.*tokenizer"):
        model(input_ids=ids, attention_mask=mask)
    positions = torch.arange(ids.shape[1]).expand(ids.shape).clone()
    positions[1, 1] = 64
    with torch.inference_mode(), pytest.raises(ValueError, match="position_ids hold values from 0 to 64.*inside"):
        model(input_ids=ids.clamp(max=98), attention_mask=mask, position_ids=positions)
    long_ids = torch.randint(5, 99, (2, 65))  # max_position_embeddings is 64
    with torch.inference_mode(), pytest.raises(ValueError, match="position 64.*64 position embeddings.*truncate"):
        model(input_ids=long_ids, attention_mask=torch.ones_like(long_ids))


def test_a_batch_the_front_plans_for_hf_runs_the_hf_layers_without_planning_again(monkeypatch):
    """Where too little padding makes HF faster (here: a pre-LN setting forced by the test), the front hands the call
    to HF's forward and the stack runs the HF layers without a plan of its own."""
    from lit_fast.fastpath.encoder import policy, padding

    model = tiny_text_model("bert", attn="eager")
    ids, mask = text_batch("right")
    with torch.inference_mode():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        to_fast_path(model)
        monkeypatch.setattr(policy, "pays_off", lambda *a, **kw: False)
        plans = count_calls(monkeypatch, padding, "plan")
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert paths_run(model) == {"hf: too little padding to remove for the fast path to pay off here"}
    assert len(plans) == 1  # the front's; the stack did not plan again
    assert_close_on_tokens(out, ref, mask)


def test_front_off_still_matches_and_revert_removes_every_installed_forward():
    model = tiny_text_model("roberta", task=True)
    ids, mask = text_batch("right")  # the head reads position 0: a padding position in a left-padded row
    with torch.inference_mode():
        ref = model(input_ids=ids, attention_mask=mask).logits
        to_fast_path(model)
        installed = {type(vars(m)["forward"]) for m in model.modules() if "forward" in vars(m)}
        assert installed == {FastFront, FastStack}
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, ref, atol=1e-4, rtol=0)
        to_fast_path(model, FastPathOptions(front=False))
        assert {type(vars(m)["forward"]) for m in model.modules() if "forward" in vars(m)} == {FastStack}
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, ref, atol=1e-4, rtol=0)
        assert paths_run(model) == {"packed"}
        revert_fast_path(model)
    assert not any("forward" in vars(m) for m in model.modules())


def test_training_hidden_states_and_unknown_arguments_leave_the_front_out(monkeypatch):
    model = to_fast_path(tiny_text_model("bert"))
    ids, mask = text_batch("right")
    hf_base = count_calls(monkeypatch, type(model), "forward")
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask)
        assert not hf_base
        model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        assert len(hf_base) == 1
    model.train()
    model(input_ids=ids, attention_mask=mask)
    assert len(hf_base) == 2
