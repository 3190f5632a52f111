"""Prediction without a Trainer: what `Embedder.encode`, `Classifier.predict` and `CausalLM.generate` run.

The same steps as `lit-fast predict`, in the caller's process: the model placed once on the best device in the
`auto` precision (precision_checks.auto_precision) or the one asked for (a `-mixed` one keeps fp32 weights and runs
under autocast, as Lightning's plugin does), the fast path planned once, the inputs batched by length under
a token budget (data/batching.py, the plan the command makes) and tokenized in loader workers when there are
enough batches to pay for them. Rows come back in input order.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Optional, Sequence, Union

import torch

from lit_fast.data.device_rows import as_rows
from lit_fast.errors import ConfigError, InputDataError

log = logging.getLogger(__name__)

_DTYPES = {"32-true": torch.float32, "32": torch.float32, "bf16-true": torch.bfloat16, "16-true": torch.float16}
_MIXED = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}  # fp32 weights, autocast to this dtype
_WORKER_BATCHES = 16  # below this many batches, starting loader workers costs more than tokenizing here


def place(task, device: Optional[str] = None, precision: str = "auto") -> torch.device:
    """Build the task's model (once) and put it on `device` (default: the GPU when there is one) in `precision`
    ("auto", "32-true", "bf16-true", "16-true", or "bf16-mixed" / "16-mixed": fp32 weights under autocast, run by
    `compute`); plans the fast path once. Returns the device."""
    from lit_fast.models.precision_checks import auto_precision, saved_dtype

    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if precision == "auto":
        precision, _ = auto_precision("predict", "gpu" if target.type == "cuda" else "cpu", saved_dtype(task))
    if precision not in _DTYPES and precision not in _MIXED:
        raise ConfigError(f"precision {precision!r} is not one of auto, {', '.join([*_DTYPES, *_MIXED])}")
    placed = (target, precision)
    if getattr(task, "_placed", None) == placed:
        return target
    if getattr(task, "_placed", None) is not None:
        task._revert_fast_path()  # its kernels and graphs were planned for the old device or dtype
    if task.model is None:
        task.configure_model()
    if task.hparams.get("quantization"):
        task.model.to(target)  # bitsandbytes weights keep their own storage dtype
    else:
        task.model.to(target, _DTYPES.get(precision, torch.float32))
    task._placed = placed
    log.info("in-memory predict on %s in %s", target, precision)
    task.on_predict_start()
    return target


def compute(task) -> contextlib.AbstractContextManager:
    """Where the placed task's forward runs: inference mode, under autocast for a `-mixed` precision."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode())
    target, precision = getattr(task, "_placed", (None, None))
    if precision in _MIXED:
        stack.enter_context(torch.autocast(target.type, dtype=_MIXED[precision]))
    return stack


def predict_rows(task, texts: Sequence[Any], **options: Any) -> list[dict]:
    """The task's prediction rows for `texts` (options: those of `batches`), in input order."""
    rows: list[dict] = []
    for k, batch in enumerate(batches(task, texts, **options)):  # placed on the first batch, so `compute` after it
        with compute(task):
            rows.extend(as_rows(task.predict_step(batch, k)))
    rows.sort(key=lambda r: r["index"])
    if len(rows) != len(texts):  # never hand back fewer or more rows than were given
        raise RuntimeError(f"predicted {len(rows)} rows for {len(texts)} texts")
    return rows


def batches(task, texts: Sequence[Any], *, pairs: Optional[Sequence[str]] = None, batch_size: int = 64,
            max_tokens: Union[int, str, None] = None, device: Optional[str] = None, precision: str = "auto",
            num_workers: Optional[int] = None) -> Iterator[dict]:
    """The batches of `texts` (and `pairs`: the second text of each row) as the command makes them, on the task's
    device (`place`); each holds its rows' input positions in "index" (on the CPU). `max_tokens`: padded tokens per
    batch at most; "auto" is the command's budget for the device (batching.predict_max_tokens)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from lit_fast.data.batching import PredictBatches, as_tensors, predict_loader, predict_max_tokens, predict_plan

    if isinstance(texts, str):
        raise InputDataError("texts must be a list of texts; wrap one text in a list")
    texts = list(texts)
    if pairs is not None and len(pairs) != len(texts):
        raise InputDataError(f"{len(texts)} texts but {len(pairs)} pairs: every text needs its pair")
    for k, t in enumerate(texts):
        if isinstance(t, str) and not t.strip():
            raise InputDataError(f"text {k} (0-based) is empty; every row needs text")
    if not texts:
        return
    target = place(task, device, precision)
    max_tokens = predict_max_tokens(max_tokens, target.type)
    column = pa.array(texts)
    pair_column = pa.array(list(pairs), pa.string()) if pairs is not None else None
    if pa.types.is_string(column.type):
        chars = pc.utf8_length(column).to_numpy(zero_copy_only=False)
    else:  # words or messages: their count stands in for the length, as in the command
        chars = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if pair_column is not None:
        chars = chars + pc.utf8_length(pair_column).to_numpy(zero_copy_only=False)
    plan = predict_plan(chars, batch_size, max_tokens)
    dataset = PredictBatches(column, plan, task.codec(), max_tokens, 0, 1, pairs=pair_column)
    # on a CPU the model's threads have every core already; a tokenizing worker would only take one away
    workers = (_workers(len(plan)) if target.type == "cuda" else 0) if num_workers is None else num_workers
    for batch in map(as_tensors, predict_loader(dataset, num_workers=workers)):
        yield {key: v.to(target, non_blocking=True) if torch.is_tensor(v) and key != "index" else v
               for key, v in batch.items()}


def _workers(batches: int) -> int:
    from lit_fast.data.batching import loader_workers

    return 0 if batches < _WORKER_BATCHES else loader_workers()
