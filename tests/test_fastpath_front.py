"""The front of converted text encoders (lit_fast/fastpath/front.py): one plan before the embeddings, no HF mask,
the embeddings of real tokens only, and the fallbacks when something does not line up. fp32 on the CPU, against
HF eager on the same weights (max abs diff <= 1e-4 on real tokens)."""

from __future__ import annotations

import pytest
import torch
import transformers.masking_utils as masking_utils

from lit_fast.fastpath import front, revert_fast_path, to_fast_path
from lit_fast.fastpath.front import FastEmbeddings, FastFront
from lit_fast.fastpath.stack import FastStack
from test_fastpath import TEXT_MODELS, assert_close_on_tokens, paths_run, text_batch, tiny_text_model

pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")


def count_calls(monkeypatch, owner, name: str) -> list:
    calls = []
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


@pytest.mark.parametrize("model_type", list(TEXT_MODELS))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_front_builds_no_hf_mask_and_embeds_only_real_tokens(monkeypatch, model_type, attn):
    model = tiny_text_model(model_type, attn=attn)
    ids, mask = text_batch("left")
    with torch.inference_mode():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        to_fast_path(model)
        embeddings = type(model.base_model.embeddings)
        hf_embeddings = count_calls(monkeypatch, embeddings, "forward")
        masks = count_calls(monkeypatch, masking_utils, "_preprocess_mask_arguments")
        mask_builders = [count_calls(monkeypatch, masking_utils, name) for name in ("sdpa_mask", "eager_mask")]
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert paths_run(model) == {"packed"}
    assert_close_on_tokens(out, ref, mask)
    assert len(masks) == 1 and not any(mask_builders)  # HF got the 4-D view and returned it as it was
    # ELECTRA here projects its embeddings (embedding_size 32 < hidden 64) in the base model's forward, so the HF
    # embeddings run on the padded grid and the stack packs their projection; everyone else embeds real tokens.
    assert len(hf_embeddings) == (1 if model_type == "electra" else 0)


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
                model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state]
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


def test_a_stack_that_must_run_hf_layers_after_all_rebuilds_the_hf_mask(monkeypatch):
    """If the stack finds a reason for the HF layers that the front did not (none exists today), the HF layers
    get HF's own mask, rebuilt from the 2-D one; with the front's packed embeddings that is a clear error."""
    model = tiny_text_model("bert", attn="eager")  # eager: a bool mask view would be added as 0/1, not -inf
    ids, mask = text_batch("right")
    with torch.inference_mode():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        to_fast_path(model)
        monkeypatch.setattr(FastStack, "_hf_reason", lambda self, hidden, kwargs: "a test says so")
        monkeypatch.setattr(front, "PACKED_EMBEDDINGS", False)
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert paths_run(model) == {"hf: a test says so"}
        assert_close_on_tokens(out, ref, mask)
        monkeypatch.setattr(front, "PACKED_EMBEDDINGS", True)
        with pytest.raises(RuntimeError, match="embeddings were made for the fast path.*revert_fast_path"):
            model(input_ids=ids, attention_mask=mask)


def test_front_off_still_matches_and_revert_removes_every_installed_forward(monkeypatch):
    model = tiny_text_model("roberta", task=True)
    ids, mask = text_batch("right")  # the head reads position 0: a padding position in a left-padded row
    with torch.inference_mode():
        ref = model(input_ids=ids, attention_mask=mask).logits
        to_fast_path(model)
        installed = {type(vars(m)["forward"]) for m in model.modules() if "forward" in vars(m)}
        assert installed == {FastFront, FastEmbeddings, FastStack}
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, ref, atol=1e-4, rtol=0)
        monkeypatch.setattr(front, "FRONT", False)
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, ref, atol=1e-4, rtol=0)
        assert paths_run(model) == {"packed"}
        revert_fast_path(model)
    assert not any("forward" in vars(m) for m in model.modules())


def test_training_and_hidden_states_leave_the_front_out():
    model = to_fast_path(tiny_text_model("bert"))
    ids, mask = text_batch("right")
    base_front = vars(model)["forward"]
    seen = []
    real_prepare = base_front._prepare
    base_front._prepare = lambda named: seen.append(real := real_prepare(named)) or real
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    model.train()
    model(input_ids=ids, attention_mask=mask)
    assert seen == [None, None]
