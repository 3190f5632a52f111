"""lit_fast.models.quantization on tiny random-init models (bitsandbytes >= 0.46 runs 4-bit and int8 on CPU)."""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("bitsandbytes")

from lit_fast.errors import ConfigError  # noqa: E402
from lit_fast.models import precision_checks as checks  # noqa: E402
from lit_fast.models import quantization as q  # noqa: E402

FOUR_BIT = ("nf4", "nf4-dq", "fp4", "fp4-dq")
# cosine to full precision that each mode must reach on the tiny models below (measured: nf4 ~0.97-0.99,
# fp4 ~0.96-0.98, int8 > 0.999); a broken mode (wrong scales, wrong layout) lands far below
MIN_COS = {"nf4": 0.95, "nf4-dq": 0.95, "fp4": 0.93, "fp4-dq": 0.93, "int8": 0.995}


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float().flatten(0, -2), b.float().flatten(0, -2), dim=-1)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> str:
    """Random BERT with larger weights than the default init, so that quantization error is visible."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("q-bert")
    config = BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=512, initializer_range=0.1, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    return str(path)


def _llama_dir(tmp_path_factory, tied: bool) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(f"q-llama-{'tied' if tied else 'untied'}")
    config = LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tied)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    return _llama_dir(tmp_path_factory, tied=True)


@pytest.fixture(scope="module")
def llama_untied_dir(tmp_path_factory) -> str:
    return _llama_dir(tmp_path_factory, tied=False)


def _load(auto_class, path: str, mode: str | None, **kw):
    config = q.bnb_config(mode, "fp32", "cpu", **kw) if mode else None
    return auto_class.from_pretrained(path, quantization_config=config, attn_implementation="sdpa").eval()


# ---- configuration and its errors ---------------------------------------------------------------------------
def test_unknown_mode_names_the_choices():
    with pytest.raises(ConfigError, match="unknown quantization mode 'nf3'.*nf4, nf4-dq, fp4, fp4-dq, int8"):
        q.bnb_config("nf3")


@pytest.mark.parametrize("mode", [None, "", "none"])
def test_no_mode_means_no_config(mode):
    assert q.bnb_config(mode) is None


@pytest.mark.parametrize("mode", q.QUANTIZATION_MODES)
def test_config_matches_mode(mode):
    config = q.bnb_config(mode.upper(), "bf16", "cpu", skip_modules=["encoder.layer.5"])
    assert config.load_in_8bit == (mode == "int8") and config.load_in_4bit == (mode != "int8")
    if mode != "int8":
        assert config.bnb_4bit_quant_type == mode[:3]
        assert config.bnb_4bit_use_double_quant == mode.endswith("-dq")
        assert config.bnb_4bit_compute_dtype == torch.bfloat16
    # the user's skip list adds to the defaults: heads must stay in full precision
    assert {"lm_head", "classifier", "score", "encoder.layer.5"} <= set(config.llm_int8_skip_modules)


@pytest.mark.parametrize("bad", ["float64", "int4", torch.float64])
def test_bad_compute_dtype(bad):
    with pytest.raises(ConfigError, match="bf16, fp16, fp32"):
        q.bnb_config("nf4", bad, "cpu")


def test_default_compute_dtype_on_cpu(monkeypatch):
    monkeypatch.setattr(q, "_cpu_has_native_bf16", lambda: True)
    assert q.resolve_compute_dtype(None, "cpu") == torch.bfloat16
    assert q.resolve_compute_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(q, "_cpu_has_native_bf16", lambda: False)
    assert q.resolve_compute_dtype(None, "cpu") == torch.float32
    assert q.resolve_compute_dtype("fp16", "cpu") == torch.float16


def test_gpu_without_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    assert q.resolve_compute_dtype(None, "cuda") == torch.float16
    with pytest.raises(ConfigError, match="Tesla T4.*no bf16.*fp16"):
        q.resolve_compute_dtype("bf16", "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_requested_without_cuda():
    with pytest.raises(ConfigError, match="no CUDA device.*accelerator cpu"):
        q.bnb_config("nf4", device="cuda")


def test_unsupported_device():
    with pytest.raises(ConfigError, match="cpu and cuda, not 'mps'"):
        q.bnb_config("nf4", device="mps")


def test_missing_bitsandbytes_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(ConfigError, match=r"pip install 'lit_fast\[quant\]'"):
        q.bnb_config("nf4", device="cpu")


def test_fast_path_forced_on_quantized_model():
    with pytest.raises(ConfigError, match="fast_path fused cannot run.*--model.quantization nf4.*auto"):
        q.check_fast_path("nf4", "fused")
    q.check_fast_path("nf4", "auto")  # auto keeps SDPA with a log line
    q.check_fast_path(None, "packed")


# ---- strategies and Lightning's plugin ----------------------------------------------------------------------
def test_fsdp_refused_with_what_works():
    with pytest.raises(ConfigError, match="does not combine with the 'fsdp' strategy.*ddp"):
        checks.check_strategy_precision("fsdp", None, "nf4")
    plugin = {"class_path": "lightning.pytorch.plugins.BitsandbytesPrecision", "init_args": {"mode": "nf4"}}
    with pytest.raises(ConfigError, match="fsdpstrategy.*ddp"):
        checks.check_strategy_precision({"class_path": "lightning.pytorch.strategies.FSDPStrategy"}, [plugin], None)
    with pytest.raises(ConfigError, match="deepspeed"):
        checks.check_strategy_precision("deepspeed_stage_3", None, "int8")


def test_two_routes_at_once_refused():
    from lightning.pytorch.plugins import BitsandbytesPrecision

    with pytest.raises(ConfigError, match="both quantize"):
        checks.check_strategy_precision("ddp", [BitsandbytesPrecision("nf4")], "nf4")


def test_plugin_on_cpu_refused_and_fine_combinations_pass():
    with pytest.raises(ConfigError, match="CUDA GPUs only.*--model.quantization"):
        checks.check_strategy_precision("auto", "lightning.pytorch.plugins.BitsandbytesPrecision", None, "cpu")
    for strategy in ("auto", "ddp", None):
        checks.check_strategy_precision(strategy, None, "nf4", "cpu")
    checks.check_strategy_precision("fsdp", None, None)  # no quantization: nothing to say


def test_plugin_next_to_a_precision_setting():
    from jsonargparse import Namespace

    plugin = Namespace(class_path="lightning.pytorch.plugins.BitsandbytesPrecision", init_args=Namespace(mode="nf4"))
    with pytest.raises(ConfigError, match="sets the precision itself.*--trainer.precision 32-true"):
        checks.check_strategy_precision("auto", [plugin], None, "cuda", "32-true")
    checks.check_strategy_precision("auto", [plugin], None, "cuda", None)


@pytest.mark.parametrize("precision, match", [("32-true", "set --trainer.precision null"), (None, "CUDA GPUs only")])
def test_lightning_trainer_errors_are_explained(precision, match):
    import lightning as L
    from lightning.pytorch.plugins import BitsandbytesPrecision

    kwargs = {"precision": precision} if precision else {}
    with pytest.raises(ConfigError, match=match):
        with checks.explain_precision_errors():
            L.Trainer(accelerator="cpu", plugins=[BitsandbytesPrecision("nf4")], logger=False, **kwargs)


def test_lightning_fsdp_type_error_is_explained():
    from lightning.pytorch.plugins import BitsandbytesPrecision
    from lightning.pytorch.strategies import FSDPStrategy

    strategy = FSDPStrategy()
    with pytest.raises(ConfigError, match="FSDPPrecision.*What works: --trainer.strategy ddp"):
        with checks.explain_precision_errors():
            strategy.precision_plugin = BitsandbytesPrecision("nf4")  # Lightning raises TypeError here
    with pytest.raises(TypeError, match="unrelated"):  # other errors pass through untouched
        with checks.explain_precision_errors():
            raise TypeError("unrelated")


# ---- encoder and decoder in every mode ---------------------------------------------------------------------
@pytest.mark.parametrize("mode", q.QUANTIZATION_MODES)
def test_encoder_runs_close_to_full_precision(bert_dir, mode):
    from transformers import AutoModel

    ref = _load(AutoModel, bert_dir, None)
    model = _load(AutoModel, bert_dir, mode)
    assert model.config._attn_implementation == "sdpa"
    assert len(q.quantized_module_names(model)) == 12  # 6 linear layers x 2 layers; the pooler stays
    footprint, full = q.weight_footprint(model), q.weight_footprint(ref)
    linear_bytes = sum(m.weight.numel() * 4 for m in ref.encoder.modules() if isinstance(m, torch.nn.Linear))
    # scales included, 4-bit packs the encoder's linear weights into < 1/6 of fp32 bytes, int8 into < 1/3
    assert footprint.quantized_bytes < linear_bytes / (6 if mode != "int8" else 3)
    assert footprint.total_bytes < full.total_bytes
    ids = torch.randint(0, 1000, (3, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    with torch.inference_mode():
        out, expected = model(ids, attention_mask=mask).last_hidden_state, ref(ids, attention_mask=mask).last_hidden_state
    assert torch.isfinite(out).all()
    cos = _cos(out, expected)
    assert cos.min() > MIN_COS[mode], f"{mode}: min cosine {cos.min():.4f}"
    assert (out - expected).abs().max() > 1e-4  # the weights really were quantized


@pytest.mark.parametrize("mode", q.QUANTIZATION_MODES)
def test_decoder_runs_close_to_full_precision(llama_dir, mode):
    from transformers import AutoModelForCausalLM

    ref = _load(AutoModelForCausalLM, llama_dir, None)
    model = _load(AutoModelForCausalLM, llama_dir, mode)
    assert type(model.lm_head) is torch.nn.Linear  # the (tied) output head stays in full precision
    assert len(q.quantized_module_names(model)) == 14
    assert q.weight_footprint(model).total_bytes < 0.6 * q.weight_footprint(ref).total_bytes
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        logits, expected = model(ids).logits, ref(ids).logits
        tokens = model.generate(ids[:1], max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert _cos(logits, expected).mean() > MIN_COS[mode]
    assert tokens.shape == (1, 22)


def test_prepare_quantized_model_guards_small_layers_on_cpu(tmp_path, caplog):
    """bitsandbytes' AVX512-BF16 CPU repacking fails for in_features < 64; prepare_quantized_model avoids it."""
    from transformers import AutoModel, BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=500, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(tmp_path)
    ref = _load(AutoModel, str(tmp_path), None)
    with caplog.at_level("INFO", logger="lit_fast.models.quantization"):
        model = q.prepare_quantized_model(_load(AutoModel, str(tmp_path), "nf4"), "nf4")
    assert "quantization nf4: weights" in caplog.text
    ids = torch.randint(0, 500, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = model(ids).last_hidden_state
    assert _cos(out, ref(ids).last_hidden_state).min() > 0.99


def test_classifier_head_and_pooler_stay_full_precision(tmp_path):
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=128, num_labels=3)
    BertForSequenceClassification(config).save_pretrained(tmp_path)
    model = _load(AutoModelForSequenceClassification, str(tmp_path), "nf4")
    assert type(model.classifier) is torch.nn.Linear and type(model.bert.pooler.dense) is torch.nn.Linear
    assert q.is_quantized(model) and len(q.quantized_module_names(model)) == 6


def test_footprint_counts_tied_weights_once_and_double_quant_is_smaller(llama_dir, bert_dir):
    from transformers import AutoModel, AutoModelForCausalLM

    ref = _load(AutoModelForCausalLM, llama_dir, None)
    params = sum(p.numel() * p.element_size() for p in ref.parameters())  # parameters() yields a tied weight once
    assert q.weight_footprint(ref).total_bytes == params + sum(b.numel() * b.element_size() for b in ref.buffers())
    # double quantization pays a 1 KB code table per layer: it wins from ~32k weights a layer (bert_dir's FFN)
    single = q.weight_footprint(_load(AutoModel, bert_dir, "nf4"))
    double = q.weight_footprint(_load(AutoModel, bert_dir, "nf4-dq"))
    assert double.quantized_bytes < single.quantized_bytes
    assert "quantized layers" in str(single)


@pytest.mark.parametrize("tied", [True, False])
def test_quantize_embeddings(request, tied):
    from transformers import AutoModelForCausalLM

    path = request.getfixturevalue("llama_dir" if tied else "llama_untied_dir")
    ref = _load(AutoModelForCausalLM, path, None)
    model = _load(AutoModelForCausalLM, path, "nf4")
    before = q.weight_footprint(model).total_bytes
    q.quantize_embeddings(model, "nf4")
    after = q.weight_footprint(model)
    assert after.quantized_modules == 16 and after.total_bytes < 0.6 * before
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert _cos(model(ids).logits, ref(ids).logits).mean() > 0.9
        assert model.generate(ids[:1], max_new_tokens=4, min_new_tokens=4, do_sample=False,
                              pad_token_id=0).shape == (1, 20)
    with pytest.raises(ConfigError, match="4-bit modes"):
        q.quantize_embeddings(model, "int8")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", q.QUANTIZATION_MODES)
def test_decoder_on_gpu(llama_dir, mode):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16, device_map="cuda").eval()
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16, device_map="cuda",
                                                 quantization_config=q.bnb_config(mode, device="cuda")).eval()
    assert model.config._attn_implementation == "sdpa"
    assert all(model.get_submodule(n).weight.device.type == "cuda" for n in q.quantized_module_names(model))
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.inference_mode():
        assert _cos(model(ids).logits, ref(ids).logits).mean() > MIN_COS[mode]
        if mode != "int8":
            q.quantize_embeddings(model, mode)
            assert _cos(model(ids).logits, ref(ids).logits).mean() > 0.9
        assert model.generate(ids[:1], max_new_tokens=4, min_new_tokens=4, do_sample=False,
                              pad_token_id=0).shape == (1, 20)
    from lit_fast.fastpath.decoder.loop import FastDecoder, SamplingConfig, unsupported_reason

    if mode == "int8":  # declined up front (a capture would fail half-way), with the reason the log prints
        assert "8-bit" in unsupported_reason(model, 64)
        return
    cfg, mask = SamplingConfig(max_new_tokens=8, pad_token_id=0), torch.ones_like(ids[:1])
    graphed = FastDecoder(model, 1, 64).generate(ids[:1], mask, cfg)  # 4-bit layers replayed in a CUDA graph
    eager = FastDecoder(model, 1, 64, cuda_graph=False).generate(ids[:1], mask, cfg)
    assert graphed.shape == (1, 8) and torch.equal(graphed, eager)
