"""Packed training == padded HF training (fp32, CPU): the same loss and gradients, examples independent in a pack.

Reference: the same weights under `attn_implementation="sdpa"`, right-padded batches, HF's own loss (`labels=`).
"Equal" is relative 1e-5: |loss - ref| <= 1e-5 |ref|, and for every parameter ||grad - ref|| <= 1e-5 ||ref||.
"""

from __future__ import annotations

import copy

import pytest
import torch

from _decoder_models import causal_model
from _encoder_models import tiny_text_model
from lit_fast.errors import ConfigError, UnsupportedModelError
from lit_fast.training import (
    causal_lm_example_losses,
    causal_lm_loss,
    classification_loss,
    classifier_logits,
    pack_causal,
    pack_classification,
    pack_tokens,
    token_classification_loss,
    token_classifier_logits,
    use_packed_attention,
)
from lit_fast.training.packing import IGNORE

RTOL = 1e-5
ENCODERS = ["bert", "roberta", "distilbert", "albert", "electra", "xlm-roberta"]
DECODERS = ["llama", "qwen2", "gpt2", "opt"]
LENGTHS = [12, 5, 9, 3, 7]


def _ids(length: int, generator: torch.Generator, low: int, high: int) -> list[int]:
    return torch.randint(low, high, (length,), generator=generator).tolist()


def classification_examples(lengths=LENGTHS, seed: int = 0) -> list[dict]:
    """Token ids 5..98 (never the tiny models' pad id 1), labels 0..2."""
    g = torch.Generator().manual_seed(seed)
    return [{"index": i, "input_ids": _ids(n, g, 5, 99), "labels": int(torch.randint(0, 3, (1,), generator=g))}
            for i, n in enumerate(lengths)]


def causal_examples(lengths=LENGTHS, seed: int = 0) -> list[dict]:
    """A prompt (no loss) then a completion (loss) in every example; ids 3..255 (no BOS/EOS/PAD)."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i, n in enumerate(lengths):
        ids = _ids(n, g, 3, 256)
        prompt = max(1, n // 2)
        examples.append({"index": i, "input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return examples


def padded(rows: list[list[int]], fill: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [fill] * (width - len(r)) for r in rows])


def padded_batch(examples: list[dict], pad_id: int, causal: bool) -> dict:
    ids = [e["input_ids"] for e in examples]
    mask = padded([[1] * len(r) for r in ids], 0)
    labels = padded([e["labels"] for e in examples], IGNORE) if causal else torch.tensor(
        [e["labels"] for e in examples])
    return {"input_ids": padded(ids, pad_id), "attention_mask": mask, "labels": labels}


def assert_loss_close(loss: torch.Tensor, ref: torch.Tensor) -> None:
    assert abs(loss.item() - ref.item()) <= RTOL * abs(ref.item()), f"loss {loss.item()} vs padded {ref.item()}"


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    """Relative 1e-5 per parameter. A gradient that is zero in exact arithmetic (attention's key bias: softmax
    ignores a shift shared by all keys) is only rounding noise in both runs; it must stay at that level, 1e-7 of
    the whole gradient's norm (about fp32's epsilon), in the packed run too."""
    assert got.keys() == ref.keys() and ref
    total = torch.cat([g.flatten() for g in ref.values()]).norm().item()
    for name, g in ref.items():
        diff, scale = (got[name] - g).norm().item(), g.norm().item()
        if scale <= 1e-7 * total:
            assert got[name].norm().item() <= 1e-7 * total, f"{name}: zero in exact arithmetic, got {got[name].norm()}"
            continue
        assert diff <= RTOL * scale, f"{name}: ||grad diff|| {diff:.3g} > {RTOL} x ||grad|| {scale:.3g}"


def encoder_pair(model_type: str):
    ref = tiny_text_model(model_type, task=True, attn="sdpa")
    return ref, use_packed_attention(copy.deepcopy(ref))


def decoder_pair(kind: str):
    ref = causal_model(kind, sharpen=1.0)
    ref.set_attn_implementation("sdpa")
    return ref, use_packed_attention(copy.deepcopy(ref))


@pytest.mark.parametrize("model_type", ENCODERS)
def test_classifier_packed_equals_padded(model_type):
    ref, packed = encoder_pair(model_type)
    examples = classification_examples()
    out = ref(**padded_batch(examples, ref.config.pad_token_id, causal=False))
    out.loss.backward()
    loss, logits = classification_loss(packed, pack_classification(examples))
    loss.backward()
    assert_loss_close(loss, out.loss)
    torch.testing.assert_close(logits, out.logits, rtol=RTOL, atol=RTOL * out.logits.abs().max().item())
    assert_grads_close(grads(packed), grads(ref))


@pytest.mark.parametrize("kind", DECODERS)
def test_causal_lm_packed_equals_padded_completion_only(kind):
    ref, packed = decoder_pair(kind)
    examples = causal_examples()
    out = ref(**padded_batch(examples, ref.config.pad_token_id, causal=True))
    out.loss.backward()
    batch = pack_causal(examples)
    loss = causal_lm_loss(packed, batch)
    loss.backward()
    assert_loss_close(loss, out.loss)
    assert_grads_close(grads(packed), grads(ref))
    # the mean over the batch's targets is the per-example sums over the target count
    with torch.no_grad():
        sums = causal_lm_example_losses(packed, batch)
    assert abs(sums.sum().item() / batch.num_targets - loss.item()) <= RTOL * loss.item()


def test_padded_batches_through_the_packed_attention_run_as_sdpa():
    ref, packed = decoder_pair("llama")
    batch = padded_batch(causal_examples(), ref.config.pad_token_id, causal=True)
    with torch.no_grad():
        torch.testing.assert_close(packed(**batch).logits, ref(**batch).logits, rtol=0, atol=0)
    ref, packed = encoder_pair("bert")
    batch = padded_batch(classification_examples(), ref.config.pad_token_id, causal=False)
    with torch.no_grad():
        torch.testing.assert_close(packed(**batch).logits, ref(**batch).logits, rtol=0, atol=0)


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_positions_alone_keep_examples_apart(model_type):
    """A row packed by restarting position ids only (transformers' DataCollatorWithFlattening) gets the same
    attention as one with explicit boundaries."""
    if model_type == "bert":
        _, model = encoder_pair("bert")
        batch = pack_classification(classification_examples())
        call = model.bert
    else:
        _, model = decoder_pair("llama")
        batch = pack_causal(causal_examples())
        call = model.model
    with torch.no_grad():
        explicit = call(input_ids=batch.input_ids, position_ids=batch.position_ids, **batch.boundaries())
        implicit = call(input_ids=batch.input_ids, position_ids=batch.position_ids)
    torch.testing.assert_close(implicit.last_hidden_state, explicit.last_hidden_state, rtol=0, atol=0)


def _other_examples_terms(model, examples, changed: int, causal: bool):
    """Loss terms of the examples other than `changed`, and the gradients of their sum."""
    model.zero_grad()
    if causal:
        terms = causal_lm_example_losses(model, pack_causal(examples))
    else:
        batch = pack_classification(examples)
        logits = classifier_logits(model, batch)
        terms = torch.nn.functional.cross_entropy(logits, batch.labels, reduction="none")
    keep = [i for i in range(len(examples)) if i != changed]
    terms[keep].sum().backward()
    return terms.detach(), grads(model)


@pytest.mark.parametrize("model_type", ["bert", "roberta", "llama", "gpt2"])
def test_changing_one_example_leaves_the_others_unchanged(model_type):
    causal = model_type in DECODERS
    _, model = decoder_pair(model_type) if causal else encoder_pair(model_type)
    make = causal_examples if causal else classification_examples
    examples = make()
    changed = 2
    other = copy.deepcopy(examples)
    other[changed] = make([LENGTHS[changed] + 4], seed=9)[0]  # new tokens and a new length
    terms, grad = _other_examples_terms(model, examples, changed, causal)
    terms2, grad2 = _other_examples_terms(model, other, changed, causal)
    keep = [i for i in range(len(examples)) if i != changed]
    assert not torch.allclose(terms[changed], terms2[changed])  # the changed example's own term did change
    torch.testing.assert_close(terms2[keep], terms[keep], rtol=RTOL, atol=0)
    assert_grads_close(grad2, grad)


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_gradient_checkpointing_recomputes_packed_layers_with_their_boundaries(model_type, monkeypatch):
    """Checkpointed layers run their attention again in backward, with the row's boundaries (transformers passes a
    layer's keyword arguments into the checkpoint): the same loss and gradients as without checkpointing."""
    from lit_fast.training import attention

    if model_type == "bert":
        model = tiny_text_model("bert", task=True, attn="sdpa", hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0)
        batch, loss_of = pack_classification(classification_examples()), lambda m, b: classification_loss(m, b)[0]
    else:
        model = causal_model("llama", sharpen=1.0)
        batch, loss_of = pack_causal(causal_examples()), causal_lm_loss
    plain = use_packed_attention(model).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    per_example = attention._sdpa_per_example

    def counted(query, key, value, bounds, *args):
        calls.append(bounds)
        return per_example(query, key, value, bounds, *args)

    monkeypatch.setattr(attention, "_sdpa_per_example", counted)
    results = []
    for model in (plain, checkpointed):
        calls.clear()
        loss = loss_of(model, batch)
        loss.backward()
        results.append((loss, grads(model), list(calls)))
    (loss, ref_grads, ref_calls), (loss_ckpt, ckpt_grads, ckpt_calls) = results
    layers = model.config.num_hidden_layers
    assert len(ref_calls) == layers and len(ckpt_calls) == 2 * layers  # recomputed once in backward
    assert all(bounds == batch.cu_seqlens.tolist() for bounds in ckpt_calls)
    assert_loss_close(loss_ckpt, loss)
    assert_grads_close(ckpt_grads, ref_grads)


def test_packed_losses_refuse_a_model_without_the_packed_attention():
    model = tiny_text_model("bert", task=True, attn="sdpa")
    with pytest.raises(ConfigError, match="use_packed_attention"):
        classification_loss(model, pack_classification(classification_examples()))


def test_lora_causal_lm_trains_packed_and_matches_padded():
    from lit_fast.models.lora import LoraSettings, apply_lora

    settings = LoraSettings(rank=4, alpha=8, dropout=0.0, target_modules="all-linear")
    # sharpened weights: a random tiny model's logits are otherwise too flat for LoRA to move them in a few steps
    ref = apply_lora(causal_model("llama"), settings, "CAUSAL_LM")
    ref.set_attn_implementation("sdpa")
    packed = use_packed_attention(copy.deepcopy(ref))
    examples = causal_examples()
    ref(**padded_batch(examples, 0, causal=True)).loss.backward()
    batch = pack_causal(examples)
    causal_lm_loss(packed, batch).backward()
    assert_grads_close(grads(packed), grads(ref))
    assert all("lora_" in name for name in grads(packed))

    optimizer = torch.optim.AdamW([p for p in packed.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        loss = causal_lm_loss(packed, batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.6 * losses[0], losses


def test_lora_classifier_packed_equals_padded():
    from lit_fast.models.lora import LoraSettings, apply_lora

    settings = LoraSettings(rank=4, alpha=8, dropout=0.0, target_modules=["query", "value"])
    ref = apply_lora(tiny_text_model("bert", task=True, attn="sdpa"), settings, "SEQ_CLS")
    packed = use_packed_attention(copy.deepcopy(ref))
    examples = classification_examples()
    out = ref(**padded_batch(examples, 1, causal=False))
    out.loss.backward()
    loss, _ = classification_loss(packed, pack_classification(examples))
    loss.backward()
    assert_loss_close(loss, out.loss)
    got = grads(packed)
    assert any("lora_" in name for name in got) and any("classifier" in name for name in got)
    assert_grads_close(got, grads(ref))


class _Attention(torch.nn.Module):
    """What varlen_attention reads from an HF attention module."""

    def __init__(self, causal: bool):
        super().__init__()
        self.is_causal = causal


# ---- token classification and (query, passage) pairs: TokenClassifier and Reranker -------------------------------
PAIR_TOKEN_TYPES = ("bert", "electra", "albert")  # the encoders whose tokenizers mark the second text


def head_pair(model_type: str, auto_class, num_labels: int):
    """A tiny `model_type` with another task head (token classification, or one relevance logit), sdpa and packed."""
    config = tiny_text_model(model_type, task=True, attn="sdpa").config
    config.num_labels = num_labels
    torch.manual_seed(0)
    ref = auto_class.from_config(config, attn_implementation="sdpa").eval()
    return ref, use_packed_attention(copy.deepcopy(ref))


def token_examples(lengths=LENGTHS, seed: int = 0) -> list[dict]:
    """A tag on about half the tokens (first subwords), -100 on the rest and on the first and last (special) ones."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i, n in enumerate(lengths):
        tags = torch.randint(0, 3, (n,), generator=g).tolist()
        labelled = torch.rand(n, generator=g) < 0.5
        labels = [t if keep and 0 < k < n - 1 else IGNORE for k, (t, keep) in enumerate(zip(tags, labelled))]
        labels[1] = tags[1]  # at least one labelled token in every example
        examples.append({"index": i, "input_ids": _ids(n, g, 5, 99), "labels": labels})
    return examples


def pair_examples(model_type: str, lengths=LENGTHS, seed: int = 0) -> list[dict]:
    """Query then passage, token type 1 on the passage where the encoder takes token types; relevance in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i, n in enumerate(lengths):
        example = {"index": i, "input_ids": _ids(n, g, 5, 99), "labels": float(torch.rand(1, generator=g))}
        if model_type in PAIR_TOKEN_TYPES:
            example["token_type_ids"] = [0] * (n // 2) + [1] * (n - n // 2)
        examples.append(example)
    return examples


def padded_token_batch(examples: list[dict], pad_id: int) -> dict:
    ids = [e["input_ids"] for e in examples]
    return {"input_ids": padded(ids, pad_id), "attention_mask": padded([[1] * len(r) for r in ids], 0),
            "labels": padded([e["labels"] for e in examples], IGNORE)}


@pytest.mark.parametrize("model_type", ENCODERS)
def test_token_classifier_packed_equals_padded(model_type):
    from transformers import AutoModelForTokenClassification

    ref, packed = head_pair(model_type, AutoModelForTokenClassification, 3)
    examples = token_examples()
    batch = padded_token_batch(examples, ref.config.pad_token_id)
    out = ref(**batch)  # HF's own loss: the mean over the labelled tokens
    out.loss.backward()
    row = pack_tokens(examples)
    loss, logits = token_classification_loss(packed, row)
    loss.backward()
    assert_loss_close(loss, out.loss)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(logits, out.logits[real], rtol=RTOL, atol=RTOL * out.logits.abs().max().item())
    assert row.num_targets == int((batch["labels"] != IGNORE).sum())
    assert_grads_close(grads(packed), grads(ref))
    # the test can fail: where the first two examples attend to each other, their logits leave the tolerance
    merged = copy.copy(row)
    merged.cu_seqlens = row.cu_seqlens[[0, 2, 3, 4, 5]]
    with torch.no_grad():
        crossed = token_classifier_logits(packed, merged)
    assert not torch.allclose(crossed, out.logits[real], rtol=RTOL, atol=RTOL * out.logits.abs().max().item())


def test_token_classifier_evaluation_reads_each_examples_own_tokens():
    """The TokenClassifier's validation on a packed row: per-example logits and word ids laid out as the padded
    batch's, so the word tags (and the entity scores made of them) are the padded batch's."""
    from transformers import AutoModelForTokenClassification

    from lit_fast.tasks.token_classifier import NO_WORD, example_rows, word_predictions

    ref, packed = head_pair("bert", AutoModelForTokenClassification, 3)
    examples = token_examples()
    for e in examples:  # words of one or two subwords between the special tokens
        inner = [k // 2 for k in range(len(e["input_ids"]) - 2)]
        e["word_ids"] = [NO_WORD, *inner, NO_WORD]
    batch = padded_token_batch(examples, ref.config.pad_token_id)
    word_ids = padded([e["word_ids"] for e in examples], NO_WORD)
    counts = [max(e["word_ids"]) + 1 for e in examples]
    with torch.no_grad():
        want = word_predictions(ref(**batch).logits, word_ids, counts)
        row = pack_tokens(examples)
        logits = example_rows(token_classification_loss(packed, row)[1], row.cu_seqlens, row.max_seqlen, 0.0)
    flat = torch.tensor([w for e in examples for w in e["word_ids"]])
    got = word_predictions(logits, example_rows(flat, row.cu_seqlens, row.max_seqlen, NO_WORD), counts)
    assert [[t for t, _ in words] for words in got] == [[t for t, _ in words] for words in want]
    for words, ref_words in zip(got, want):
        assert [s for _, s in words] == pytest.approx([s for _, s in ref_words], rel=RTOL)


@pytest.mark.parametrize("model_type", ENCODERS)
def test_pair_classifier_packed_equals_padded(model_type):
    """A cross-encoder (the Reranker): one logit per (query, passage) pair, binary cross-entropy on it."""
    from transformers import AutoModelForSequenceClassification

    ref, packed = head_pair(model_type, AutoModelForSequenceClassification, 1)
    examples = pair_examples(model_type)
    batch = padded_batch(examples, ref.config.pad_token_id, causal=False)
    if model_type in PAIR_TOKEN_TYPES:
        batch["token_type_ids"] = padded([e["token_type_ids"] for e in examples], 0)
    labels = batch.pop("labels").float()
    want = ref(**batch).logits.float()
    ref_loss = torch.nn.functional.binary_cross_entropy_with_logits(want[:, 0], labels)
    ref_loss.backward()
    row = pack_classification(examples)
    assert row.labels.dtype == torch.float32
    logits = classifier_logits(packed, row).float()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], row.labels)
    loss.backward()
    assert_loss_close(loss, ref_loss)
    torch.testing.assert_close(logits, want, rtol=RTOL, atol=RTOL * want.abs().max().item())
    assert_grads_close(grads(packed), grads(ref))
    if model_type in PAIR_TOKEN_TYPES:  # the token types travel in the row: without them the logits move
        plain = copy.copy(row)
        plain.token_type_ids = None
        with torch.no_grad():
            assert not torch.allclose(classifier_logits(packed, plain).float(), want, rtol=100 * RTOL, atol=0)


def _other_examples_token_terms(model, examples, changed: int):
    """Each example's summed token cross-entropy, and the gradients of the sum over the examples but `changed`."""
    model.zero_grad()
    row = pack_tokens(examples)
    per_token = torch.nn.functional.cross_entropy(token_classifier_logits(model, row), row.labels[0],
                                                  ignore_index=IGNORE, reduction="none")
    starts = row.cu_seqlens.long()
    example = torch.repeat_interleave(torch.arange(row.num_examples), starts[1:] - starts[:-1])
    terms = torch.zeros(row.num_examples).index_add(0, example, per_token)
    keep = [i for i in range(len(examples)) if i != changed]
    terms[keep].sum().backward()
    return terms.detach(), grads(model)


@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert"])
def test_changing_one_tagged_example_leaves_the_others_token_terms_unchanged(model_type):
    from transformers import AutoModelForTokenClassification

    _, model = head_pair(model_type, AutoModelForTokenClassification, 3)
    examples = token_examples()
    changed = 2
    other = copy.deepcopy(examples)
    other[changed] = token_examples([LENGTHS[changed] + 4], seed=9)[0]  # new tokens, labels and length
    terms, grad = _other_examples_token_terms(model, examples, changed)
    terms2, grad2 = _other_examples_token_terms(model, other, changed)
    keep = [i for i in range(len(examples)) if i != changed]
    assert not torch.allclose(terms[changed], terms2[changed])
    torch.testing.assert_close(terms2[keep], terms[keep], rtol=RTOL, atol=0)
    assert_grads_close(grad2, grad)


def test_packed_token_losses_refuse_a_sequence_classifier():
    _, model = encoder_pair("bert")
    with pytest.raises(UnsupportedModelError, match="not BertForSequenceClassification"):
        token_classification_loss(model, pack_tokens(token_examples()))


def _qkv(lengths: list[int], device: str = "cpu", dtype=torch.float32, heads=(4, 4, 4)):
    g = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(1, h, sum(lengths), 16, device=device, generator=g, dtype=dtype).requires_grad_()
            for h in heads]


@pytest.mark.parametrize("causal", [False, True])
def test_attention_padded_inside_equals_per_example(causal):
    """CUDA's route for dropout and fp32 (examples padded inside the attention only), run here on the CPU:
    outputs and input gradients equal SDPA per example."""
    from lit_fast.training.attention import _sdpa_padded, _sdpa_per_example

    lengths = [7, 1, 12, 3]
    bounds = torch.tensor([0] + lengths).cumsum(0)
    q, k, v = _qkv(lengths)
    out = _sdpa_padded(q, k, v, bounds, max(lengths), 0.0, 0.25, causal)
    out.square().sum().backward()
    got = [t.grad for t in (q, k, v)]
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = _sdpa_per_example(q2, k2, v2, bounds.tolist(), 0.0, 0.25, causal)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, (q2.grad, k2.grad, v2.grad)):  # the 1-token example's query gradient is 0 only exactly
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())


def test_attention_dropout_padded_inside_stays_inside_each_example():
    """With dropout on, new keys and values in one example leave every other example's output unchanged (same
    seed, same lengths: the same dropout draws), and dropout does act."""
    from lit_fast.training.attention import _sdpa_padded

    lengths = [9, 4, 11]
    bounds = torch.tensor([0] + lengths).cumsum(0)
    q, k, v = (t.detach() for t in _qkv(lengths))
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 9:13], v2[:, :, 9:13] = torch.randn_like(k2[:, :, 9:13]), torch.randn_like(v2[:, :, 9:13])
    runs = []
    for keys, values in ((k, v), (k2, v2)):
        torch.manual_seed(3)
        runs.append(_sdpa_padded(q, keys, values, bounds, max(lengths), 0.3, 0.25, False))
    others = torch.cat([torch.arange(0, 9), torch.arange(13, 24)])
    torch.testing.assert_close(runs[0][:, others], runs[1][:, others], rtol=0, atol=0)
    assert not torch.allclose(runs[0][:, 9:13], runs[1][:, 9:13])
    assert not torch.allclose(runs[0], _sdpa_padded(q, k, v, bounds, max(lengths), 0.0, 0.25, False))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_attention_dropout_and_fp32_route(dtype):
    """On CUDA, fp32 runs padded inside the attention and bf16 with dropout runs flash with its dropout: at dropout 0
    both equal SDPA per example; with dropout gradients flow."""
    from lit_fast.training.attention import _sdpa_per_example, varlen_attention

    lengths = [37, 5, 128, 64, 1]
    bounds = torch.tensor([0] + lengths).cumsum(0).to(torch.int32).cuda()
    q, k, v = _qkv(lengths, "cuda", dtype, heads=(8, 2, 2))
    for dropout in (0.0, 0.1):
        out, _ = varlen_attention(_Attention(False), q, k, v, None, dropout=dropout, scaling=0.25,
                                  cu_seq_lens_q=bounds, max_length_q=max(lengths))
        out.float().square().sum().backward()
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
        if dropout == 0.0:
            ref = _sdpa_per_example(*(t.detach().float() for t in (q, k.repeat_interleave(4, 1),
                                                                   v.repeat_interleave(4, 1))),
                                    bounds.tolist(), 0.0, 0.25, False)
            tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
            torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_flash_dropout_route(causal):
    """bf16 with attention dropout: flash varlen with its own dropout. At p=0 it is varlen_attn's kernel (the same
    numbers, forward and gradients). At p=0.2: the backward replays the forward's mask (the output is linear in v
    for a fixed mask, so sum(dL/dv * v) equals L); other examples' outputs do not move when one example changes;
    averaged over draws it is the attention without dropout."""
    from lit_fast.training.attention import _flash_varlen, _flash_varlen_dropout

    lengths = [37, 5, 128, 64, 1]
    bounds = torch.tensor([0] + lengths).cumsum(0).to(torch.int32).cuda()
    longest = max(lengths)

    def run(route, q, k, v, *args):
        torch.manual_seed(7)
        q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out = route(q, k, v, bounds, longest, *args)
        weights = torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out)
        loss = (out.float() * weights).sum()
        loss.backward()
        return out.detach().float(), loss.detach(), q.grad.float(), k.grad.float(), v.grad.float(), v.detach().float()

    q, k, v = _qkv(lengths, "cuda", torch.bfloat16, heads=(4, 4, 4))
    plain = run(_flash_varlen, q, k, v, 0.25, causal)
    zero = run(_flash_varlen_dropout, q, k, v, 0.0, 0.25, causal)
    for got, want in zip(zero[:5], plain[:5]):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3)

    out, loss, _, _, dv, v32 = run(_flash_varlen_dropout, q, k, v, 0.2, 0.25, causal)
    assert all(torch.isfinite(t).all() for t in (out, dv))
    assert not torch.allclose(out, plain[0], atol=1e-3), "dropout 0.2 changed nothing"
    torch.testing.assert_close((dv * v32).sum(), loss.float(), rtol=2e-2, atol=1e-2 * loss.abs().item())

    changed = v.detach().clone()
    changed[:, :, : lengths[0]] += 1.0  # example 0's values only
    other = run(_flash_varlen_dropout, q, k, changed, 0.2, 0.25, causal)[0]
    assert torch.equal(other[:, lengths[0]:], out[:, lengths[0]:])  # (1, tokens, heads, dim)
    assert not torch.equal(other[:, : lengths[0]], out[:, : lengths[0]])

    with torch.no_grad():
        draws = torch.stack([_flash_varlen_dropout(q.detach(), k.detach(), v.detach(), bounds, longest, 0.2, 0.25,
                                                   causal).float() for _ in range(1000)])
    error = draws.mean(0) - plain[0]
    assert error.abs().mean() < 0.02 and error.mean().abs() < 0.005, (error.abs().mean(), error.mean())


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_varlen_attention_forward_and_backward(causal):
    """bf16 through torch's varlen_attn (flash) against fp32 SDPA per example, GQA included."""
    from lit_fast.training.attention import _sdpa_per_example, _varlen, varlen_attention

    assert _varlen() is not None, "this torch has no torch.nn.attention.varlen"
    lengths = [37, 5, 128, 64, 1]
    bounds = torch.tensor([0] + lengths).cumsum(0).to(torch.int32).cuda()
    total, g = sum(lengths), torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, heads, total, 64, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
               for heads in (8, 2, 2))
    out, _ = varlen_attention(_Attention(causal), q, k, v, None, scaling=0.125, cu_seq_lens_q=bounds,
                              max_length_q=max(lengths))
    out.float().square().sum().backward()
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = _sdpa_per_example(q32, k32.repeat_interleave(4, 1), v32.repeat_interleave(4, 1), bounds.tolist(), 0.0,
                            0.125, causal)
    ref.square().sum().backward()
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    for got, want in ((q, q32), (k, k32), (v, v32)):
        torch.testing.assert_close(got.grad.float(), want.grad, rtol=2e-2, atol=2e-2 * want.grad.abs().max().item())


@pytest.mark.gpu
def test_cuda_bf16_packed_classifier_loss_matches_padded():
    ref, packed = encoder_pair("bert")
    ref, packed = ref.cuda(), packed.cuda()
    examples = classification_examples()
    batch = {k: v.cuda() for k, v in padded_batch(examples, 1, causal=False).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = ref(**batch).loss
        got, _ = classification_loss(packed, pack_classification(examples).to("cuda"))
    assert abs(got.item() - want.item()) <= 2e-2 * abs(want.item())


# ---- sentence embeddings: the Embedder's ranking loss on packed texts ---------------------------------------------
EMBEDDER_TYPES = ["bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "albert"]
PROMPT = 4  # tokens of a prompt (with the leading special token) that a head with include_prompt false leaves out
# how vectors are made: MiniLM's (mean, normalised); cls after the prompt; every mode concatenated after the prompt
EMBEDDING_HEADS = {
    "mean-normalize": dict(pooling=("mean",), normalize=True),
    "cls-prompt-dense-normalize": dict(pooling=("cls",), include_prompt=False, dense=True, normalize=True),
    "every-mode-prompt-dense": dict(pooling=("mean", "max", "mean_sqrt_len", "weightedmean", "lasttoken", "cls"),
                                    include_prompt=False, dense=True),
}


@pytest.fixture(scope="module")
def encoder_dirs(tmp_path_factory, minilm_dir):
    """model_type -> a folder with a tiny random bare encoder (as an Embedder loads it) and a tokenizer; the tests
    build their token ids themselves (5..98, the tiny models' vocabulary)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    folders = {}
    for model_type in EMBEDDER_TYPES:
        folder = tmp_path_factory.mktemp(f"tiny-{model_type}")
        tiny_text_model(model_type, attn="sdpa").save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[model_type] = str(folder)
    return folders


def embedder_pair(directory: str, head: dict, **options):
    """The same Embedder twice, padded and packed: a tiny encoder, the given head (a seeded Dense layer), eval mode
    (dropout off)."""
    from lit_fast import Embedder
    from lit_fast.models.sentence_transformers import DenseSpec, SentenceTransformerSpec
    from lit_fast.tasks.embedding import EmbeddingHead

    torch.manual_seed(0)
    width = 64 * len(head["pooling"])
    dense = (DenseSpec(torch.randn(16, width) / width ** 0.5, torch.randn(16), "torch.nn.modules.activation.Tanh"),
             ) if head.get("dense") else ()
    spec = SentenceTransformerSpec(pooling=head["pooling"], include_prompt=head.get("include_prompt", True),
                                   dense=dense, normalize=head.get("normalize", False))
    modules = []
    for packing in (False, True):
        module = Embedder(directory, packing=packing, **options)
        module.configure_model()
        module.head = EmbeddingHead(spec, prompt_length=PROMPT)
        modules.append(module.eval())
    padded, packed = modules
    use_packed_attention(packed.model)
    return padded, packed


def embedder_rows(seed: int = 0) -> list[dict]:
    """Rows as PairCodec.encode makes them: 5 anchors and positives and 0 to 2 hard negatives each (4 in all), every
    text 5 to 14 tokens (more than the prompt), distinct keys."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(5):
        negatives = i % 3
        texts = [_ids(int(n), g, 5, 99) for n in torch.randint(5, 15, (2 + negatives,), generator=g)]
        rows.append({"index": i, "input_ids": texts[0], "pair_ids": texts[1], "pair_key": 100 + i,
                     "negative_ids": texts[2:], "negative_keys": [200 + 10 * i + k for k in range(negatives)],
                     "length": sum(len(t) for t in texts)})
    return rows


def pair_codec(pad_id: int):
    """The Embedder's codec, padding with the tiny models' pad id (its collate is the padded batch, pack the packed)."""
    from types import SimpleNamespace

    from lit_fast.tasks.codecs import EncoderCodec
    from lit_fast.tasks.contrastive import PairCodec

    return PairCodec(EncoderCodec(SimpleNamespace(pad_token_id=pad_id, padding_side="right"), max_length=64))


def embedder_loss_and_grads(module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module.zero_grad(set_to_none=True)
    loss = module.compute_loss(batch)
    loss.backward()
    return loss.detach(), grads(module)


def assert_embedder_packed_equals_padded(directory: str, head: dict, **options) -> None:
    padded, packed = embedder_pair(directory, head, **options)
    rows, codec = embedder_rows(), pair_codec(padded.model.config.pad_token_id)
    loss, ref = embedder_loss_and_grads(padded, codec.collate(rows))
    batch = codec.pack(rows)
    assert batch.texts.row.num_examples == 14 and batch.num_examples == 5  # anchors, positives, hard negatives
    packed_loss, got = embedder_loss_and_grads(packed, batch)
    assert_loss_close(packed_loss, loss)
    assert not any("pooler" in name for name in ref)  # frozen: not part of a sentence embedding
    assert_grads_close(got, ref)
    if head.get("dense"):
        assert "head.dense.0.weight" in got


@pytest.mark.parametrize("model_type", EMBEDDER_TYPES)
def test_embedder_packed_equals_padded(model_type, encoder_dirs):
    """MiniLM's head (mean, normalised) on every packed architecture: loss and every gradient."""
    assert_embedder_packed_equals_padded(encoder_dirs[model_type], EMBEDDING_HEADS["mean-normalize"])


@pytest.mark.parametrize("head", ["cls-prompt-dense-normalize", "every-mode-prompt-dense"])
@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_embedder_heads_packed_equal_padded(model_type, head, encoder_dirs):
    """Every pooling mode, the prompt left out, a Dense layer, and both loss directions."""
    assert_embedder_packed_equals_padded(encoder_dirs[model_type], EMBEDDING_HEADS[head], symmetric=True)


@pytest.mark.parametrize("model_type", ["bert", "distilbert"])
def test_embedder_gradient_cache_packed_equals_padded(model_type, encoder_dirs):
    """The gradient cache on packed texts (mini-batches of 3 texts cut from the row) against the padded loss
    without a cache: the same loss and gradients."""
    padded, packed = embedder_pair(encoder_dirs[model_type], EMBEDDING_HEADS["cls-prompt-dense-normalize"],
                                   symmetric=True)
    packed.hparams.mini_batch_size = 3
    rows, codec = embedder_rows(), pair_codec(padded.model.config.pad_token_id)
    loss, ref = embedder_loss_and_grads(padded, codec.collate(rows))
    packed_loss, got = embedder_loss_and_grads(packed, codec.pack(rows))
    assert_loss_close(packed_loss, loss)
    assert_grads_close(got, ref)


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_embedder_changing_one_text_leaves_the_other_vectors_unchanged(model_type, encoder_dirs):
    """A positive with new tokens and a new length: every other text's vector, and the gradients of a function of
    those vectors, stay as they were; the changed text's own vector changes."""
    _, packed = embedder_pair(encoder_dirs[model_type], EMBEDDING_HEADS["every-mode-prompt-dense"])
    rows, codec = embedder_rows(), pair_codec(packed.model.config.pad_token_id)
    other = copy.deepcopy(rows)
    other[2]["pair_ids"] = _ids(len(rows[2]["pair_ids"]) + 4, torch.Generator().manual_seed(9), 5, 99)
    changed = 5 + 2  # the row's texts: the 5 anchors, then the positives
    keep = [i for i in range(14) if i != changed]
    weights = torch.randn(14, 16, generator=torch.Generator().manual_seed(3))
    results = []
    for batch_rows in (rows, other):
        packed.zero_grad(set_to_none=True)
        vectors = packed._embed_inputs(codec.pack(batch_rows).texts)
        (vectors[keep] * weights[keep]).sum().backward()
        results.append((vectors.detach(), grads(packed)))
    (vectors, grad), (vectors2, grad2) = results
    assert (vectors2[changed] - vectors[changed]).norm() > 1e-3 * vectors[changed].norm()
    for i in keep:
        assert (vectors2[i] - vectors[i]).norm() <= RTOL * vectors[i].norm(), i
    assert_grads_close(grad2, grad)


@pytest.mark.parametrize("prompt", [0, 3])
@pytest.mark.parametrize("mode", ["mean", "max", "mean_sqrt_len", "weightedmean", "lasttoken", "cls"])
def test_pooling_over_packed_texts_equals_padded(mode, prompt):
    """pool_packed on a packed row's states == pool on the padded batch's, texts shorter than the prompt included
    (they pool as an all-masked padded row does); the pad positions hold large values that must not leak in."""
    from lit_fast.tasks.embedding import pool
    from lit_fast.training import pack_classification
    from lit_fast.training.pooling import pool_packed

    lengths = [6, 1, 3, 9, 4, 2]
    g = torch.Generator().manual_seed(0)
    states = [torch.randn(n, 8, generator=g) for n in lengths]
    mask = padded([[1] * n for n in lengths], 0)
    hidden = torch.full((len(lengths), max(lengths), 8), 1e4)
    for row, s in enumerate(states):
        hidden[row, : len(s)] = s
    batch = pack_classification([{"input_ids": [5] * n} for n in lengths])
    want = pool(hidden, mask, mode, prompt)
    got = pool_packed(torch.cat(states), batch, mode, prompt)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=1e-6)
