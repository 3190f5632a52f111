"""Per-architecture facts for the encoder fast path, written down as data.

For each supported `config.model_type` an `Adapter` says where the encoder stack is, which submodule of a layer is
q, k, v, the output projection, the two LayerNorms and the MLP, whether the layer is pre- or post-LN, and the
few lines an HF stack runs before or after its layer loop (ALBERT's embedding projection, wav2vec2's convolutional
positions). Nothing here copies modeling code: the fast path calls the HF submodules named below.

Two ways to attach: most stacks own their layer loop (`BertEncoder.forward`), so the fast path replaces that
forward and removes padding once for all layers. ViT and the BART family run their loop inside model code that
also embeds tokens; there each layer is converted on its own (`per_layer`), which for ViT costs nothing (images
have no padding) and for BART costs one gather/scatter per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPastAndCrossAttentions


@dataclass(frozen=True)
class LayerMap:
    """Dotted paths, inside one HF encoder layer, of the parts `layers.LayerParts` needs."""

    query: str
    key: str
    value: str
    out: str
    attn_norm: str  # the LayerNorm around attention (after it in post-LN, before it in pre-LN)
    ffn_in: str
    activation: str
    ffn_out: str
    ffn_norm: str  # the LayerNorm around the MLP
    norm_first: bool = False


# A prologue runs on the padded hidden states before the layers (it may change their width); an epilogue runs on
# the packed tokens after the last layer. Both get the stack module they belong to.
Prologue = Callable[[nn.Module, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
Epilogue = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Adapter:
    """How to find, check and run one architecture's encoder stack."""

    layer: LayerMap
    stack: str  # from the base model: the module owning the layer loop, or (per_layer) the ModuleList of layers
    num_heads: str  # config attribute
    activation: str  # config attribute naming the activation (the fused kernel knows only "gelu" and "relu")
    layers: Callable[[nn.Module, object], list[nn.Module]] = lambda stack, config: list(stack.layer)
    output: type | None = BaseModelOutput  # what the stack's forward returns; None: a tensor (per-layer)
    per_layer: bool = False
    prologue: Prologue | None = None
    epilogue: Epilogue | None = None
    # front.py: the base model's forward is embeddings -> (projection) -> stack -> (pooler), which a FastFront can
    # run itself on packed tokens. `embeddings` names a module of word + position (+ token type) tables and a
    # LayerNorm; the prologue (if any) must then work row by row, since it runs on packed tokens.
    front: bool = False
    embeddings: str | None = None
    project: str | None = None  # a row-wise module the base model applies to the embeddings, where it has one
    pooler: Callable[[nn.Module, torch.Tensor], "torch.Tensor | None"] | None = None  # (base, hidden) -> pooled


BERT_LAYER = LayerMap(
    query="attention.self.query",
    key="attention.self.key",
    value="attention.self.value",
    out="attention.output.dense",
    attn_norm="attention.output.LayerNorm",
    ffn_in="intermediate.dense",
    activation="intermediate.intermediate_act_fn",
    ffn_out="output.dense",
    ffn_norm="output.LayerNorm",
)
DISTILBERT_LAYER = LayerMap(
    query="attention.q_lin",
    key="attention.k_lin",
    value="attention.v_lin",
    out="attention.out_lin",
    attn_norm="sa_layer_norm",
    ffn_in="ffn.lin1",
    activation="ffn.activation",
    ffn_out="ffn.lin2",
    ffn_norm="output_layer_norm",
)
ALBERT_LAYER = LayerMap(
    query="attention.query",
    key="attention.key",
    value="attention.value",
    out="attention.dense",
    attn_norm="attention.LayerNorm",
    ffn_in="ffn",
    activation="activation",
    ffn_out="ffn_output",
    ffn_norm="full_layer_layer_norm",
)
VIT_LAYER = LayerMap(
    query="attention.q_proj",
    key="attention.k_proj",
    value="attention.v_proj",
    out="attention.o_proj",
    attn_norm="layernorm_before",
    ffn_in="mlp.fc1",
    activation="mlp.activation_fn",
    ffn_out="mlp.fc2",
    ffn_norm="layernorm_after",
    norm_first=True,
)
WAV2VEC2_LAYER = LayerMap(
    query="attention.q_proj",
    key="attention.k_proj",
    value="attention.v_proj",
    out="attention.out_proj",
    attn_norm="layer_norm",
    ffn_in="feed_forward.intermediate_dense",
    activation="feed_forward.intermediate_act_fn",
    ffn_out="feed_forward.output_dense",
    ffn_norm="final_layer_norm",
)
BART_LAYER = LayerMap(
    query="self_attn.q_proj",
    key="self_attn.k_proj",
    value="self_attn.v_proj",
    out="self_attn.out_proj",
    attn_norm="self_attn_layer_norm",
    ffn_in="fc1",
    activation="activation_fn",
    ffn_out="fc2",
    ffn_norm="final_layer_norm",
)


def _albert_layers(stack: nn.Module, config) -> list[nn.Module]:
    """ALBERT shares layers: layer i runs group int(i / (layers / groups)), each group its inner layers in turn."""
    per_group = config.num_hidden_layers / config.num_hidden_groups
    groups = stack.albert_layer_groups
    return [layer for i in range(config.num_hidden_layers) for layer in groups[int(i / per_group)].albert_layers]


def _albert_prologue(stack: nn.Module, hidden: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """AlbertTransformer projects the (smaller) embeddings up to the hidden size before its layers."""
    return stack.embedding_hidden_mapping_in(hidden)


def _wav2vec2_positions(stack: nn.Module, hidden: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Wav2Vec2Encoder before its layers: zero the padded frames, add the convolutional position embedding."""
    if valid is not None:
        hidden = hidden.masked_fill(~valid.unsqueeze(-1), 0.0)
    return hidden + stack.pos_conv_embed(hidden)


def _wav2vec2_prologue(stack: nn.Module, hidden: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """The post-LN encoder normalises once more before its layers."""
    return stack.layer_norm(_wav2vec2_positions(stack, hidden, valid))


def _bert_pooler(base: nn.Module, hidden: torch.Tensor) -> torch.Tensor | None:
    return base.pooler(hidden) if getattr(base, "pooler", None) is not None else None


def _albert_pooler(base: nn.Module, hidden: torch.Tensor) -> torch.Tensor | None:
    return base.pooler_activation(base.pooler(hidden[:, 0])) if getattr(base, "pooler", None) is not None else None


def _final_norm(stack: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The pre-LN ("stable layer norm") encoder normalises after its last layer."""
    return stack.layer_norm(tokens)


_BERT_LIKE = Adapter(
    layer=BERT_LAYER,
    stack="encoder",
    num_heads="num_attention_heads",
    activation="hidden_act",
    output=BaseModelOutputWithPastAndCrossAttentions,
    front=True,
    embeddings="embeddings",
    pooler=_bert_pooler,
)
_WAV2VEC2 = Adapter(
    layer=WAV2VEC2_LAYER,
    stack="encoder",
    num_heads="num_attention_heads",
    activation="hidden_act",
    layers=lambda stack, config: list(stack.layers),
    prologue=_wav2vec2_prologue,
)
_WAV2VEC2_STABLE = replace(
    _WAV2VEC2,
    layer=replace(WAV2VEC2_LAYER, norm_first=True),
    prologue=_wav2vec2_positions,
    epilogue=_final_norm,
)
_BART = Adapter(
    layer=BART_LAYER,
    stack="encoder.layers",
    num_heads="encoder_attention_heads",
    activation="activation_function",
    output=None,
    per_layer=True,
)

ADAPTERS: dict[str, Adapter] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "camembert": _BERT_LIKE,
    "electra": replace(_BERT_LIKE, project="embeddings_project", pooler=None),  # (projects where embedding_size differs)
    "distilbert": Adapter(
        layer=DISTILBERT_LAYER, stack="transformer", num_heads="n_heads", activation="activation", front=True,
        embeddings="embeddings",
    ),
    "albert": Adapter(
        layer=ALBERT_LAYER,
        stack="encoder",
        num_heads="num_attention_heads",
        activation="hidden_act",
        layers=_albert_layers,
        prologue=_albert_prologue,  # a Linear: row by row
        front=True,
        embeddings="embeddings",
        pooler=_albert_pooler,
    ),
    "vit": Adapter(
        layer=VIT_LAYER,
        stack="layers",
        num_heads="num_attention_heads",
        activation="hidden_act",
        output=None,
        per_layer=True,
    ),
    "wav2vec2": _WAV2VEC2,
    "hubert": _WAV2VEC2,
    "bart": _BART,
    "mbart": replace(_BART, layer=replace(BART_LAYER, norm_first=True)),
    "marian": _BART,
}


def adapter_for(config) -> Adapter | None:
    """The adapter for this config, or None when its architecture has none."""
    adapter = ADAPTERS.get(config.model_type)
    if adapter is _WAV2VEC2 and getattr(config, "do_stable_layer_norm", False):
        return _WAV2VEC2_STABLE
    return adapter


def unsupported_feature(config) -> str | None:
    """A configuration feature of a supported architecture that the fast path does not reproduce, or None."""
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return "it is configured as a decoder (is_decoder / add_cross_attention)"
    if getattr(config, "adapter_attn_dim", None) is not None:
        return "it has attention adapter layers (adapter_attn_dim)"
    if getattr(config, "_attn_implementation", None) == "flex_attention":
        return "it runs flex_attention (block masks carry no padding mask the fast path can read)"
    return None
