"""Tiny random-init encoders and the checks the encoder fast-path tests share (parity with HF eager on real tokens)."""

from __future__ import annotations

import torch
import transformers as T

from lit_fast.fastpath.encoder.stack import FastStack

ATOL = 1e-4
SEQ_LEN = 12

# model_type -> (config class, bare model, task model, config overrides)
TEXT_MODELS = {
    "bert": (T.BertConfig, T.BertModel, T.BertForSequenceClassification, {}),
    "roberta": (T.RobertaConfig, T.RobertaModel, T.RobertaForSequenceClassification, {}),
    "xlm-roberta": (T.XLMRobertaConfig, T.XLMRobertaModel, T.XLMRobertaForSequenceClassification, {}),
    "camembert": (T.CamembertConfig, T.CamembertModel, T.CamembertForSequenceClassification, {}),
    "electra": (T.ElectraConfig, T.ElectraModel, T.ElectraForSequenceClassification, {"embedding_size": 32}),
    "distilbert": (T.DistilBertConfig, T.DistilBertModel, T.DistilBertForSequenceClassification, {}),
    # 3 layers from 1 shared group, the gelu_new default (which only the packed backend reproduces)
    "albert": (T.AlbertConfig, T.AlbertModel, T.AlbertForSequenceClassification, {"embedding_size": 32}),
}


def tiny_text_model(model_type: str, task: bool = False, attn: str = "eager", **overrides) -> T.PreTrainedModel:
    """A random-init 2-layer (ALBERT: 3 shared) model of `model_type`, hidden 64, 4 heads, in eval mode."""
    config_cls, bare, head, extra = TEXT_MODELS[model_type]
    if model_type == "distilbert":
        sizes = dict(dim=64, n_layers=2, n_heads=4, hidden_dim=128)
    else:
        sizes = dict(hidden_size=64, num_hidden_layers=3 if model_type == "albert" else 2,
                     num_attention_heads=4, intermediate_size=128)
    config = config_cls(vocab_size=99, max_position_embeddings=64, pad_token_id=1, num_labels=3,
                        **{**sizes, **extra, **overrides})
    config._attn_implementation = attn
    torch.manual_seed(0)
    return (head if task else bare)(config).eval()


def text_batch(padding: str, batch: int = 4, vocab: int = 99, pad_id: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask: "right", "left", "none" (all full) or "one" (a batch of one, padded)."""
    lengths = {"right": [12, 5, 9, 3], "left": [12, 5, 9, 3], "none": [12] * 4, "one": [8]}[padding][:batch]
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (len(lengths), SEQ_LEN), generator=generator)
    mask = torch.zeros(len(lengths), SEQ_LEN, dtype=torch.long)
    for row, length in enumerate(lengths):
        if padding == "left":
            mask[row, SEQ_LEN - length:] = 1
        else:
            mask[row, :length] = 1
    return ids.masked_fill(mask == 0, pad_id), mask


def assert_close_on_tokens(out: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, atol: float = ATOL) -> None:
    real = mask.bool()
    diff = (out[real].float() - ref[real].float()).abs().max().item()
    assert diff <= atol, f"max abs diff on real tokens {diff:.3g} > {atol}"


def paths_run(model: torch.nn.Module) -> set[str | None]:
    """What each installed fast stack ran on its latest call (a backend name, or "hf: <why>")."""
    return {m.forward.last_path for m in model.modules() if isinstance(vars(m).get("forward"), FastStack)}


def fused_ok(model_type: str) -> bool:
    return model_type != "albert"  # gelu_new is not one of the fused kernel's activations



def _eval(model: T.PreTrainedModel) -> T.PreTrainedModel:
    model.config._attn_implementation = "eager"
    return model.eval()


def tiny_vit(task: bool = False) -> T.PreTrainedModel:
    config = T.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=128, num_labels=3)
    torch.manual_seed(0)
    return _eval((T.ViTForImageClassification if task else T.ViTModel)(config))


def tiny_audio(model_type: str, stable: bool, task: bool = False) -> T.PreTrainedModel:
    config_cls, bare, head = {
        "wav2vec2": (T.Wav2Vec2Config, T.Wav2Vec2Model, T.Wav2Vec2ForSequenceClassification),
        "hubert": (T.HubertConfig, T.HubertModel, T.HubertForSequenceClassification),
    }[model_type]
    config = config_cls(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        conv_dim=(32, 32), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                        num_conv_pos_embedding_groups=4, do_stable_layer_norm=stable,
                        feat_extract_norm="layer" if stable else "group", num_labels=3)
    torch.manual_seed(0)
    return _eval((head if task else bare)(config))


def audio_batch(padding: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw audio (batch, samples) and its sample mask; audio is padded on the right (or not at all)."""
    lengths = {"right": [1600, 900, 1300], "none": [1600] * 3, "one": [1200]}[padding]
    generator = torch.Generator().manual_seed(2)
    values = torch.randn(len(lengths), 1600, generator=generator)
    mask = (torch.arange(1600) < torch.tensor(lengths)[:, None]).long()
    return values * mask, mask


def tiny_seq2seq(model_type: str, task: bool = False) -> T.PreTrainedModel:
    config_cls, bare, head = {
        "bart": (T.BartConfig, T.BartModel, T.BartForSequenceClassification),
        "mbart": (T.MBartConfig, T.MBartModel, T.MBartForSequenceClassification),
        "marian": (T.MarianConfig, T.MarianModel, T.MarianMTModel),
    }[model_type]
    config = config_cls(vocab_size=99, d_model=64, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                        max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                        decoder_start_token_id=2, forced_eos_token_id=None, num_labels=3)
    torch.manual_seed(0)
    return _eval((head if task else bare)(config))


