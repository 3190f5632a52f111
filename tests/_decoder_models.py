"""Tiny random-init decoder and seq2seq models for the decoding/generation tests (no hub access)."""

from __future__ import annotations

import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 256


def causal_model(kind: str, *, seed: int = 0, sharpen: float = 5.0) -> torch.nn.Module:
    """A 2-layer random model in eval mode. ``sharpen`` scales the matrices so greedy choices are not near-ties
    (fp32 parity tests compare tokens; random-init logits are otherwise almost flat)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common))
    elif kind == "opt":
        model = OPTForCausalLM(OPTConfig(hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                                         max_position_embeddings=256, word_embed_proj_dim=32, **common))
    elif kind == "opt-post":  # the OPT-350m layout: LayerNorm after each sub-block
        model = OPTForCausalLM(OPTConfig(hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                                         max_position_embeddings=256, do_layer_norm_before=False, **common))
    elif kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=256, **common))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                                             num_attention_heads=4, num_key_value_heads=1,
                                             max_position_embeddings=256, **common))
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(sharpen)
    return model.eval()


def seq2seq_model(kind: str, *, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "t5":
        cfg = T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                       decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        return T5ForConditionalGeneration(cfg).eval()
    if kind == "bart":
        cfg = BartConfig(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                         decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                         max_position_embeddings=256, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                         decoder_start_token_id=2, forced_eos_token_id=2)
        return BartForConditionalGeneration(cfg).eval()
    raise ValueError(kind)


def left_padded_batch(seed: int = 0, lengths=(10, 6, 3), pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts (tokens 3..VOCAB-1, so no EOS/BOS/PAD inside), left-padded to the longest."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids, mask


def save_tiny(kind: str, directory, tokenizer_dir: str, *, chat_template: bool = True, max_positions: int = 256,
              seed: int = 0) -> str:
    """A tiny random model of `kind` (gpt2, opt, llama, t5, bart) with a real tokenizer (SmolLM2's, vocabulary
    49152), saved like any HF model directory; returns the directory."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if not chat_template:
        tokenizer.chat_template = None
    vocab, pad, eos, bos = len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id
    torch.manual_seed(seed)
    ids = dict(vocab_size=vocab, pad_token_id=pad, eos_token_id=eos, bos_token_id=bos)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=max_positions, **ids))
    elif kind == "opt":
        model = OPTForCausalLM(OPTConfig(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                                         max_position_embeddings=max_positions, word_embed_proj_dim=32, **ids))
    elif kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=max_positions, **ids))
    elif kind == "t5":
        model = T5ForConditionalGeneration(T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                    num_heads=4, pad_token_id=pad, eos_token_id=eos,
                                                    decoder_start_token_id=pad))
    elif kind == "bart":
        model = BartForConditionalGeneration(BartConfig(
            vocab_size=vocab, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=max_positions,
            pad_token_id=pad, bos_token_id=bos, eos_token_id=eos, decoder_start_token_id=eos, forced_eos_token_id=eos))
    else:
        raise ValueError(kind)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)
