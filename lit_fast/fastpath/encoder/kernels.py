"""Hand-written GPU kernels of the packed path (Triton), each with the plain PyTorch expression it replaces.

`add_layer_norm(x, y, norm)` is `LayerNorm(x + y)`, the post-LN residual step of BERT-style layers, as one pass
over memory: it reads `x` and `y` once and writes the result once, where PyTorch runs two kernels (the add writes
the sum, the norm reads it back): a third of the bytes of those steps. The sum and the statistics are computed in fp32 from the fp16/bf16 inputs, so the result is at least
as close to an fp32 reference as PyTorch's (which rounds the sum to the input dtype first).

Triton is optional: without it (CPU-only installs, other accelerators) or for inputs the kernel does not take,
the PyTorch expression runs.

`varlen_attention(q, k, v, cu_seqlens, max_len)` is softmax attention within each packed sequence (the packed
layer's attention; see its notes below).

`embed_layer_norm(...)` is a text encoder's embedding step (word + position (+ token type) rows, then LayerNorm)
for the real tokens only, written straight into the packed matrix (front.py).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only environments
    triton = None
try:  # where Triton keeps its launch hooks (profilers set them; `launch` then leaves every call to Triton)
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - older Triton
    _knobs = None
# (under TRITON_INTERPRET=1 kernels run on the host: nothing compiled to keep)
_FAST_LAUNCH_OK = _knobs is not None and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")

# ---- launching -------------------------------------------------------------------------------------------------
# Triton's `kernel[grid](...)` binds and specializes every argument in Python on every call, several times the cost
# of the launch proper, while a GPU that finished its queue waits. `launch` keeps the compiled kernel of every
# specialization it has seen and launches it directly. Its key is at least as fine as Triton's: per tensor the dtype
# and whether the address is 16-byte aligned, per integer whether it is 1, divisible by 16 and which integer type
# holds it, per float / bool / None its kind (bools by value), plus every constexpr, the launch options and the
# device. A new key goes through Triton's own path once (which compiles if needed); with a launch hook set
# (profilers) or under the interpreter every launch does.
_compiled: dict[tuple, tuple] = {}


def launch(kernel, grid: tuple, *args, **constexprs) -> None:
    """`kernel[grid](*args, **constexprs)`: positional arguments are the kernel's runtime parameters in order,
    keywords its constexpr parameters and launch options (num_warps, num_stages)."""
    if not _FAST_LAUNCH_OK or _hooked(_knobs.runtime.launch_enter_hook) or _hooked(
            _knobs.runtime.launch_exit_hook):
        kernel[grid](*args, **constexprs)
        return
    get_device = getattr(torch._C, "_cuda_getDevice", None)  # current_device() without its Python checks (~2 us)
    device = get_device() if get_device is not None else torch.cuda.current_device()
    key = (kernel, device, tuple(constexprs.items()), *_specializations(args))
    entry = _compiled.get(key)
    if entry is None:
        compiled = kernel[grid](*args, **constexprs)
        if compiled is not None and not hasattr(compiled, "result") and hasattr(compiled, "packed_metadata"):
            names = kernel.arg_names[len(args):]
            if all(name in constexprs for name in names):  # every parameter is given: the full list can be rebuilt
                _compiled[key] = (compiled, tuple(constexprs[name] for name in names))
        return
    compiled, tail = entry
    grid_y = grid[1] if len(grid) > 1 else 1
    grid_z = grid[2] if len(grid) > 2 else 1
    compiled.run(grid[0], grid_y, grid_z, torch._C._cuda_getCurrentRawStream(device), compiled.function,
                 compiled.packed_metadata, None, None, None, *args, *tail)


def _hooked(hook) -> bool:
    """Whether a launch hook is set (Triton >= 3.5 keeps a HookChain, empty when none is)."""
    return bool(hook.calls) if hasattr(hook, "calls") else hook is not None


def next_power_of_2(n: int) -> int:
    """`triton.next_power_of_2` in plain Python (Triton's is a constexpr function: ~5 us a call on the host)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def _specializations(args) -> list[tuple]:
    """What Triton specializes each argument on: per tensor its dtype and 16-byte alignment, per integer whether it is
    1, divisible by 16 and which integer type holds it, per bool / None its value, per anything else its type. One
    comprehension over all arguments: a function call per argument would cost more host time than the launch saves."""
    return [(int, a == 1, a % 16 == 0, -(2**31) <= a < 2**31, a < 2**63)
            if type(a) is int or (isinstance(a, int) and not isinstance(a, bool))
            else (a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor)
            else (a,) if isinstance(a, bool) or a is None
            else (type(a),) for a in args]


MAX_WIDTH = 8192  # one row per program; wider rows go to PyTorch
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def add_layer_norm(x: torch.Tensor, y: torch.Tensor, norm: nn.LayerNorm, kernel: bool = True) -> torch.Tensor:
    """`norm(x + y)` for `(tokens, hidden)` matrices; one fused kernel where it applies (and `kernel`)."""
    if kernel and _kernel_fits(x, y, norm):
        return _add_layer_norm_triton(x, y, norm.weight, norm.bias, norm.eps)
    return F.layer_norm(x + y, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _kernel_fits(x: torch.Tensor, y: torch.Tensor, norm: nn.LayerNorm) -> bool:
    return (
        triton is not None
        and x.is_cuda
        and x.dtype in KERNEL_DTYPES
        and x.dtype == y.dtype
        and x.dim() == 2
        and x.shape == y.shape
        and x.stride(-1) == 1
        and y.stride(-1) == 1
        and x.shape[-1] <= MAX_WIDTH
        and norm.weight is not None
        and norm.bias is not None
        and norm.weight.dtype == x.dtype
        and not (torch.is_grad_enabled() and (x.requires_grad or y.requires_grad or norm.weight.requires_grad))
    )


def _add_layer_norm_triton(x, y, weight, bias, eps: float) -> torch.Tensor:
    rows, width = x.shape
    out = torch.empty((rows, width), dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    block = next_power_of_2(width)
    # a warp per 512 columns measured fastest at BERT-base's width (docs/MEASUREMENTS.md, "add+norm warps")
    warps = min(max(block // 512, 1), 8)
    launch(_add_layer_norm_kernel, (rows,), x, y, weight, bias, out, x.stride(0), y.stride(0), out.stride(0), width,
           eps, BLOCK=block, num_warps=warps)
    return out


if triton is not None:

    @triton.jit
    def _add_layer_norm_kernel(X, Y, W, B, Out, stride_x, stride_y, stride_out, width, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < width
        h = tl.load(X + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
        h += tl.load(Y + row * stride_y + cols, mask=inside, other=0.0).to(tl.float32)
        mean = tl.sum(h, axis=0) / width
        centred = tl.where(inside, h - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / width + eps)
        w = tl.load(W + cols, mask=inside, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(Out + row * stride_out + cols, (centred * rstd * w + b).to(Out.dtype.element_ty), mask=inside)


# ---- embeddings of packed tokens (front.py) -----------------------------------------------------------------
def embed_layer_norm_fits(word: torch.Tensor, tables: list[torch.Tensor], norm: nn.LayerNorm) -> bool:
    """Whether `embed_layer_norm` takes these tables: CUDA, one float dtype, contiguous rows, no autograd."""
    width = word.shape[1]
    return (
        triton is not None
        and word.is_cuda
        and word.dtype in KERNEL_DTYPES
        and width <= MAX_WIDTH
        and all(t.dtype == word.dtype and t.dim() == 2 and t.shape[1] == width and t.stride() == (width, 1)
                for t in [word, *tables])
        and norm.weight is not None
        and norm.bias is not None
        and norm.weight.dtype == word.dtype
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in [word, *tables, norm.weight]))
    )


def embed_layer_norm(count: int, seq_len: int, ids: torch.Tensor, positions: torch.Tensor, types: torch.Tensor | None,
                     word: torch.Tensor, position: torch.Tensor, token_type: torch.Tensor | None, norm: nn.LayerNorm,
                     indices: torch.Tensor | None = None, starts: torch.Tensor | None = None,
                     cu_seqlens: torch.Tensor | None = None, max_len: int = 0) -> torch.Tensor:
    """`norm(word[ids] (+ token_type[types]) + position[positions])` for the `count` packed tokens, in one pass.

    ids, positions, types: `(batch, seq_len)` index grids (any strides, broadcast rows included). The real tokens
    are the flat positions `indices`, or (rows of one run each) row b's `cu_seqlens[b+1] - cu_seqlens[b]` tokens
    from `starts[b]` on (`max_len` bounds them), or, with neither, every position in order. The three rows are
    summed and normalised in fp32. Indices are clamped to their tables, so memory outside them is never read; the
    caller checks the indices and must discard the result of an index that was out of range.

    With `starts`, `count` need only bound the number of tokens (the first `cu_seqlens[-1]` rows of the result
    are written): the front queues this kernel before the host knows the count.
    """
    width = word.shape[1]
    out = torch.empty((count, width), dtype=word.dtype, device=word.device)
    if count == 0:
        return out
    block = next_power_of_2(width)
    has_type = types is not None
    types = types if has_type else ids
    token_type = token_type if has_type else word
    if starts is not None:
        mode, grid, where, offsets = 2, (max_len, ids.shape[0]), starts, cu_seqlens
    elif indices is not None:
        mode, grid, where, offsets = 1, (count, 1), indices, indices
    else:
        mode, grid, where, offsets = 0, (count, 1), ids, ids
    launch(
        _embed_layer_norm_kernel, grid, where, offsets, ids, ids.stride(0), ids.stride(1), positions,
        positions.stride(0), positions.stride(1), types, types.stride(0), types.stride(1), word, position,
        token_type, norm.weight, norm.bias, out, seq_len, width, word.shape[0], position.shape[0],
        token_type.shape[0], norm.eps, MODE=mode, HAS_TYPE=has_type, BLOCK=block,
        num_warps=min(max(block // 256, 1), 8),
    )
    return out


if triton is not None:

    @triton.jit
    def _embed_layer_norm_kernel(Where, Offsets, Ids, s_ib, s_is, Pos, s_pb, s_ps, Typ, s_tb, s_ts, Word, Position,
                                 TokenType, W, B, Out, seq_len, width, word_rows, position_rows, type_rows, eps,
                                 MODE: tl.constexpr, HAS_TYPE: tl.constexpr, BLOCK: tl.constexpr):
        if MODE == 2:  # program (j, b): token j of row b, which starts at Where[b] and packs at Offsets[b]
            j = tl.program_id(0)
            row = tl.program_id(1).to(tl.int64)
            begin = tl.load(Offsets + row)
            if j >= tl.load(Offsets + row + 1) - begin:
                return
            col = (tl.load(Where + row) + j).to(tl.int64)
            token = (begin + j).to(tl.int64)
        else:
            token = tl.program_id(0).to(tl.int64)
            if MODE == 1:
                flat = tl.load(Where + token).to(tl.int64)
            else:
                flat = token
            row = flat // seq_len
            col = flat % seq_len
        cols = tl.arange(0, BLOCK)
        inside = cols < width
        word_id = tl.minimum(tl.maximum(tl.load(Ids + row * s_ib + col * s_is).to(tl.int64), 0), word_rows - 1)
        pos_id = tl.minimum(tl.maximum(tl.load(Pos + row * s_pb + col * s_ps).to(tl.int64), 0), position_rows - 1)
        h = tl.load(Word + word_id * width + cols, mask=inside, other=0.0).to(tl.float32)
        if HAS_TYPE:
            type_id = tl.minimum(tl.maximum(tl.load(Typ + row * s_tb + col * s_ts).to(tl.int64), 0), type_rows - 1)
            h += tl.load(TokenType + type_id * width + cols, mask=inside, other=0.0).to(tl.float32)
        h += tl.load(Position + pos_id * width + cols, mask=inside, other=0.0).to(tl.float32)
        mean = tl.sum(h, axis=0) / width
        centred = tl.where(inside, h - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / width + eps)
        w = tl.load(W + cols, mask=inside, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(Out + token * width + cols, (centred * rstd * w + b).to(Out.dtype.element_ty), mask=inside)


# ---- varlen attention (FastPathOptions.attention) ---------------------------------------------------------------
# FA2's varlen kernel tiles queries and keys by 128: a 144-token sequence computes 256 x 256 scores for 144 x 144
# useful ones (32%); 64 x 64 tiles compute 192 x 192 (56%). Same online-softmax algorithm, fp32 accumulation. The
# tiles below measured fastest for head sizes 32, 64 and 128 (docs/MEASUREMENTS.md, "attention"); head size 16
# works (tested) but was not timed, so `auto` leaves it to flash.
ATTN_BLOCK_M, ATTN_BLOCK_N, ATTN_WARPS, ATTN_STAGES = 64, 64, 4, 3
ATTN_MEASURED_HEAD_DIMS = (32, 64, 128)
# Batches of short sequences (mean under ATTN_SHORT_MEAN tokens) waste less of a narrower key tile.
ATTN_SHORT_BLOCK_N, ATTN_SHORT_MEAN, ATTN_SHORT_HEAD_DIMS = 32, 160, (64,)
LOG2E = 1.4426950408889634


def varlen_attention_fits(q: torch.Tensor) -> bool:
    """Whether `varlen_attention` takes these queries (CUDA fp16/bf16, a power-of-two head size 16..128: the sizes
    tested; larger tiles could outgrow shared memory with 3 pipeline stages)."""
    head_dim = q.shape[-1]
    return (triton is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and 16 <= head_dim <= 128 and head_dim & (head_dim - 1) == 0)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_len: int, scale: float | None = None) -> torch.Tensor:
    """Softmax attention within each packed sequence (no mask, not causal).

    q, k, v: (tokens, heads, head_dim), any token and head strides with the last dim contiguous (views of one
    fused projection work as they are); cu_seqlens: (sequences + 1,) int32 offsets; max_len: a bound on the longest
    sequence. Returns a contiguous (tokens, heads, head_dim) tensor.
    """
    tokens, heads, head_dim = q.shape
    out = torch.empty((tokens, heads, head_dim), dtype=q.dtype, device=q.device)
    sequences = cu_seqlens.numel() - 1
    if tokens == 0 or sequences == 0:
        return out
    scale = head_dim**-0.5 if scale is None else scale
    grid = (-(-max_len // ATTN_BLOCK_M), sequences, heads)
    short = head_dim in ATTN_SHORT_HEAD_DIMS and tokens <= ATTN_SHORT_MEAN * sequences
    launch(
        _varlen_attention_kernel, grid, q, k, v, out, cu_seqlens, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), out.stride(0), out.stride(1), scale * LOG2E, HEAD_DIM=head_dim,
        BLOCK_M=ATTN_BLOCK_M, BLOCK_N=ATTN_SHORT_BLOCK_N if short else ATTN_BLOCK_N, num_warps=ATTN_WARPS,
        num_stages=ATTN_STAGES,
    )
    return out


if triton is not None:

    @triton.jit
    def _varlen_attention_kernel(Q, K, V, Out, CU, sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h, qk_scale,
                                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        block, seq, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        begin = tl.load(CU + seq)
        length = tl.load(CU + seq + 1) - begin
        if block * BLOCK_M >= length:
            return
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, HEAD_DIM)
        cols = tl.arange(0, BLOCK_N)
        row_ok = rows < length
        row_tok = (begin + rows).to(tl.int64)
        q = tl.load(Q + row_tok[:, None] * sq_t + head * sq_h + dims[None, :], mask=row_ok[:, None], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for start in range(0, length, BLOCK_N):
            n = start + cols
            n_ok = n < length
            tok = (begin + n).to(tl.int64)
            k = tl.load(K + tok[:, None] * sk_t + head * sk_h + dims[None, :], mask=n_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + tok[:, None] * sv_t + head * sv_h + dims[None, :], mask=n_ok[:, None], other=0.0)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(Out + row_tok[:, None] * so_t + head * so_h + dims[None, :], out.to(Out.dtype.element_ty),
                 mask=row_ok[:, None])
