"""The converted encoder stack: remove padding once, run every layer on real tokens, pad once.

`FastStack` is installed as the `forward` of the HF module that loops over the encoder layers (for example
`BertEncoder`), as an instance attribute. The module tree, the parameter names and the weights stay exactly
HF's, so `state_dict`, `save_pretrained`, `.to()`, optimizers and checkpoints see the original model; reverting
deletes the attribute. On every call the stack decides which path runs:

- the HF forward (SDPA with the padding mask, or whatever attention the model was loaded with) when the module is
  training, when autograd is needed, when `output_hidden_states` is asked for, when `auto` finds no padding to
  remove in a setting where that does not pay, or when the model's front (front.py) planned the call for HF;
- otherwise the fast path with the backend `policy.resolve` picks: "packed" (`layers.packed_layer`, as CUDA graphs
  where `LayerGraphs` says so) or "fused" (`layers.fused_layer` over nested tensors).

The front calls `layers_on` directly with tokens it packed and embedded itself.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lit_fast.errors import ConfigError
from lit_fast.fastpath.encoder import padding, policy
from lit_fast.fastpath.encoder.adapters import Adapter
from lit_fast.fastpath.encoder.layer_graphs import LayerGraphs
from lit_fast.fastpath.encoder.layers import VARLEN_DTYPES, LayerParts, fused_layer, packed_layer, varlen_attn
from lit_fast.fastpath.options import FastPathOptions

log = logging.getLogger(__name__)


class FastStack:
    """Replaces `owner.forward`; runs the owner's encoder layers on tokens without padding in inference."""

    def __init__(self, owner: nn.Module, adapter: Adapter, config, options: FastPathOptions) -> None:
        self.owner = owner
        self.adapter = adapter
        self.config = config
        self.options = options
        # packed layers on CUDA in fp16/bf16 as CUDA graphs: always (True), where they pay ("auto") or never (False)
        self.graphed = LayerGraphs(options) if options.cuda_graphs else None
        self.constants = layer_constants(adapter, config)
        self.fused_ok = policy.fused_unsupported(config, adapter, self.layer_parts()[0]) is None
        self.last_path: str | None = None  # what the latest call ran: a backend, or "hf: <why>"
        self._hf_reason_given: str | None = None  # set by the front while HF's forward runs a call it planned

    @property
    def backend(self) -> str:
        return self.options.backend

    def hf_forward(self, *args, **kwargs):
        """The owner's own HF forward (its class's method; the instance attribute is this object)."""
        return type(self.owner).forward(self.owner, *args, **kwargs)

    @contextmanager
    def running_hf(self, reason: str):
        """Inside the block, calls run the HF layers: the front planned this call and found them faster."""
        self._hf_reason_given = reason
        try:
            yield
        finally:
            self._hf_reason_given = None

    def __call__(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        if self._hf_reason_given is not None:
            self.last_path = f"hf: {self._hf_reason_given}"
            return self.hf_forward(*args, **kwargs)
        if self._wants(kwargs, "output_attentions"):
            raise ConfigError(
                "output_attentions=True cannot be served by the lit_fast fast path: its fused kernels never "
                "materialise attention weights. Call lit_fast.revert_fast_path(model) first (or set fast_path: off)."
            )
        reason = self._hf_reason(hidden, kwargs)
        if reason is not None:
            self.last_path = f"hf: {reason}"
            return self.hf_forward(*args, **kwargs)

        compute_dtype = torch.get_autocast_dtype(hidden.device.type) if _autocast_on(hidden) else hidden.dtype
        backend = policy.resolve(self.backend, hidden.device, compute_dtype, self.fused_ok)
        if backend is None:
            self.last_path = "hf: no backend measured faster on this device and dtype"
            return self.hf_forward(*args, **kwargs)
        batch, seq_len = hidden.shape[:2]
        layers = self.layer_parts()  # host work before plan() waits for the device, not after it
        valid = padding.valid_tokens(mask, batch, seq_len)
        packing = padding.plan(valid, batch, seq_len, hidden.device)
        norm_first = bool(layers) and layers[0].norm_first
        if self.backend == "auto" and not policy.pays_off(backend, hidden.device, packing.padding_fraction, norm_first):
            self.last_path = "hf: too little padding to remove for the fast path to pay off here"
            return self.hf_forward(*args, **kwargs)

        self.last_path = backend
        if self.adapter.prologue is not None:
            hidden = self.adapter.prologue(self.owner, hidden, valid)
        tokens = self.layers_on(padding.pack(hidden, packing), packing, backend, layers)
        out = padding.unpack(tokens, packing)
        return out if self.adapter.output is None else self.adapter.output(last_hidden_state=out)

    def layers_on(self, tokens: torch.Tensor, packing: padding.Packing, backend: str, layers: Iterable[LayerParts],
                  first_qkv: torch.Tensor | None = None) -> torch.Tensor:
        """The layers, then the adapter's epilogue, over packed tokens: (tokens, hidden) -> (tokens, hidden). `layers`
        may be `iter_parts()`. `first_qkv`: the first layer's q/k/v projection of `tokens`, computed ahead by the
        front (used where the layers run eagerly)."""
        if backend == "packed" and self._graphs_apply(tokens) and self.graphed.wants(packing, tokens.dtype):
            tokens = self._run_graphed(tokens, packing, layers)
        elif backend == "packed":
            for parts in layers:
                tokens, first_qkv = packed_layer(tokens, parts, packing, self.options, first_qkv), None
        else:
            tokens = self._run_fused(tokens, packing, layers)
        if self.adapter.epilogue is not None:
            tokens = self.adapter.epilogue(self.owner, tokens)
        return tokens

    def _run_fused(self, tokens: torch.Tensor, packing: padding.Packing,
                   layers: Iterable[LayerParts]) -> torch.Tensor:
        """Layers through the fused kernel: nested tensors when padded, the dense batch when not."""
        use_gelu = getattr(self.config, self.adapter.activation) == "gelu"
        if not packing.padded:
            x = tokens.reshape(packing.batch, packing.seq_len, -1)
            for parts in layers:
                x = fused_layer(x, parts, use_gelu)
            return x.reshape(tokens.shape[0], -1)
        x = padding.to_nested(tokens, packing)
        for parts in layers:
            x = fused_layer(x, parts, use_gelu)
        return padding.from_nested(x)

    def _graphs_apply(self, tokens: torch.Tensor) -> bool:
        """CUDA graphs cover the varlen path (CUDA, fp16/bf16) on the current device (where graphs are captured and
        replayed), outside anyone else's graph capture."""
        return (
            self.graphed is not None
            and tokens.is_cuda
            and tokens.dtype in VARLEN_DTYPES
            and varlen_attn is not None
            and tokens.device.index == torch.cuda.current_device()
            and not torch.cuda.is_current_stream_capturing()
        )

    def _run_graphed(self, tokens: torch.Tensor, packing: padding.Packing,
                     layers: Iterable[LayerParts]) -> torch.Tensor:
        resolved: list[LayerParts] = []

        def resolve() -> list[LayerParts]:  # the layers, looked up once (the graphs may want them after a replay)
            if not resolved:
                resolved.extend(layers)
            return resolved

        try:
            # unpacking a padded batch copies the result anyway, before any other replay
            copy_out = not packing.padded or self.adapter.epilogue is not None
            out = self.graphed(tokens, packing, resolve, copy_out)
            if out is not None:
                return out
        except RuntimeError as failure:  # a capture this torch/driver cannot do: keep going without graphs
            log.warning("fast path: CUDA graph capture failed (%s); running the packed layers without graphs",
                        failure)
            self.graphed = None
        for parts in resolve():  # without graphs (auto mode declined the batch, or the capture failed)
            tokens = packed_layer(tokens, parts, packing, self.options)
        return tokens

    def layer_parts(self) -> list[LayerParts]:
        """The HF modules of every layer in the order they run, looked up now (never a stale reference)."""
        return list(self.iter_parts())

    def iter_parts(self, first: LayerParts | None = None) -> Iterator[LayerParts]:
        """`layer_parts`, each layer looked up as it is reached: a loop that launches a layer's kernels before it
        looks up the next one keeps the lookups (~10 us a layer) off the path to the first kernel. `first`: the
        first layer's parts, looked up by `first_parts` earlier in the same call (not looked up again)."""
        layers = [self.owner] if self.adapter.per_layer else self.adapter.layers(self.owner, self.config)
        for index, layer in enumerate(layers):
            yield first if index == 0 and first is not None else resolve_parts(layer, self.adapter, self.config,
                                                                                self.constants)

    def first_parts(self) -> LayerParts | None:
        """The first layer's modules (what the front reads the dtype and the norm placement from), or None."""
        return next(self.iter_parts(), None)

    def _hf_reason(self, hidden: torch.Tensor, kwargs: dict) -> str | None:
        """Why this call must run the HF forward, or None when the fast path may run."""
        if self.owner.training:
            return "training mode (dropout, SDPA with the padding mask)"
        if torch.is_grad_enabled() and (hidden.requires_grad or _any_requires_grad(self.owner)):
            return "autograd is on and something requires grad"
        if self._wants(kwargs, "output_hidden_states"):
            return "output_hidden_states was asked for (the HF layers record them)"
        return None

    def _wants(self, kwargs: dict, flag: str) -> bool:
        """Whether the call (or the config, by default) asks for `flag`."""
        value = kwargs.get(flag)
        return bool(getattr(self.config, flag, False) if value is None else value)


PART_NAMES = ("query", "key", "value", "out", "attn_norm", "ffn_in", "ffn_out", "ffn_norm")


def layer_constants(adapter: Adapter, config) -> tuple[int, bool]:
    """(heads, whether the activation is exact GELU): what `resolve_parts` reads from the config. The model's modules
    were built from these values, so a stack reads them once (a transformers config attribute costs microseconds)."""
    return getattr(config, adapter.num_heads), getattr(config, adapter.activation, None) == "gelu"


def resolve_parts(layer: nn.Module, adapter: Adapter, config, constants: tuple[int, bool] | None = None) -> LayerParts:
    """A layer's modules by the adapter's map; checks they are the plain modules the fast path reads.

    This runs on every forward, before the device has work queued (the GPU idles meanwhile), so it walks the
    modules' `_modules` dicts directly: `get_submodule` cost ~35 us a layer on the 2-core machine.
    """
    paths = adapter.layer
    found = {}
    for name in PART_NAMES:
        module = _child(layer, _split(getattr(paths, name)))
        expected = nn.LayerNorm if name.endswith("norm") else nn.Linear
        if type(module) is not expected:
            raise policy.unsupported_module(layer, getattr(paths, name), module, expected)
        found[name] = module
    activation = functools.reduce(getattr, _split(paths.activation), layer)  # a module or a plain function
    num_heads, exact_gelu = constants if constants is not None else layer_constants(adapter, config)
    return LayerParts(activation=activation, num_heads=num_heads, norm_first=paths.norm_first, exact_gelu=exact_gelu,
                      **found)


@functools.lru_cache(maxsize=None)
def _split(path: str) -> tuple[str, ...]:
    return tuple(path.split("."))


def _child(module: nn.Module, names: tuple[str, ...]) -> nn.Module:
    """`module.get_submodule(".".join(names))`, by dict lookups (falls back to getattr for anything unusual)."""
    for name in names:
        children = module._modules
        module = children[name] if name in children else getattr(module, name)
    return module


def _any_requires_grad(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _autocast_on(hidden: torch.Tensor) -> bool:
    return torch.is_autocast_enabled(hidden.device.type)
