"""The front of a converted text encoder: the base model's forward, on the real tokens only.

A BERT-family base model embeds the padded grid, builds a 4-D attention mask (transformers' SDPA variant waits for
the device to learn whether anything is padded), runs its stack and pools. `FastFront` is installed as the base
model's `forward` (an instance attribute, like `FastStack`) and, for a call it takes, does those steps itself:

1. plan: where the real tokens are, from the 2-D mask, before any kernel is queued - the batch's one wait. The same
   wait brings back the range of the token ids, which are then checked on the host;
2. embed: only the real tokens, straight into the packed matrix (`EmbeddingInputs`: one Triton kernel on CUDA, HF's
   own op order elsewhere), then the adapter's projection (ELECTRA) and the stack's prologue (ALBERT), row by row;
3. layers: the stack's layers on the packed tokens (`FastStack.layers_on`);
4. finish: unpack, pool as the adapter says, and return the output class the base model's forward declares.

A call it does not take - training, autograd, hidden states or attentions asked for, `inputs_embeds`, a cache,
anything else it does not know - runs HF's own forward, whose stack is converted too and plans for itself. Where the
plan finds too little padding for the fast path to pay, HF's forward runs with the stack told to run the HF layers
(`FastStack.running_hf`), so that the batch is not planned twice.
"""

from __future__ import annotations

import inspect
import re
import typing
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import modeling_outputs
from transformers.utils import ModelOutput

from lit_fast.errors import UnsupportedModelError
from lit_fast.fastpath.encoder import layers, padding, policy, rows
from lit_fast.fastpath.encoder.embeddings import EmbeddingInputs, raise_if_out_of_range
from lit_fast.fastpath.encoder.front_graphs import LIMITS as GRAPH_LIMITS, FrontGraphs
from lit_fast.fastpath.encoder.layer_graphs import bucket_tokens
from lit_fast.fastpath.options import FastPathOptions

# Arguments of a base model's forward the front serves; any other argument must be None (or False).
_SERVED = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "return_dict", "use_cache")


@dataclass
class Planned:
    """What the front's plan decided for one call."""

    backend: str | None  # the fast-path backend, or None: HF runs the call (`reason` says why)
    reason: str | None
    packing: padding.Packing | None = None
    tokens: torch.Tensor | None = None  # the packed embeddings
    first_qkv: torch.Tensor | None = None  # the first layer's q/k/v projection of `tokens`, made ahead
    first: layers.LayerParts | None = None  # the first layer, looked up before the wait


class FastFront:
    """Replaces `owner.forward` (the base model's); see the module docstring."""

    def __init__(self, owner: nn.Module, stack, embeddings: nn.Module, options: FastPathOptions) -> None:
        self.owner = owner
        self.stack = stack  # the FastStack of this model's encoder stack
        self.embeddings = embeddings
        self.options = options
        self.adapter = stack.adapter
        self.names = _parameter_names(type(owner).forward)
        self.output_class = _declared_output(type(owner).forward)
        self.project = getattr(owner, self.adapter.project, None) if self.adapter.project else None
        self.copy = rows.HostCopy()  # the plan's way to the host, reused from call to call
        self.graphs = FrontGraphs()  # the steps before the wait as CUDA graphs (with the stack's cuda_graphs)
        # positions counted from the ids (RoBERTa family) need a range check on the device: no graphs for those
        self.graphable = not hasattr(embeddings, "create_position_ids_from_input_ids")

    def hf_forward(self, *args, **kwargs):
        return type(self.owner).forward(self.owner, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        named = dict(zip(self.names, args))
        named.update(kwargs)
        if not self._takes(named):
            return self.hf_forward(*args, **kwargs)
        planned = self._plan(named)
        if planned is None:
            return self.hf_forward(*args, **kwargs)
        if planned.backend is None:
            with self.stack.running_hf(planned.reason):
                return self.hf_forward(*args, **kwargs)
        tokens = planned.tokens
        if self.project is not None:
            tokens = self.project(tokens)
        if self.adapter.prologue is not None:  # row by row (adapters.Adapter.front says so)
            tokens = self.adapter.prologue(self.stack.owner, tokens, None)
        tokens = self.stack.layers_on(tokens, planned.packing, planned.backend, self.stack.iter_parts(planned.first),
                                      planned.first_qkv)
        self.stack.last_path = planned.backend
        return self._finish(padding.unpack(tokens, planned.packing), named)

    def _takes(self, named: dict) -> bool:
        """Whether the front serves this call (else HF's forward runs it)."""
        mask, ids = named.get("attention_mask"), named.get("input_ids")
        if not isinstance(mask, torch.Tensor) or not isinstance(ids, torch.Tensor):
            return False
        if mask.dim() != 2 or mask.shape != ids.shape or mask.numel() == 0:
            return False
        if any(value is not None and value is not False for name, value in named.items() if name not in _SERVED):
            return False  # inputs_embeds, a cache, hidden states or attentions asked for, anything unknown
        if any(getattr(self.owner.config, flag, False) and named.get(flag) is None
               for flag in ("output_hidden_states", "output_attentions")):
            return False
        if self.owner.training or self.stack.owner.training:
            return False
        return not (torch.is_grad_enabled() and any(p.requires_grad for p in self.owner.parameters()))

    def _plan(self, named: dict) -> Planned | None:
        """Plan the packing, embed the real tokens and check their ids; None where no backend beats HF here."""
        mask, ids = named["attention_mask"], named["input_ids"]
        stack = self.stack
        # A graph of the steps before the wait replays first, so that the GPU runs it while the host checks the rest
        # (should the checks decide against the fast path, its result is simply not used).
        graph_key = self._graph_key(named, mask, ids)
        replayed = self.graphs.replay(graph_key, self.embeddings) if graph_key is not None else None
        device = mask.device
        first_layer = stack.first_parts()  # the others are looked up as the layers run, after the first GEMM
        dtype = first_layer.query.weight.dtype if first_layer is not None else torch.float32
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        backend = policy.resolve(self.options.backend, device, dtype, stack.fused_ok)
        if backend is None:
            return None
        batch, seq_len = mask.shape
        inputs, limits, packing, ahead, qkv = None, None, None, None, None
        if self.options.row_plan and rows.row_plan_fits(mask, ids):  # CUDA: one kernel, one wait
            plan, values, inputs, limits, ahead, qkv = self._plan_rows(
                named, mask, ids, batch, seq_len, graph_key, replayed,
                first_layer if graph_key is not None and self._qkv_ahead_applies(first_layer, backend) else None)
            packing = padding.finish_rows(plan, values, batch, seq_len, True)
        if inputs is None and (packing is None or ahead is None):
            inputs = self._embedding_inputs(named, batch, seq_len)
        if packing is None:  # elsewhere, or rows with holes in the mask (`ahead` is then thrown away)
            ahead = None
            valid = padding.valid_tokens(mask, batch, seq_len)
            packing = padding.plan(valid, batch, seq_len, device, inputs.checks(with_ids=True))
        if inputs is not None:
            limits = inputs.limits
        if graph_key is not None and replayed is None:  # for the capture: will the layers then run eagerly?
            self.graphs.tokens[graph_key] = packing.num_tokens
        raise_if_out_of_range(self.embeddings, limits, packing.checks)
        norm_first = first_layer is not None and first_layer.norm_first
        if self.options.backend == "auto" and not policy.pays_off(backend, device, packing.padding_fraction,
                                                                  norm_first):
            return Planned(None, "too little padding to remove for the fast path to pay off here")
        count = packing.num_tokens
        tokens = ahead[:count] if ahead is not None else inputs.embed(packing)
        first_qkv = None if qkv is None or ahead is None else _first_qkv(qkv, ahead, count, first_layer)
        return Planned(backend, None, packing, tokens, first_qkv, first_layer)

    def _finish(self, hidden: torch.Tensor, named: dict) -> Any:
        """What the base model's forward returns: its declared output class (a tuple for return_dict=False)."""
        fields = {"last_hidden_state": hidden}
        if self.adapter.pooler is not None:
            pooled = self.adapter.pooler(self.owner, hidden)
            if pooled is not None:
                fields["pooler_output"] = pooled
        out = self.output_class(**fields)
        return_dict = named.get("return_dict")
        if return_dict is None:
            return_dict = getattr(self.owner.config, "return_dict", True)
        return out if return_dict else out.to_tuple()

    def _graph_key(self, named: dict, mask: torch.Tensor, ids: torch.Tensor) -> tuple | None:
        """The key of this call's front graph (front_graphs.py), or None where graphs do not apply: they cover the
        embeddings from the module's own position and token type buffers, on CUDA, with the stack's cuda_graphs."""
        if (not mask.is_cuda or not self.graphable or self.graphs.stopped or self.stack.graphed is None
                or named.get("token_type_ids") is not None or named.get("position_ids") is not None):
            return None
        return self.graphs.key(mask, ids)

    def _qkv_ahead_applies(self, first: layers.LayerParts | None, backend: str) -> bool:
        """Whether the first layer's fused q/k/v GEMM may run in the front's graph: packed layers that start with it
        (post-LN, no projection or prologue), outside autograd and autocast."""
        options = self.options
        return (options.qkv_ahead and options.fuse_qkv and backend == "packed" and first is not None
                and not first.norm_first and self.project is None and self.adapter.prologue is None
                and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cuda"))

    def _plan_rows(self, named: dict, mask: torch.Tensor, ids: torch.Tensor, batch: int, seq_len: int,
                   graph_key: tuple | None, replayed: tuple | None, qkv_layer: layers.LayerParts | None) -> tuple:
        """The row plan (rows.row_plan) and its values on the host (the batch's one wait), with the embeddings queued
        ahead of that wait: (plan, values, EmbeddingInputs or None, their limits, embeddings or None, q/k/v or
        None). From the CUDA graph `replayed` (FrontGraphs.replay) when there is one, or captured now for
        `graph_key` when it is due (the inputs are then None). `qkv_layer`: the first layer, where its q/k/v
        projection may be computed in the graph (`_qkv_ahead_applies`); the result comes back only if it was made
        from that layer's current q/k/v weights (a stale one drops the graph)."""
        if replayed is None and graph_key is not None and self.graphs.wants(graph_key):
            replayed = self._capture(graph_key, named, mask, ids, batch, seq_len, qkv_layer)
        if replayed is not None:
            entry, fresh = replayed
            qkv = (entry.qkv, entry.qkv_rows) if fresh and qkv_layer is not None and entry.qkv is not None else None
            if qkv is not None and layers.qkv_key(qkv_layer) != entry.qkv_key:
                qkv = None
                self.graphs.drop(graph_key)  # q/k/v changed since the capture: capture again
            return entry.plan, entry.copy.tolist(), None, entry.limits, entry.ahead if fresh else None, qkv
        inputs = self._embedding_inputs(named, batch, seq_len)
        checks = inputs.checks(with_ids=False)
        if checks is None:  # the plan kernel sends its values to the host itself
            plan = rows.row_plan(mask, ids, self.copy)
        else:
            plan = rows.row_plan(mask, ids)
            self.copy.start(rows.with_checks(plan, checks))
        # queued behind the plan, so the GPU has it to do while the host waits and plans on
        ahead = inputs.embed_ahead(plan)
        return plan, self.copy.tolist(), inputs, inputs.limits, ahead, None

    def _capture(self, key: tuple, named: dict, mask: torch.Tensor, ids: torch.Tensor, batch: int, seq_len: int,
                 qkv_layer: layers.LayerParts | None):
        """Capture the plan, the embeddings and (`qkv_layer`) that layer's q/k/v projection of them for `key`, and
        replay them: what `FrontGraphs.replay` returns, or None (the eager steps then run)."""
        inputs = self._embedding_inputs(named, batch, seq_len)
        if inputs.ranges or not inputs.ahead_fits():
            return None
        seen = self.graphs.tokens.get(key, 0)  # the real tokens of this key's previous call
        graphed = self.stack.graphed  # layers that replay a graph of their own would not use the q/k/v
        if qkv_layer is not None and graphed is not None and graphed.will_replay(seen):
            qkv_layer = None
        qkv_key = layers.qkv_key(qkv_layer) if qkv_layer is not None else None
        weights = layers.fused_qkv(qkv_layer) if qkv_key is not None else None  # None: no version counters
        word = self.embeddings.word_embeddings.weight
        width = word.shape[1] + (weights[0].shape[0] if weights is not None else 0)
        if weights is not None and batch * seq_len * width * word.element_size() > GRAPH_LIMITS.max_bytes // 2:
            weights, width = None, word.shape[1]
        qkv_rows = min(batch * seq_len, bucket_tokens(seen)) if seen else batch * seq_len

        def queue(copy: rows.HostCopy) -> tuple:
            plan = rows.row_plan(mask, ids, copy, spread=True)
            ahead = inputs.embed_ahead(plan)
            if weights is None:
                return plan, ahead, None
            qkv = ahead.new_empty(ahead.shape[0], weights[0].shape[0])  # every row: room for a longer call's
            layers.matmul_into(qkv[:qkv_rows], ahead[:qkv_rows], *weights)
            return plan, ahead, qkv

        keep = tuple(t for t in weights if t is not None) if weights is not None else ()
        nbytes = batch * seq_len * width * word.element_size()
        if self.graphs.capture(key, self.embeddings, rows.plan_size(batch), inputs.limits, queue, mask.device,
                               nbytes, qkv_key, keep, qkv_rows) is None:
            return None
        return self.graphs.replay(key, self.embeddings)

    def _embedding_inputs(self, named: dict, batch: int, seq_len: int) -> EmbeddingInputs:
        return EmbeddingInputs.of(self.embeddings, named["input_ids"], named.get("token_type_ids"),
                                  named.get("position_ids"), batch, seq_len, kernel=self.options.embed_kernel)


def _first_qkv(qkv: tuple[torch.Tensor, int], ahead: torch.Tensor, count: int, first: layers.LayerParts
               ) -> torch.Tensor:
    """The first layer's q/k/v projection of the `count` real tokens from the front graph's (buffer, rows it
    projected): a call with more real tokens than that projects the rest now, into the same buffer."""
    buffer, done = qkv
    if count > done:
        layers.matmul_into(buffer[done:count], ahead[done:count], *layers.fused_qkv(first))
    return buffer[:count]


def _parameter_names(forward) -> list[str]:
    """The names `forward` binds positional arguments to (after `self`)."""
    return [name for name, p in inspect.signature(forward).parameters.items()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]


def _declared_output(forward) -> type:
    """The ModelOutput class a base model's forward declares it returns (`-> tuple | BaseModelOutput...`)."""
    while hasattr(forward, "__wrapped__"):
        forward = forward.__wrapped__
    try:
        declared = typing.get_type_hints(forward).get("return")
        candidates = typing.get_args(declared) or (declared,)
    except Exception:  # noqa: BLE001 - an annotation this transformers version cannot evaluate: read its names
        text = str(getattr(forward, "__annotations__", {}).get("return", ""))
        scope = {**vars(modeling_outputs), **getattr(forward, "__globals__", {})}
        candidates = tuple(scope.get(name) for name in re.findall(r"\b(\w+Output\w*)\b", text))
    found = [t for t in candidates if isinstance(t, type) and issubclass(t, ModelOutput)]
    if len(found) != 1:
        raise UnsupportedModelError(f"{forward.__qualname__} declares no single ModelOutput return type; run this "
                                    "model without the fast path's front (FastPathOptions(front=False))")
    return found[0]
