"""W3 on the GPU - fine-tuning steps, HF SDPA (padded, length-grouped, flattened) against lit_fast's packed rows
(bench/README.md; issue 22).

A step: zero_grad, forward and loss under bf16 autocast (fp32 master weights, Lightning's bf16-mixed), backward,
fused AdamW step; train mode, random-init weights (seed 0), batches on the device before timing. Each variant
runs alone (its own model and optimizer, freed afterwards): `--warmup` untimed steps, then the `--steps` steps
twice, each timed with torch.cuda.synchronize() around a host clock: a first pass (every batch shape new, as early
in a run) and the steady state (a long run). Real tokens/s = the steady-state steps' non-pad tokens over their
summed time; the first pass's is reported beside it (HF's padded BERT steps cost ~120 ms more the first time a
shape appears on an H100, which a short run pays at nearly every step and a long one once per shape). Peak memory: torch.cuda.max_memory_allocated, reset before each variant's model is built
(weights, optimizer state and activations). A variant that runs out of memory is recorded as "oom" (the decoder
ones first retry with smaller micro-batches, accumulating to the same step).

Encoder: BERT-base classifier (12 layers, hidden 768, 12 heads, FFN 3072, vocabulary 30522, 2 labels), the W1
length mix (lengths uniform in 32..256, seeded) over a pool of 50 x 64 examples (one group_by_length mega-batch),
attention dropout 0 in every variant by default (`--encoder-attn-dropout 0.1`, BERT's own default: lit_fast's CUDA
path then pads inside the attention only, as flash varlen has no dropout), hidden dropout 0.1.
  hf_padded             HF sdpa, random batches of 64 padded to the longest (the Trainer default), HF's loss
  hf_grouped            HF sdpa, batches of 64 from transformers' own get_length_grouped_indices (group_by_length:
                        mega-batches of 50 x 64 sorted by length)
  hf_flattening         DataCollatorWithFlattening + HF's own head: probed, reported "not applicable" (one label
                        per example does not collate, and HF's head reads only token 0 of the flattened row)
  hf_flattening_gather  the same random batches of 64 flattened by DataCollatorWithFlattening (restarted position
                        ids, no mask: transformers 5.25 turns them into a block-diagonal mask for BERT; 5.17 builds
                        none, so its examples attend to each other, which the check catches and reports "wrong"),
                        with each example's first token gathered into HF's pooler + classifier (as lit_fast's head)
  lit_fast_packed       lit_fast.training: TokenBudgetPlan(max_tokens = 64 x mean length, so tokens per step
                        match), pack_classification, use_packed_attention (varlen_attn on CUDA), classification_loss
Timed batches are spread evenly over the epoch of each variant's batch list (so length-grouped steps cover long and
short batches alike); `--steps 50` times every batch.

Decoder: Llama-1B shape (hidden 2048, `--decoder-layers` 16, 32 heads, 8 KV heads, FFN 8192, vocabulary 128256,
tied head), full fine-tuning and LoRA (peft, r 16, alpha 32, q/k/v/o_proj). Lengths log-uniform in 64..2048
(seeded); each step is the same group of examples for every variant, ~`--decoder-tokens` (16384) real tokens
(TokenBudgetPlan's fullest batches). Labels: every token but the first 16 ("prompt") of each example.
  hf_padded             HF sdpa, micro-batches of `--decoder-micro-batch` examples padded to the longest, gradients
                        accumulated over the step (its full step at once does not fit: 128k-vocabulary logits)
  hf_flattening         DataCollatorWithFlattening + sdpa (block-diagonal causal mask from the restarted positions)
  lit_fast_packed       pack_causal + use_packed_attention + causal_lm_loss (logits only where there is a target)
  lit_fast_packed_liger the same rows with liger-kernel's RMSNorm, SwiGLU and RoPE kernels and its fused linear
                        cross-entropy (no logits tensor): what adopting liger would give (needs liger-kernel)

Correctness, before timing, on one batch, eval mode, same weights: every variant's loss against hf_padded's at the
run precision (bf16 autocast: rel 2e-2; the CPU smoke run is fp32: rel 1e-5) and in fp32 (CUDA: rel 1e-4, CPU
1e-5), the fp32 gradients (total-norm rel 1e-4), and independence in fp32 (new tokens in one example leave every
other example's logits / loss unchanged, rel 1e-5). A variant that fails is recorded "wrong" and never timed.
Exit status 1 when lit_fast_packed is wrong or any variant raised an error (out of memory is a result, not one).
`--budget` (480 s) skips variants not started in time; the JSON is rewritten after each scenario, so with `--out`
under the device's $OUT a run cut short still returns what it measured.

MFU on real tokens (printed with the table): encoder 6 * P_layers * T + 12 * L * h * sum(len^2) + 6 * P_head * N;
decoder full 6 * P_layers * T + 6 * h * V * K + 6 * L * h * sum(len^2) (causal attention: half of 12 L h len^2);
LoRA 4 * P_layers * T + 6 * P_lora * T + 4 * h * V * K + 6 * L * h * sum(len^2). T real tokens, K target tokens,
N examples; over 989 TFLOP/s (H100 SXM dense bf16) and over the 8192^3 bf16 matmul measured in the run.

    LIT_FAST_COMMIT=<sha> python3 -m bench.w3_packed_gpu                              # GPU, ~2-3 min on an H100
    python3 -m bench.w3_packed_gpu --scenario decoder --modes lora --decoder-layers 8  # a part
    .venv/bin/python -m bench.w3_packed_gpu --device cpu --tiny                        # CPU smoke run, temp dir
"""

from __future__ import annotations

import argparse
import gc
import inspect
import math
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import common
from lit_fast.training import (
    TokenBudgetPlan,
    causal_lm_example_losses,
    causal_lm_loss,
    classification_loss,
    classifier_logits,
    pack_causal,
    pack_classification,
    use_packed_attention,
)
from lit_fast.training.heads import CLASSIFIER_HEADS

PEAK_TFLOPS = 989.0  # H100 SXM (and H200) dense bf16
IGNORE = -100
ENCODER_VARIANTS = ("hf_padded", "hf_grouped", "hf_flattening", "hf_flattening_gather", "lit_fast_packed")
DECODER_VARIANTS = ("hf_padded", "hf_flattening", "lit_fast_packed", "lit_fast_packed_liger")
PACKED = "lit_fast_packed"
LIGER = "lit_fast_packed_liger"  # last: liger patches transformers' Llama rotary function for the whole process


@dataclass(frozen=True)
class EncoderShape:
    layers: int = 12
    hidden: int = 768
    heads: int = 12
    ffn: int = 3072
    vocab: int = 30522
    batch: int = 64
    min_len: int = 32
    max_len: int = 256
    mega: int = 50  # group_by_length's mega-batch multiplier; the pool is one mega-batch


@dataclass(frozen=True)
class DecoderShape:
    layers: int = 16
    hidden: int = 2048
    heads: int = 32
    kv_heads: int = 8
    ffn: int = 8192
    vocab: int = 128256
    min_len: int = 64
    max_len: int = 2048
    tokens: int = 16384  # real tokens per step
    prompt: int = 16  # leading tokens of each example without a loss
    check_tokens: int = 4096  # the correctness batch


TINY_ENCODER = EncoderShape(layers=2, hidden=64, heads=4, ffn=128, vocab=1000, batch=8, min_len=4, max_len=40, mega=6)
TINY_DECODER = DecoderShape(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=1000, min_len=8, max_len=96,
                            tokens=256, prompt=4, check_tokens=256)


# ---- running a step ------------------------------------------------------------------------------------------
class Runner:
    """Device, precision and the clock shared by every variant."""

    def __init__(self, device: torch.device, bf16: bool):
        self.device, self.bf16, self.cuda = device, bf16, device.type == "cuda"

    def autocast(self, on: bool = True):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if (self.bf16 and on) else nullcontext()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def reset_peak(self) -> None:
        self.free()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def train_steps(runner: Runner, model, loss_fn, steps: list, warmup: list, params) -> tuple[list[float], list[float]]:
    """Fused AdamW (CUDA) on `params`; each step: zero_grad, for each micro-batch forward + loss under autocast and
    backward, optimizer step. After the untimed `warmup`, `steps` run twice: the first pass (each batch shape seen
    for the first time, as early in a run) and the timed steady state (a long run, where padded batches' per-shape
    first-step costs, about 120 ms each for HF's BERT on an H100, are paid once). Returns both passes' seconds."""
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=runner.cuda)
    model.train()

    def step(micro_batches) -> None:
        optimizer.zero_grad(set_to_none=True)
        for micro in micro_batches:
            with runner.autocast():
                loss = loss_fn(model, micro)
            loss.backward()
        optimizer.step()

    for s in warmup:
        step(s["micro"])
    passes = []
    for _ in range(2):
        times = []
        for s in steps:
            runner.sync()
            start = time.perf_counter()
            step(s["micro"])
            runner.sync()
            times.append(time.perf_counter() - start)
        passes.append(times)
    return passes[0], passes[1]  # the optimizer's state goes with this frame


def spread(n: int, steps: int, warmup: int) -> tuple[list[int], list[int]]:
    """Timed indices spread evenly over n batches, warm-up indices from the others (cycled when too few)."""
    timed = [min(n - 1, int((i + 0.5) * n / steps)) for i in range(steps)]
    rest = [i for i in range(n) if i not in set(timed)] or list(range(n))
    return timed, [rest[i % len(rest)] for i in range(warmup)]


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def compare_grads(model, ref: list) -> float:
    """Total-norm relative difference of the model's gradients from `ref` (the first call fills `ref`: 0.0)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters() if p.requires_grad]
    if not ref:
        ref.extend(g.detach().clone() for g in grads)
        return 0.0
    diff = math.sqrt(sum(float((g.double() - r.double()).pow(2).sum()) for g, r in zip(grads, ref)))
    norm = math.sqrt(sum(float(r.double().pow(2).sum()) for r in ref))
    return diff / max(norm, 1e-30)


def summarize(first: list[float], times: list[float], steps: list, flops_key: str = "flops") -> dict:
    """The steady-state pass's numbers, and the first pass's (each shape new) mean and real tokens/s beside them."""
    total = sum(times)
    tokens = sum(s["real_tokens"] for s in steps)
    flops = sum(s[flops_key] for s in steps)
    return {"status": "ok", "steps_timed": len(times), "median_step_ms": statistics.median(times) * 1e3,
            "mean_step_ms": total / len(times) * 1e3, "step_ms": [t * 1e3 for t in times],
            "real_tokens_per_step": tokens / len(steps),
            "padded_tokens_per_step": sum(s["padded_tokens"] for s in steps) / len(steps),
            "real_tokens_per_s": tokens / total, "model_tflops_per_s": flops / total / 1e12,
            "first_pass_step_ms": [t * 1e3 for t in first], "first_pass_mean_step_ms": sum(first) / len(first) * 1e3,
            "first_pass_real_tokens_per_s": tokens / sum(first)}


# ---- encoder -------------------------------------------------------------------------------------------------
def encoder_examples(shape: EncoderShape, seed: int) -> list[dict]:
    """One group_by_length mega-batch of examples: lengths uniform in min_len..max_len, random ids and labels."""
    g = torch.Generator().manual_seed(seed)
    n = shape.batch * shape.mega
    lengths = torch.randint(shape.min_len, shape.max_len + 1, (n,), generator=g).tolist()
    labels = torch.randint(0, 2, (n,), generator=g).tolist()
    low = min(1000, shape.vocab // 10)
    return [{"input_ids": torch.randint(low, shape.vocab, (length,), generator=g).tolist(), "labels": label}
            for length, label in zip(lengths, labels)]


def bert_classifier(shape: EncoderShape, device: torch.device, attn_dropout: float):
    import transformers

    config = transformers.BertConfig(vocab_size=shape.vocab, hidden_size=shape.hidden,
                                     num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                                     intermediate_size=shape.ffn, num_labels=2,
                                     attention_probs_dropout_prob=attn_dropout)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.BertForSequenceClassification(config)


def pad_classification(examples: list[dict], device) -> dict:
    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), longest, dtype=torch.long)
    mask = torch.zeros(len(examples), longest, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[row, : len(e["input_ids"])] = 1
    labels = torch.tensor([e["labels"] for e in examples])
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def flatten_classification(examples: list[dict], device) -> dict:
    """transformers' DataCollatorWithFlattening on the ids (its labels are per token, so none are given), plus the
    example starts and one label per example for the gathered head."""
    from transformers import DataCollatorWithFlattening

    flat = DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": e["input_ids"]} for e in examples])
    lengths = torch.tensor([len(e["input_ids"]) for e in examples])
    starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    return {"input_ids": flat["input_ids"].to(device), "position_ids": flat["position_ids"].to(device),
            "starts": starts.to(device), "labels": torch.tensor([e["labels"] for e in examples]).to(device)}


def encoder_prepare(variant: str, examples: list[dict], device):
    if variant in ("hf_padded", "hf_grouped"):
        return pad_classification(examples, device)
    if variant == "hf_flattening_gather":
        return flatten_classification(examples, device)
    if variant == PACKED:
        return pack_classification(examples).to(device)
    raise ValueError(variant)


def encoder_logits(variant: str, model, batch) -> torch.Tensor:
    if variant in ("hf_padded", "hf_grouped"):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if variant == "hf_flattening_gather":
        hidden = model.bert(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
        return CLASSIFIER_HEADS["bert"].head(model, hidden[0, batch["starts"]])
    return classifier_logits(model, batch)


def encoder_loss(variant: str):
    if variant in ("hf_padded", "hf_grouped"):
        return lambda model, batch: model(**batch).loss  # HF's own loss
    if variant == "hf_flattening_gather":
        return lambda model, batch: F.cross_entropy(encoder_logits(variant, model, batch).float(), batch["labels"])
    return lambda model, batch: classification_loss(model, batch)[0]


def set_attention(model, variant: str) -> None:
    """lit_fast's packed attention for lit_fast_packed, HF's sdpa for the rest (peft: on the wrapped model)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if variant in (PACKED, LIGER):
        use_packed_attention(base)
    else:
        base.set_attn_implementation("sdpa")
    if variant == LIGER:
        use_liger(model)


def probe_hf_flattening(model, examples: list[dict], device) -> str:
    """Whether transformers' own padding-free route can train a sequence classifier; the reason it cannot."""
    from transformers import DataCollatorWithFlattening

    notes = []
    try:
        DataCollatorWithFlattening(return_tensors="pt")(examples)
        notes.append("DataCollatorWithFlattening collated one label per example")
    except Exception as err:  # noqa: BLE001 - what it says is the finding
        notes.append(f"DataCollatorWithFlattening cannot collate one label per example ({type(err).__name__}: "
                     f"{str(err)[:80]})")
    flat = flatten_classification(examples, device)
    try:
        with torch.no_grad():
            out = model(input_ids=flat["input_ids"], position_ids=flat["position_ids"])
        notes.append(f"HF's head reads token 0 of the row: logits {tuple(out.logits.shape)} for "
                     f"{len(examples)} examples")
        try:
            with torch.no_grad():
                model(input_ids=flat["input_ids"], position_ids=flat["position_ids"], labels=flat["labels"])
            notes.append("its loss ran against the per-example labels (meaningless)")
        except Exception as err:  # noqa: BLE001
            notes.append(f"its loss fails ({type(err).__name__}: {str(err)[:80]})")
    except Exception as err:  # noqa: BLE001
        notes.append(f"the flattened row fails ({type(err).__name__}: {str(err)[:80]})")
    return "not applicable for classification: " + "; ".join(notes)


def check_encoder(runner: Runner, shape: EncoderShape, attn_dropout: float, examples: list[dict],
                  variants: list[str], tol: dict) -> dict:
    """Loss at the run precision and in fp32, fp32 gradients, and independence, against hf_padded (eval mode)."""
    model = bert_classifier(shape, runner.device, attn_dropout).eval()
    found: dict[str, dict] = {}
    ref_grads: list = []  # hf_padded's, filled first
    for variant in ["hf_padded"] + [v for v in variants if v not in ("hf_padded", "hf_grouped")]:
        if variant == "hf_flattening":
            set_attention(model, "hf_padded")
            found[variant] = {"status": "n/a", "note": probe_hf_flattening(model, examples, runner.device)}
            continue
        try:
            set_attention(model, variant)
            batch = encoder_prepare(variant, examples, runner.device)
            loss_fn = encoder_loss(variant)
            result = {}
            for precision, autocast in (("run", True), ("fp32", False)):
                model.zero_grad(set_to_none=True)
                with runner.autocast(autocast):
                    loss = loss_fn(model, batch)
                loss.backward()
                result[f"loss_{precision}"] = loss.item()
                if precision == "fp32":
                    result["grad_fp32_rel"] = compare_grads(model, ref_grads)
            with torch.no_grad():  # independence: new tokens in example 0, same length
                before = encoder_logits(variant, model, batch).float()
                changed = [dict(examples[0], input_ids=[(t * 7 + 11) % shape.vocab for t in examples[0]["input_ids"]])]
                after = encoder_logits(variant, model, encoder_prepare(variant, changed + examples[1:],
                                                                       runner.device)).float()
            result["independence"] = float((after[1:] - before[1:]).abs().max() / before[1:].abs().max())
            result["example0_changed"] = float((after[0] - before[0]).abs().max() / before[0].abs().max())
            found[variant] = result
        except Exception as err:  # noqa: BLE001 - recorded, and the variant is not timed
            traceback.print_exc()
            found[variant] = {"status": "error", "error": f"{type(err).__name__}: {err}"}
    model.zero_grad(set_to_none=True)
    del model
    ref_grads.clear()
    runner.free()
    return judge(found, tol, extra={"hf_grouped": "same model and loss as hf_padded"})


def judge(found: dict[str, dict], tol: dict, extra: dict | None = None) -> dict:
    """Each variant's differences against hf_padded and whether they pass (`ok`)."""
    ref = found["hf_padded"]
    if "status" in ref:  # no reference: nothing can be checked, so nothing is timed
        return {v: {"ok": False, "status": "error", "error": f"the hf_padded reference failed: {ref.get('error')}"}
                for v in list(found) + list(extra or {})}
    checks = {}
    for variant, r in found.items():
        if "status" in r:
            checks[variant] = {k: v for k, v in r.items()}
            checks[variant]["ok"] = False
            continue
        c = {"loss_run_rel": rel(r["loss_run"], ref["loss_run"]),
             "loss_fp32_rel": rel(r["loss_fp32"], ref["loss_fp32"]),
             "grad_fp32_rel": r["grad_fp32_rel"], "independence": r["independence"],
             "example0_changed": r["example0_changed"], "loss_run": r["loss_run"], "loss_fp32": r["loss_fp32"]}
        failures = [name for name, key in (("loss (run precision)", "loss_run_rel"), ("loss (fp32)", "loss_fp32_rel"),
                                           ("gradients (fp32)", "grad_fp32_rel"), ("independence", "independence"))
                    if not c[key] <= tol[key]]  # `not <=` also catches NaN
        if variant != "hf_padded" and c["example0_changed"] <= tol["independence"]:
            failures.append("the changed example's own output did not change (the check saw nothing)")
        c["ok"] = not failures
        if failures:
            c["status"] = "wrong"
            c["error"] = "differs from hf_padded: " + ", ".join(failures)
            if "independence" in failures:
                c["error"] += " (examples attend to each other)"
        checks[variant] = c
    for variant, note in (extra or {}).items():
        checks[variant] = {"ok": checks["hf_padded"]["ok"], "note": note}
    return checks


def encoder_flops(model, steps: list, shape: EncoderShape) -> None:
    layers = sum(p.numel() for p in model.bert.encoder.parameters())
    head = sum(p.numel() for m in (model.bert.pooler, model.classifier) for p in m.parameters())
    for s in steps:
        s["flops"] = (6 * layers * s["real_tokens"] + 12 * shape.layers * shape.hidden * s["sum_len2"]
                      + 6 * head * s["n"])


def encoder_batches(variant: str, examples: list[dict], shape: EncoderShape, seed: int) -> tuple[list[list[int]], dict]:
    """Each variant's epoch over the pool: lists of example positions."""
    n, b = len(examples), shape.batch
    if variant in ("hf_padded", "hf_flattening_gather"):  # the Trainer's default: a random permutation
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        return [order[i: i + b] for i in range(0, n, b)], {}
    if variant == "hf_grouped":
        from transformers.trainer_pt_utils import get_length_grouped_indices

        lengths = [len(e["input_ids"]) for e in examples]
        order = get_length_grouped_indices(lengths, b, mega_batch_mult=shape.mega,
                                           generator=torch.Generator().manual_seed(seed))
        return [order[i: i + b] for i in range(0, n, b)], {"mega_batch": shape.mega * b}
    lengths = [len(e["input_ids"]) for e in examples]
    budget = round(b * sum(lengths) / n)
    plan = TokenBudgetPlan(tuple(lengths), max_tokens=budget, seed=seed)(0)
    full = [batch for batch in plan if sum(lengths[i] for i in batch) >= 0.9 * budget]
    return full, {"max_tokens": budget, "plan_batches": len(plan), "excluded_under_90pct": len(plan) - len(full)}


def run_encoder(runner: Runner, args, shape: EncoderShape) -> dict:
    examples = encoder_examples(shape, args.seed)
    variants = [v for v in ENCODER_VARIANTS if v in args.variants]
    lengths = [len(e["input_ids"]) for e in examples]
    tol = tolerances(runner)
    print(f"[encoder] checking {len(variants)} variants on {shape.batch} examples ...", flush=True)
    first_batch, _ = encoder_batches("hf_padded", examples, shape, args.seed)
    checks = check_encoder(runner, shape, args.encoder_attn_dropout, [examples[i] for i in first_batch[0]],
                           variants, tol)
    results: dict[str, dict] = {}
    for variant in variants:
        check = checks.get(variant, {})
        if past_budget(args):
            results[variant] = {"status": "skipped", "note": f"past --budget {args.budget:.0f} s"}
            continue
        if variant == "hf_flattening" or not check.get("ok"):
            results[variant] = {"status": check.get("status", "wrong"),
                                "note": check.get("note") or check.get("error")}
            print(f"[encoder] {variant}: {results[variant]['status']}: {results[variant]['note']}", flush=True)
            continue
        batches, plan_info = encoder_batches(variant, examples, shape, args.seed)
        timed_idx, warm_idx = spread(len(batches), args.steps, args.warmup)
        steps, warm = [], []
        for idx, target in ((timed_idx, steps), (warm_idx, warm)):
            for i in idx:
                chosen = [examples[j] for j in batches[i]]
                real = [len(e["input_ids"]) for e in chosen]
                padded = sum(real) if variant in ("hf_flattening_gather", PACKED) else max(real) * len(real)
                target.append({"micro": [encoder_prepare(variant, chosen, runner.device)], "real_tokens": sum(real),
                               "padded_tokens": padded, "sum_len2": sum(x * x for x in real), "n": len(real)})
        runner.reset_peak()
        model = None
        try:
            model = bert_classifier(shape, runner.device, args.encoder_attn_dropout)
            set_attention(model, variant)
            encoder_flops(model, steps, shape)
            first, times = train_steps(runner, model, encoder_loss(variant), steps, warm, model.parameters())
            results[variant] = {**summarize(first, times, steps),
                                "examples_per_step": sum(s["n"] for s in steps) / len(steps),
                                "peak_gib": runner.peak_gib(), "epoch_batches": len(batches), **plan_info}
        except Exception as err:  # noqa: BLE001
            results[variant] = failure(err)
        finally:
            del model, steps, warm
            runner.free()
        print(f"[encoder] {variant}: {short(results[variant])}", flush=True)
    return {"scenario": "encoder", "mode": "full", "shape": shape.__dict__,
            "attention_dropout": args.encoder_attn_dropout, "pool_examples": len(examples),
            "mean_length": sum(lengths) / len(lengths),
            "checks": strip(checks), "tolerances": tol,
            "variants": results}


# ---- decoder -------------------------------------------------------------------------------------------------
def decoder_examples(shape: DecoderShape, count: int, seed: int) -> list[dict]:
    """Lengths log-uniform in min_len..max_len; random ids; labels = ids but -100 on the first `prompt` tokens."""
    g = torch.Generator().manual_seed(seed)
    logs = torch.empty(count).uniform_(math.log(shape.min_len), math.log(shape.max_len), generator=g)
    out = []
    for length in logs.exp().round().long().clamp(shape.min_len, shape.max_len).tolist():
        ids = torch.randint(100, shape.vocab - 1, (length,), generator=g).tolist()
        prompt = max(1, min(shape.prompt, length // 4))
        out.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return out


def decoder_groups(shape: DecoderShape, groups: int, seed: int) -> tuple[list[list[dict]], dict]:
    """`groups` steps of ~shape.tokens real tokens: TokenBudgetPlan's fullest batches over a large enough pool."""
    mean = (shape.max_len - shape.min_len) / math.log(shape.max_len / shape.min_len)
    examples = decoder_examples(shape, int((groups + 4) * shape.tokens / mean * 1.3) + 8, seed)
    plan = TokenBudgetPlan(tuple(len(e["input_ids"]) for e in examples), max_tokens=shape.tokens, seed=seed)(0)
    plan.sort(key=lambda batch: -sum(len(examples[i]["input_ids"]) for i in batch))
    if len(plan) < groups:
        raise RuntimeError(f"the decoder pool made {len(plan)} steps, {groups} needed")
    return [[examples[i] for i in batch] for batch in plan[:groups]], {"pool_examples": len(examples),
                                                                       "plan_batches": len(plan)}


def targets_of(examples: list[dict]) -> int:
    return sum(sum(1 for t in e["labels"][1:] if t != IGNORE) for e in examples)


def pad_causal(examples: list[dict], device) -> dict:
    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), longest, dtype=torch.long)
    mask = torch.zeros(len(examples), longest, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n], mask[row, :n], labels[row, :n] = torch.tensor(e["input_ids"]), 1, torch.tensor(e["labels"])
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def flatten_causal(examples: list[dict], device) -> dict:
    from transformers import DataCollatorWithFlattening

    flat = DataCollatorWithFlattening(return_tensors="pt")(
        [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
    return {k: flat[k].to(device) for k in ("input_ids", "labels", "position_ids")}


def split_tokens(examples: list[dict], parts: int) -> list[list[dict]]:
    """Consecutive runs of examples with about equal tokens each."""
    if parts <= 1:
        return [examples]
    total = sum(len(e["input_ids"]) for e in examples)
    out, current, seen = [], [], 0
    for e in examples:
        if current and seen >= total * (len(out) + 1) / parts and len(out) < parts - 1:
            out.append(current)
            current = []
        current.append(e)
        seen += len(e["input_ids"])
    return out + [current]


def decoder_micro(variant: str, group: list[dict], split: int, device) -> list[dict]:
    """A step's micro-batches; each with the weight that makes the summed loss the mean over the step's targets."""
    total = targets_of(group)
    if variant == "hf_padded":
        parts = [group[i: i + split] for i in range(0, len(group), split)]
    else:
        parts = split_tokens(group, split)
    out = []
    for part in parts:
        weight = targets_of(part) / total
        if variant == "hf_padded":
            out.append({"batch": pad_causal(part, device), "weight": weight})
        elif variant == "hf_flattening":
            out.append({"batch": flatten_causal(part, device), "weight": weight})
        else:
            out.append({"batch": pack_causal(part).to(device), "num_items": total})
    return out


def decoder_loss(variant: str):
    if variant == PACKED:
        return lambda model, micro: causal_lm_loss(model, micro["batch"], num_items_in_batch=micro["num_items"])
    if variant == LIGER:
        return lambda model, micro: liger_causal_loss(model, micro["batch"], micro["num_items"])
    return lambda model, micro: model(**micro["batch"], use_cache=False).loss * micro["weight"]


def use_liger(model) -> None:
    """liger-kernel's fused RMSNorm, SwiGLU and RoPE in the model's modules (its Triton kernels; the loss below
    is its fused linear cross-entropy)."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False, model=base)


def liger_causal_loss(model, batch, num_items: int) -> torch.Tensor:
    """The packed row's summed cross-entropy over its targets / num_items, through liger's fused linear
    cross-entropy: the head's logits are made and consumed in chunks, never (targets x vocabulary) at once."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                        **batch.boundaries()).last_hidden_state[0]
    targets = batch.labels[0]
    keep = targets != IGNORE
    hidden = hidden[keep]
    weight = base.lm_head.weight.to(hidden.dtype)  # what autocast does to the head's matmul (bf16-mixed)
    return LigerFusedLinearCrossEntropyLoss(reduction="sum")(weight, hidden, targets[keep]) / num_items


def decoder_example_losses(variant: str, model, micro: dict) -> torch.Tensor:
    """(N,) summed cross-entropy of each example's targets (for the independence check)."""
    batch = micro["batch"]
    if variant in (PACKED, LIGER):
        return causal_lm_example_losses(model, batch)
    if variant == "hf_padded":
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        per = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE,
                              reduction="none")
        return per.sum(1)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
    per = F.cross_entropy(logits[:-1].float(), batch["labels"][0, 1:], ignore_index=IGNORE, reduction="none")
    example = (batch["position_ids"][0] == 0).long().cumsum(0)[:-1] - 1  # position j predicts token j + 1
    return torch.zeros(int(example.max()) + 1, dtype=per.dtype, device=per.device).index_add(0, example, per)


def llama(shape: DecoderShape, device: torch.device, mode: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.ffn,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, max_position_embeddings=max(4096, shape.max_len),
                         tie_word_embeddings=True, attention_dropout=0.0)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    return model


def decoder_flops(model, mode: str, shape: DecoderShape, step: dict) -> float:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    frozen = sum(p.numel() for n, p in base.model.layers.named_parameters() if "lora_" not in n)
    lora = sum(p.numel() for n, p in base.model.layers.named_parameters() if "lora_" in n)
    attention = 6 * shape.layers * shape.hidden * step["sum_len2"]
    head = shape.hidden * shape.vocab * step["targets"]
    if mode == "full":
        return 6 * frozen * step["real_tokens"] + 6 * head + attention
    return 4 * frozen * step["real_tokens"] + 6 * lora * step["real_tokens"] + 4 * head + attention


def check_decoder(runner: Runner, shape: DecoderShape, mode: str, group: list[dict], variants: list[str],
                  tol: dict) -> dict:
    chosen, seen = [], 0
    for e in group:  # 2 to 4 examples, at most check_tokens real tokens where that allows 2
        if len(chosen) >= 4 or (len(chosen) >= 2 and seen + len(e["input_ids"]) > shape.check_tokens):
            break
        chosen.append(e)
        seen += len(e["input_ids"])
    model = llama(shape, runner.device, mode).eval()
    found: dict[str, dict] = {}
    ref_grads: list = []  # hf_padded's, filled first
    for variant in ["hf_padded"] + [v for v in variants if v != "hf_padded"]:
        try:
            set_attention(model, variant)
            whole = len(chosen) if variant == "hf_padded" else 1  # one micro-batch
            micro = decoder_micro(variant, chosen, whole, runner.device)[0]
            loss_fn = decoder_loss(variant)
            result = {}
            for precision, autocast in (("run", True), ("fp32", False)):
                model.zero_grad(set_to_none=True)
                with runner.autocast(autocast):
                    loss = loss_fn(model, micro)
                loss.backward()
                result[f"loss_{precision}"] = loss.item()
                if precision == "fp32":
                    result["grad_fp32_rel"] = compare_grads(model, ref_grads)
            model.zero_grad(set_to_none=True)
            with torch.no_grad():  # independence: new tokens in example 0 (the others come after it)
                before = decoder_example_losses(variant, model, micro).float()
                e0 = chosen[0]
                ids = [(t * 7 + 11) % (shape.vocab - 1) for t in e0["input_ids"]]
                changed = [{"input_ids": ids, "labels": [IGNORE if l == IGNORE else t
                                                         for l, t in zip(e0["labels"], ids)]}]
                micro = decoder_micro(variant, changed + chosen[1:], whole, runner.device)[0]
                after = decoder_example_losses(variant, model, micro).float()
            result["independence"] = float((after[1:] - before[1:]).abs().max() / before[1:].abs().max())
            result["example0_changed"] = float((after[0] - before[0]).abs() / before[0].abs())
            found[variant] = result
        except Exception as err:  # noqa: BLE001
            traceback.print_exc()
            found[variant] = {"status": "oom" if is_oom(err) else "error", "error": f"{type(err).__name__}: {err}"}
        runner.free()
    model.zero_grad(set_to_none=True)
    del model
    ref_grads.clear()
    runner.free()
    checks = judge(found, tol)
    for c in checks.values():
        c["examples"], c["tokens"] = len(chosen), seen
    return checks


def run_decoder(runner: Runner, args, shape: DecoderShape, mode: str) -> dict:
    variants = [v for v in DECODER_VARIANTS if v in args.variants]
    groups, pool = decoder_groups(shape, args.warmup + args.steps, args.seed)
    warm_groups, timed_groups = groups[: args.warmup], groups[args.warmup:]
    tol = tolerances(runner)
    print(f"[decoder {mode}] checking {len(variants)} variants ...", flush=True)
    checks = check_decoder(runner, shape, mode, groups[0], variants, tol)
    results: dict[str, dict] = {}
    for variant in variants:
        if past_budget(args):
            results[variant] = {"status": "skipped", "note": f"past --budget {args.budget:.0f} s"}
            continue
        if not checks.get(variant, {}).get("ok"):
            results[variant] = {"status": checks[variant].get("status", "wrong"), "note": checks[variant].get("error")}
            print(f"[decoder {mode}] {variant}: {results[variant]['status']}: {results[variant]['note']}", flush=True)
            continue
        splits = ([args.decoder_micro_batch // 2**k for k in range(8) if args.decoder_micro_batch // 2**k >= 1]
                  if variant == "hf_padded" else [1, 2, 4, 8])
        attempts = []
        for split in splits:
            runner.reset_peak()
            model = steps = warm = None
            try:
                steps, warm = [], []
                for chosen, target in ((timed_groups, steps), (warm_groups, warm)):
                    for group in chosen:
                        real = [len(e["input_ids"]) for e in group]
                        micro = decoder_micro(variant, group, split, runner.device)
                        padded = (sum(m["batch"]["input_ids"].numel() for m in micro) if variant == "hf_padded"
                                  else sum(real))
                        target.append({"micro": micro, "real_tokens": sum(real), "padded_tokens": padded,
                                       "sum_len2": sum(x * x for x in real), "n": len(real),
                                       "targets": targets_of(group)})
                model = llama(shape, runner.device, mode)
                set_attention(model, variant)
                for s in steps:
                    s["flops"] = decoder_flops(model, mode, shape, s)
                params = [p for p in model.parameters() if p.requires_grad]
                first, times = train_steps(runner, model, decoder_loss(variant), steps, warm, params)
                results[variant] = {**summarize(first, times, steps),
                                    "examples_per_step": sum(s["n"] for s in steps) / len(steps),
                                    "micro_batches_per_step": sum(len(s["micro"]) for s in steps) / len(steps),
                                    ("micro_batch_examples" if variant == "hf_padded" else "rows_per_step"): split,
                                    "peak_gib": runner.peak_gib(), "trainable_params": sum(p.numel() for p in params),
                                    "oom_attempts": attempts}
                break
            except Exception as err:  # noqa: BLE001
                results[variant] = failure(err)
                if results[variant]["status"] != "oom":
                    break
                attempts.append({"split": split, "peak_gib": runner.peak_gib()})
                results[variant]["oom_attempts"] = attempts
                print(f"[decoder {mode}] {variant}: out of memory at split {split}, retrying smaller", flush=True)
            finally:
                del model, steps, warm
                runner.free()
        print(f"[decoder {mode}] {variant}: {short(results[variant])}", flush=True)
    return {"scenario": "decoder", "mode": mode, "shape": shape.__dict__, **pool, "checks": strip(checks),
            "tolerances": tol, "variants": results}


def past_budget(args) -> bool:
    return time.perf_counter() > args.deadline


# ---- report --------------------------------------------------------------------------------------------------
def failure(err: BaseException) -> dict:
    if is_oom(err):
        return {"status": "oom", "error": str(err).splitlines()[0][:300]}
    traceback.print_exc()
    return {"status": "error", "error": f"{type(err).__name__}: {err}"[:500]}


def short(r: dict) -> str:
    if r.get("status") != "ok":
        return f"{r.get('status')}: {r.get('note') or r.get('error')}"
    peak = f", peak {r['peak_gib']:.1f} GiB" if r.get("peak_gib") is not None else ""
    return f"{r['real_tokens_per_s']:,.0f} real tokens/s, median step {r['median_step_ms']:.1f} ms{peak}"


def strip(checks: dict) -> dict:
    return {v: dict(c) for v, c in checks.items()}


def tolerances(runner: Runner) -> dict:
    return {"loss_run_rel": 2e-2 if runner.bf16 else 1e-5, "loss_fp32_rel": 1e-4 if runner.cuda else 1e-5,
            "grad_fp32_rel": 1e-4, "independence": 1e-5}


def add_ratios(result: dict, peak_measured: float | None, cuda: bool) -> None:
    variants = result["variants"]
    packed = variants.get(PACKED, {})
    base = variants.get("hf_padded", {})
    for name, r in variants.items():
        if r.get("status") != "ok":
            continue
        if base.get("status") == "ok":
            r["vs_hf_padded"] = r["real_tokens_per_s"] / base["real_tokens_per_s"]
        if packed.get("status") == "ok":
            r["lit_fast_packed_speedup_over_this"] = packed["real_tokens_per_s"] / r["real_tokens_per_s"]
        if cuda:
            r["mfu_real_vs_989"] = r["model_tflops_per_s"] / PEAK_TFLOPS
        if peak_measured:
            r["mfu_real_vs_measured_matmul"] = r["model_tflops_per_s"] / peak_measured


def table(results: list[dict]) -> str:
    rows = []
    for res in results:
        for name, r in res["variants"].items():
            check = res["checks"].get(name, {})
            check_text = (f"{check['loss_run_rel']:.1e} / {check['loss_fp32_rel']:.1e} / {check['independence']:.0e}"
                          if "loss_run_rel" in check else ("same as hf_padded" if name == "hf_grouped" else ""))
            label = f"{res['scenario']} {res['mode']}"
            if r.get("status") != "ok":
                rows.append([label, name, r.get("status"), "", "", "", "", "", "", "", "", check_text])
                continue
            rows.append([label, name, "ok", f"{r['real_tokens_per_step']:,.0f} / {r['padded_tokens_per_step']:,.0f}",
                         f"{r['median_step_ms']:.1f}", f"{r['real_tokens_per_s']:,.0f}",
                         f"{r['first_pass_real_tokens_per_s']:,.0f}" if "first_pass_real_tokens_per_s" in r else "",
                         f"{r['vs_hf_padded']:.2f}x" if "vs_hf_padded" in r else "",
                         f"{r['lit_fast_packed_speedup_over_this']:.2f}x" if "lit_fast_packed_speedup_over_this" in r
                         else "",
                         (f"{r['mfu_real_vs_989']:.1%}" + (f" / {r['mfu_real_vs_measured_matmul']:.1%}"
                                                            if "mfu_real_vs_measured_matmul" in r else ""))
                         if "mfu_real_vs_989" in r else "",
                         f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "", check_text])
    return common.markdown_table(
        ["scenario", "variant", "status", "real / computed tokens per step", "median step ms", "real tokens/s",
         "first pass real tokens/s",
         "vs hf_padded", "lit_fast_packed over this", "MFU real: of 989 / of measured matmul", "peak GiB",
         "check: loss rel run / fp32 / indep."], rows)


def notes(results: list[dict]) -> list[str]:
    out = []
    for res in results:
        for name, r in res["variants"].items():
            if r.get("status") != "ok":
                out.append(f"- {res['scenario']} {res['mode']} {name}: {r.get('status')}: "
                           f"{r.get('note') or r.get('error')}")
            elif r.get("oom_attempts"):
                out.append(f"- {res['scenario']} {res['mode']} {name}: ran after out-of-memory at "
                           f"{[a['split'] for a in r['oom_attempts']]} (micro-batch examples / rows per step)")
    return out


FLOPS_TEXT = ("model FLOPs on real tokens: encoder 6*P_layers*T + 12*L*h*sum(len^2) + 6*P_head*N; decoder full "
              "6*P_layers*T + 6*h*V*K + 6*L*h*sum(len^2); LoRA 4*P_layers*T + 6*P_lora*T + 4*h*V*K + 6*L*h*sum(len^2) "
              "(T real tokens, K target tokens, N examples; causal attention counted as half of 12*L*h*len^2); "
              "MFU over 989 TFLOP/s (H100 SXM dense bf16)")


def varlen_signature() -> str | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
        return str(inspect.signature(varlen_attn))
    except ImportError:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=["encoder", "decoder", "all"], default="all")
    parser.add_argument("--modes", nargs="+", choices=["full", "lora"], default=["full", "lora"],
                        help="decoder modes")
    parser.add_argument("--variants", nargs="+", default=list(dict.fromkeys(ENCODER_VARIANTS + DECODER_VARIANTS)),
                        help="run only these (hf_padded is always the reference of the checks)")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per variant first")
    parser.add_argument("--decoder-layers", type=int, default=16)
    parser.add_argument("--decoder-tokens", type=int, default=16384, help="real tokens per decoder step")
    parser.add_argument("--decoder-micro-batch", type=int, default=8,
                        help="hf_padded examples per micro-batch (halved on out-of-memory)")
    parser.add_argument("--encoder-attn-dropout", type=float, default=0.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["bf16-mixed", "fp32"], default=None,
                        help="default: bf16-mixed on CUDA, fp32 on the CPU")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=float, default=480.0,
                        help="seconds; variants not started by then are skipped (the JSON is written after each "
                             "scenario, so a run cut short keeps what it measured)")
    parser.add_argument("--out", help="results JSON (default bench/results/w3_gpu_<device>_<commit>.json; --tiny: "
                                      "temp dir)")
    args = parser.parse_args()
    args.variants = ["hf_padded"] + [v for v in args.variants if v != "hf_padded"]
    device = torch.device(args.device)
    bf16 = (args.precision or ("bf16-mixed" if device.type == "cuda" else "fp32")) == "bf16-mixed"
    runner = Runner(device, bf16)
    encoder_shape = TINY_ENCODER if args.tiny else EncoderShape()
    decoder_shape = TINY_DECODER if args.tiny else DecoderShape(layers=args.decoder_layers, tokens=args.decoder_tokens)
    if args.tiny:
        args.decoder_micro_batch = min(args.decoder_micro_batch, 3)

    started = time.perf_counter()
    args.deadline = started + args.budget
    peak_measured = common.matmul_peak_tflops() if runner.cuda and not args.tiny else None
    if peak_measured:
        print(f"measured bf16 matmul peak: {peak_measured:.0f} TFLOP/s", flush=True)
    import transformers
    try:
        import peft
        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    environment = common.environment(device, peft=peft_version, varlen_attn=varlen_signature(),
                                     precision="bf16-mixed" if bf16 else "fp32",
                                     float32_matmul_precision=torch.get_float32_matmul_precision())
    tag = "_tiny" if args.tiny else ""
    out = args.out or (str(Path(tempfile.gettempdir()) / f"w3_gpu{tag}_{device.type}.json") if args.tiny
                       else common.default_out("w3_gpu", device))
    results: list[dict] = []

    def save(final: bool = False) -> dict:
        for res in results:
            add_ratios(res, peak_measured, runner.cuda)
        report = {"workload": "W3 (GPU)", "environment": environment,
                  "args": {k: v for k, v in vars(args).items() if k != "deadline"},
                  "peak": {"spec_tflops": PEAK_TFLOPS, "matmul_measured_tflops": peak_measured},
                  "flops": FLOPS_TEXT, "wall_s": time.perf_counter() - started, "complete": final,
                  "results": results}
        common.write_json(report, out, quiet=not final)
        return report

    if args.scenario in ("encoder", "all"):
        results.append(run_encoder(runner, args, encoder_shape))
        save()
    if args.scenario in ("decoder", "all"):
        for mode in args.modes:
            results.append(run_decoder(runner, args, decoder_shape, mode))
            save()
    report = save(final=True)
    print(f"\n{environment['device']}; torch {torch.__version__}, transformers {transformers.__version__}, peft "
          f"{peft_version}; {environment['precision']}; commit {environment['commit']}; wall {report['wall_s']:.0f} s")
    if peak_measured:
        print(f"measured 8192^3 bf16 matmul: {peak_measured:.0f} TFLOP/s")
    print(FLOPS_TEXT)
    for line in notes(results):
        print(line)
    print(table(results))
    bad = [f"{res['scenario']} {res['mode']} {name}" for res in results for name, r in res["variants"].items()
           if r.get("status") == "error" or (name == PACKED and r.get("status") == "wrong")]
    if bad:
        print(f"FAILED: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
