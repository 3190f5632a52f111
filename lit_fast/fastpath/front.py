"""The front of a converted text encoder: one plan before the embeddings, no HF mask, embeddings of real tokens.

A BERT-family base model runs three steps before its layers: the embeddings over the padded grid, a 4-D attention
mask built from the 2-D one (transformers' `create_bidirectional_mask`, whose SDPA variant waits for the device to
learn whether anything is padded), then the stack. With only the stack converted, every batch made the GPU idle
through two host waits (HF's and the stack's own `padding.plan`) and embedded padding it then threw away.

`FastFront` is installed as the `forward` of the base model (an instance attribute, like `FastStack`). On a call
the fast path will serve it

1. plans the packing from the 2-D mask before any kernel is queued: the batch's one wait, while the GPU is idle
   anyway. The same wait brings back the range of the token ids, which are then checked on the host;
2. embeds only the real tokens, straight into the packed matrix (`packed_embeddings`: one Triton kernel on CUDA,
   HF's own op order elsewhere);
3. calls the HF forward with the mask as a `(batch, 1, 1, seq_len)` bool view: transformers passes a 4-D mask on
   as it is, so it builds nothing and waits for nothing.

`FastEmbeddings`, installed on the embeddings module, then returns a placeholder instead of padded embeddings, and
the stack, seeing the placeholder and the mask view, runs its layers on the front's packed tokens. Anything that
does not line up (other arguments reaching the embeddings, a module in between that transforms their output)
falls back step by step: the HF embeddings run and the stack packs them with the front's plan; where the stack
must run the HF layers, it rebuilds HF's own mask first.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from lit_fast.fastpath import front_graphs, layers, padding, policy, rows
from lit_fast.fastpath.embeddings import EmbeddingInputs, raise_if_out_of_range
from lit_fast.fastpath.front_graphs import FrontGraphs
from lit_fast.fastpath.graphs import bucket_tokens

try:  # transformers >= 5: the mask the HF layers expect, for the rare call that falls back to them
    from transformers.masking_utils import create_bidirectional_mask
except ImportError:  # pragma: no cover - older transformers
    create_bidirectional_mask = None


# Switches for benchmarks (bench/w1_profile.py); leave them on. FRONT off: the stack plans alone, as before the
# front existed; PACKED_EMBEDDINGS off: the front plans but the HF embeddings run on the padded grid.
FRONT = True
PACKED_EMBEDDINGS = True
# ROW_PLAN: on CUDA, plan rows of one run each in one Triton kernel (rows.py) instead of padding.plan's ~10 launches.
ROW_PLAN = True
# The front runs the layers on its packed embeddings before calling the HF forward, so that the GPU starts on them
# while the host is still in HF's Python (the stack then returns the result). Off: the stack runs them when HF
# calls it. A switch for benchmarks; leave it on.
EARLY_LAYERS = True
# In the front's CUDA graph, the first layer's q/k/v GEMM, queued before the host knows the token count, over as many
# rows of the embeddings as the key's previous call had real tokens, rounded up to a bucket (graphs.bucket_tokens);
# a call with more projects the rest after the wait (`_first_qkv`). It keeps the GPU busy through the host's steps
# between the plan and the first GEMM. Only where the layers run eagerly (judged by the key's latest token count;
# layers replaying their own graph would not use it). A benchmark switch.
FIRST_QKV_AHEAD = True


@dataclass
class FrontCall:
    """What the front decided for one forward call, read by the embeddings and the stack inside it."""

    backend: str | None  # the fast-path backend, or None: the HF forward runs (`hf_reason` says why)
    hf_reason: str | None
    mask2d: torch.Tensor
    mask4d: torch.Tensor | None  # the 4-D view handed to HF instead of the 2-D mask (None: not swapped)
    valid: torch.Tensor | None  # the bool mask, where the plan made one (None after `padding.plan_rows`)
    packing: padding.Packing | None
    inputs: tuple | None = None  # (input_ids, token_type_ids, position_ids) the packed embeddings were made from
    tokens: torch.Tensor | None = None  # the packed embeddings
    placeholder: torch.Tensor | None = None  # what FastEmbeddings returned in their place
    output: torch.Tensor | None = None  # the stack's padded output, computed from `tokens` ahead of the HF forward


class FastFront:
    """Replaces `owner.forward` (the base model's); see the module docstring."""

    def __init__(self, owner: nn.Module, stack, embeddings: nn.Module | None) -> None:
        self.owner = owner
        self.stack = stack  # the FastStack of this model's encoder stack
        self.embeddings = embeddings  # the module whose output can be made on packed tokens, or None
        self.names = _parameter_names(type(owner).forward)
        self.call: FrontCall | None = None
        self._nan: dict[tuple, torch.Tensor] = {}
        self.copy = rows.HostCopy()  # the plan's way to the host, reused from call to call
        self.graphs = FrontGraphs()  # the steps before the wait as CUDA graphs (with the stack's cuda_graphs)
        # positions counted from the ids (RoBERTa family) need a range check on the device: no graphs for those
        self.graphable = embeddings is not None and not hasattr(embeddings, "create_position_ids_from_input_ids")
        stack.front = self

    def hf_forward(self, *args, **kwargs):
        return type(self.owner).forward(self.owner, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        if self.call is not None or not FRONT:  # re-entered (the HF forward calling itself): nothing to plan
            return self.hf_forward(*args, **kwargs)
        named = dict(zip(self.names, args))
        named.update(kwargs)
        call = self._prepare(named)
        if call is None:
            return self.hf_forward(*args, **kwargs)
        if call.mask4d is not None:
            args, kwargs = _replaced(args, kwargs, self.names, "attention_mask", call.mask4d)
        self.call = call
        try:
            return self.hf_forward(*args, **kwargs)
        finally:
            self.call = None

    def _prepare(self, named: dict) -> FrontCall | None:
        """Plan the call when the fast path will serve it; None leaves everything to HF and the stack."""
        mask, ids, embeds = named.get("attention_mask"), named.get("input_ids"), named.get("inputs_embeds")
        first = ids if ids is not None else embeds
        if (not isinstance(mask, torch.Tensor) or mask.dim() != 2 or first is None or mask.shape != first.shape[:2]
                or mask.numel() == 0):
            return None
        if named.get("past_key_values") is not None or named.get("cache") is not None:
            return None
        stack = self.stack
        if self.owner.training or stack.owner.training:
            return None  # the stack serves this itself
        # A graph of the steps before the wait replays first, so that the GPU runs it while the host checks the rest
        # (should the checks decide against the fast path, its result is simply not used).
        graph_key = self._graph_key(named, mask, ids, embeds)
        replayed = self.graphs.replay(graph_key, self.embeddings) if graph_key is not None else None
        if any(stack._wants(named, flag) for flag in ("output_hidden_states", "output_attentions")):
            return None  # the stack serves or refuses these itself
        if torch.is_grad_enabled() and ((embeds is not None and embeds.requires_grad)
                                        or any(p.requires_grad for p in self.owner.parameters())):
            return None
        device = mask.device
        first_layer = stack.first_parts()  # the others are looked up as the layers run, after the first GEMM
        dtype = first_layer.query.weight.dtype if first_layer is not None else torch.float32
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        backend = policy.resolve(stack.backend, device, dtype, stack.fused_ok)
        if backend is None:
            return None
        batch, seq_len = mask.shape
        embed_here = embeds is None and self.embeddings is not None and PACKED_EMBEDDINGS
        inputs, limits, packing, valid, ahead, qkv = None, None, None, None, None, None
        if ROW_PLAN and rows.row_plan_fits(mask, ids):  # CUDA: one kernel, one wait
            plan, values, inputs, limits, ahead, qkv = self._plan_rows(
                named, mask, ids, embed_here, batch, seq_len, graph_key, replayed,
                first_layer if graph_key is not None and self._qkv_ahead_applies(first_layer, backend) else None)
            packing = padding.finish_rows(plan, values, batch, seq_len, embed_here)
        if embed_here and inputs is None and (packing is None or ahead is None):
            inputs = self._embedding_inputs(named, batch, seq_len)
        if packing is None:  # elsewhere, or rows with holes in the mask (`ahead` is then thrown away)
            ahead = None
            valid = padding.valid_tokens(mask, batch, seq_len)
            packing = padding.plan(valid, batch, seq_len, device,
                                   inputs.checks(with_ids=True) if inputs is not None else None)
        if inputs is not None:
            limits = inputs.limits
        if graph_key is not None and replayed is None:  # for the capture: will the layers then run eagerly?
            self.graphs.tokens[graph_key] = packing.num_tokens
        if embed_here:
            raise_if_out_of_range(self.embeddings, limits, packing.checks)
        norm_first = first_layer is not None and first_layer.norm_first
        if stack.backend == "auto" and not policy.pays_off(backend, device, packing.padding_fraction, norm_first):
            reason = "too little padding to remove for the fast path to pay off here"
            return FrontCall(None, reason, mask, None, valid, packing)
        call = FrontCall(backend, None, mask, None, valid, packing)
        if embed_here:
            call.inputs = (ids, named.get("token_type_ids"), named.get("position_ids"))
            count = packing.num_tokens
            call.tokens = ahead[:count] if ahead is not None else inputs.embed(packing)
            if EARLY_LAYERS:
                first_qkv = None if qkv is None or ahead is None else _first_qkv(qkv, ahead, count, first_layer)
                call.output = stack.run(None, valid, packing, backend, stack.iter_parts(first_layer), call.tokens,
                                        first_qkv)
        # HF passes a 4-D mask on as it is; the stack knows this view by identity and never reads its values
        call.mask4d = mask[:, None, None, :]
        return call

    def _graph_key(self, named: dict, mask: torch.Tensor, ids: torch.Tensor | None, embeds) -> tuple | None:
        """The key of this call's front graph (front_graphs.py), or None where graphs do not apply: they cover the
        embeddings from the module's own position and token type buffers, on CUDA, with the stack's cuda_graphs."""
        if (ids is None or embeds is not None or not mask.is_cuda or not self.graphable or not PACKED_EMBEDDINGS
                or self.graphs.stopped or self.stack.graphed is None or named.get("token_type_ids") is not None
                or named.get("position_ids") is not None):
            return None
        return self.graphs.key(mask, ids)

    def _qkv_ahead_applies(self, first: layers.LayerParts | None, backend: str) -> bool:
        """Whether the first layer's fused q/k/v GEMM may run in the front's graph (FIRST_QKV_AHEAD): packed layers
        that start with it (post-LN, no prologue), outside autograd and autocast."""
        return (FIRST_QKV_AHEAD and backend == "packed" and first is not None and not first.norm_first
                and self.stack.adapter.prologue is None and layers.FUSE_QKV and not torch.is_grad_enabled()
                and not torch.is_autocast_enabled("cuda"))

    def _plan_rows(self, named: dict, mask: torch.Tensor, ids: torch.Tensor | None, embed_here: bool, batch: int,
                   seq_len: int, graph_key: tuple | None, replayed: tuple | None,
                   qkv_layer: layers.LayerParts | None) -> tuple:
        """The row plan (rows.row_plan) and its values on the host (the batch's one wait), with `embed_here` the
        embeddings queued ahead of that wait: (plan, values, EmbeddingInputs or None, their limits, embeddings or
        None, q/k/v or None). From the CUDA graph `replayed` (FrontGraphs.replay) when there is one, or captured now
        for `graph_key` when it is due (the inputs are then None). `qkv_layer`: the first layer, where its q/k/v
        projection may be computed in the graph (`_qkv_ahead_applies`); the result comes back only if it was made
        from that layer's current q/k/v weights (a stale one drops the graph)."""
        if replayed is None and graph_key is not None and embed_here and self.graphs.wants(graph_key):
            replayed = self._capture(graph_key, named, mask, ids, batch, seq_len, qkv_layer)
        if replayed is not None:
            entry, fresh = replayed
            qkv = (entry.qkv, entry.qkv_rows) if fresh and qkv_layer is not None and entry.qkv is not None else None
            if qkv is not None and layers.qkv_key(qkv_layer) != entry.qkv_key:
                qkv = None
                self.graphs.drop(graph_key)  # q/k/v changed since the capture: capture again
            return entry.plan, entry.copy.tolist(), None, entry.limits, entry.ahead if fresh else None, qkv
        inputs = self._embedding_inputs(named, batch, seq_len) if embed_here else None
        checks = inputs.checks(with_ids=False) if inputs is not None else None
        if checks is None:  # the plan kernel sends its values to the host itself
            plan = rows.row_plan(mask, ids if embed_here else None, self.copy)
        else:
            plan = rows.row_plan(mask, ids)
            self.copy.start(rows.with_checks(plan, checks))
        # queued behind the plan, so the GPU has it to do while the host waits and plans on
        ahead = inputs.embed_ahead(plan) if inputs is not None else None
        return plan, self.copy.tolist(), inputs, inputs.limits if inputs is not None else None, ahead, None

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
        if weights is not None:
            word = self.embeddings.word_embeddings.weight
            rows_bytes = batch * seq_len * (word.shape[1] + weights[0].shape[0]) * word.element_size()
            weights = weights if rows_bytes <= front_graphs.MAX_BYTES // 2 else None
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
        if self.graphs.capture(key, self.embeddings, rows.plan_size(batch), inputs.limits, queue, mask.device,
                               qkv_key, keep, qkv_rows) is None:
            return None
        return self.graphs.replay(key, self.embeddings)

    def _embedding_inputs(self, named: dict, batch: int, seq_len: int) -> EmbeddingInputs | None:
        if self.embeddings is None or not PACKED_EMBEDDINGS:
            return None
        return EmbeddingInputs.of(self.embeddings, named["input_ids"], named.get("token_type_ids"),
                                  named.get("position_ids"), batch, seq_len)

    def placeholder(self, call: FrontCall, batch: int, seq_len: int) -> torch.Tensor:
        """A `(batch, seq_len, width)` tensor of NaN that holds no memory: anything that computes with it shows."""
        tokens = call.tokens
        key = (tokens.device, tokens.dtype)
        if key not in self._nan:
            self._nan[key] = torch.full((), float("nan"), device=tokens.device, dtype=tokens.dtype)
        return self._nan[key].expand(batch, seq_len, tokens.shape[-1])


class FastEmbeddings:
    """Replaces `owner.forward` (the embeddings module's): hands back a placeholder when the front embedded the
    call's tokens itself, else runs the HF embeddings."""

    def __init__(self, owner: nn.Module, front: FastFront) -> None:
        self.owner = owner
        self.front = front
        self.names = _parameter_names(type(owner).forward)

    def __call__(self, *args, **kwargs):
        call = self.front.call
        if call is not None and call.tokens is not None and call.placeholder is None:
            named = dict(zip(self.names, args))
            named.update(kwargs)
            ids, types, positions = call.inputs
            if (named.get("input_ids") is ids and named.get("inputs_embeds") is None
                    and named.get("token_type_ids") is types and named.get("position_ids") is positions
                    and not named.get("cache_length") and not named.get("past_key_values_length")):
                call.placeholder = self.front.placeholder(call, *ids.shape)
                return call.placeholder
        return type(self.owner).forward(self.owner, *args, **kwargs)


def _first_qkv(qkv: tuple[torch.Tensor, int], ahead: torch.Tensor, count: int, first: layers.LayerParts
               ) -> torch.Tensor:
    """The first layer's q/k/v projection of the `count` real tokens from the front graph's (buffer, rows it
    projected): a call with more real tokens than that projects the rest now, into the same buffer."""
    buffer, done = qkv
    if count > done:
        layers.matmul_into(buffer[done:count], ahead[done:count], *layers.fused_qkv(first))
    return buffer[:count]


def hf_mask(config, hidden: torch.Tensor, call: FrontCall) -> torch.Tensor | None:
    """The mask HF's own forward would have handed its layers (for a stack that must run them after all)."""
    if create_bidirectional_mask is None:  # pragma: no cover
        return call.mask2d
    return create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=call.mask2d)


def _parameter_names(forward) -> list[str]:
    """The names `forward` binds positional arguments to (after `self`)."""
    return [name for name, p in inspect.signature(forward).parameters.items()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]


def _replaced(args: tuple, kwargs: dict, names: list[str], name: str, value) -> tuple[tuple, dict]:
    """The call's arguments with `name` set to `value`, wherever it was passed."""
    position = names.index(name) if name in names else len(args)
    if position < len(args):
        return args[:position] + (value,) + args[position + 1:], kwargs
    return args, {**kwargs, name: value}
