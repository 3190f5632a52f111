"""W3 on the CPU - one fine-tuning step, padded HF SDPA against packed rows (bench/README.md; issue 22).

The W6 shape as a classifier: BERT-small (4 layers, hidden 512, 8 heads, FFN 2048, vocabulary 30522, 2 labels,
random init from seed 0), batch 32, fp32. Scenarios as in W6 (`bench.w6_cpu.batch_for`): "w1", lengths
`torch.randint(32, 257, (32,))` after `torch.manual_seed(0)` (~47% padding), and "none", every sequence 256
tokens (0% padding).

A step: zero_grad, forward, loss, backward, AdamW step, in train mode (dropout 0.1 as the config sets it).
Variants (one model's weights, deep-copied, each with its own AdamW):
  hf_sdpa        HF's forward with attn_implementation="sdpa" on the right-padded batch, HF's loss (`labels=`)
  packed         lit_fast.training: the examples' real tokens in one row, SDPA once per example
                 (`use_packed_attention` + `classification_loss`)
  hf_flatten     transformers' own padding-free route on the same row: restarted position ids and no mask under
                 "sdpa", which transformers turns into one block-diagonal T x T mask; lit_fast's head reads each
                 example's first token (HF's head would read only the row's first); W1 mix only, since at
                 0% padding its 8192 x 8192 mask takes minutes a step
Scenario "epoch" asks what `model.packing` decides on a CPU: a pool of 4 x 32 examples of the W1 mix, trained
through whole epochs the way each mode batches them. Variants (the time of the whole epoch):
  hf_random      random batches of 32 padded to their longest (the transformers Trainer's default)
  hf_bucketed    lit_fast's own padded batches (`model.packing: false`): length-bucketed, then shuffled
                 (data/batching.make_batches, as EpochPlan calls it)
  packed         lit_fast's packed rows (`model.packing: auto`): first-fit over a seeded shuffle under
                 batch_size x longest real tokens, at most batch_size examples a row (training.TokenBudgetPlan)
Timed round robin (every variant once per round, order shuffled each round, seeded), the median of `--rounds`
after `--warmup` rounds, and the median of the per-round ratios (on a shared machine the load drifts between
rounds more than between the variants of one round); the load average is recorded. Correctness in the same
run, before timing: each variant's loss and gradients in eval mode against hf_sdpa's (relative difference; the
library's tests hold them to 1e-5).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python -m bench.w3_packed_cpu [--rounds 5] [--warmup 1] [--out FILE]
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python -m bench.w3_packed_cpu --quick   # 1 + 1 rounds, W1 mix, temp dir
OMP_WAIT_POLICY=PASSIVE as in the project's commands: on a busy 2-core machine OpenMP's spinning threads make the
packed step's many small per-example attention calls several times slower (docs/PACKED_TRAINING.md).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from bench import common
from bench.w6_cpu import batch_for
from lit_fast.training import classification_loss, pack_classification, use_packed_attention
from lit_fast.training.heads import CLASSIFIER_HEADS

# hf_flatten's T x T mask makes it the slowest by far; at 0% padding (T = 8192) it would take minutes a step
VARIANTS = {"w1": ("hf_sdpa", "packed", "hf_flatten"), "none": ("hf_sdpa", "packed")}
EPOCH_VARIANTS = ("hf_random", "hf_bucketed", "packed")
EPOCH_BATCHES = 4


def classifier():
    import transformers

    config = transformers.BertConfig(vocab_size=30522, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                                     intermediate_size=2048, num_labels=2)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def inputs_for(scenario: str) -> tuple[dict, object]:
    """The padded batch (HF's inputs) and the same examples as one packed row."""
    ids, mask = batch_for(scenario)
    labels = torch.randint(0, 2, (ids.shape[0],), generator=torch.Generator().manual_seed(1))
    examples = [{"input_ids": row[: int(m.sum())].tolist(), "labels": int(label)}
                for row, m, label in zip(ids, mask, labels)]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}, pack_classification(examples)


def losses(padded: dict, packed) -> dict[str, Callable[[torch.nn.Module], torch.Tensor]]:
    def hf_flatten(model):
        hidden = model.bert(input_ids=packed.input_ids, position_ids=packed.position_ids).last_hidden_state
        logits = CLASSIFIER_HEADS["bert"].head(model, hidden[0, packed.cu_seqlens[:-1].long()])
        return torch.nn.functional.cross_entropy(logits, packed.labels)

    return {"hf_sdpa": lambda model: model(**padded).loss,
            "packed": lambda model: classification_loss(model, packed)[0],
            "hf_flatten": hf_flatten}


def build(base, names: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    return {name: use_packed_attention(copy.deepcopy(base)) if name == "packed" else copy.deepcopy(base)
            for name in names}


def check(base, loss_of: dict, names: tuple[str, ...]) -> dict[str, dict]:
    """Each variant's eval-mode loss and gradients against hf_sdpa's (dropout off, so they must agree)."""
    found = {}
    for name, model in build(base, names).items():
        model.eval()
        loss = loss_of[name](model)
        loss.backward()
        found[name] = (loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    ref_loss, ref_grad = found["hf_sdpa"]
    return {name: {"loss_rel_diff": abs(loss - ref_loss) / abs(ref_loss),
                   "grad_rel_diff": ((grad - ref_grad).norm() / ref_grad.norm()).item()}
            for name, (loss, grad) in found.items()}


def measure(scenario: str, rounds: int, warmup: int) -> dict:
    padded, packed = inputs_for(scenario)
    base = classifier()
    loss_of = losses(padded, packed)
    names = VARIANTS[scenario]
    correctness = check(base, loss_of, names)
    models = build(base, names)
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-5) for name, model in models.items()}
    for model in models.values():
        model.train()

    def step(name: str) -> float:
        start = time.perf_counter()
        optimizers[name].zero_grad(set_to_none=True)
        loss_of[name](models[name]).backward()
        optimizers[name].step()
        return time.perf_counter() - start

    load_before = os.getloadavg()
    common.round_robin(list(names), warmup, step, seed=1)
    times = common.round_robin(list(names), rounds, step, seed=0)
    load_after = os.getloadavg()
    real = int(padded["attention_mask"].sum())
    sdpa = statistics.median(times["hf_sdpa"])
    return {
        "scenario": scenario,
        "padding_fraction": 1 - real / padded["attention_mask"].numel(),
        "real_tokens": real,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "variants": {name: {"median_s": statistics.median(values), "times_s": values,
                            "speedup_vs_hf_sdpa": sdpa / statistics.median(values),
                            # each round's ratio: robust to the load of a shared machine drifting between rounds
                            "speedup_per_round_median": statistics.median(
                                a / b for a, b in zip(times["hf_sdpa"], values)),
                            "real_tokens_per_s": real / statistics.median(values), **correctness[name]}
                     for name, values in times.items()},
    }


def epoch_batches(batch: int = 32, batches: int = EPOCH_BATCHES) -> tuple[dict[str, list], int, int]:
    """Each epoch variant's batches over one pool of W1-mix examples: variant -> [loss closure input], the real and
    the computed tokens of hf_bucketed."""
    from lit_fast.data.batching import make_batches
    from lit_fast.training.packing import TokenBudgetPlan

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(32, 257, (batch * batches,), generator=g).tolist()
    examples = [{"input_ids": torch.randint(1000, 30000, (n,), generator=g).tolist(), "labels": int(label)}
                for n, label in zip(lengths, torch.randint(0, 2, (len(lengths),), generator=g))]

    def padded(group: list[int]) -> dict:
        longest = max(lengths[j] for j in group)
        ids = torch.zeros(len(group), longest, dtype=torch.long)
        mask = torch.zeros(len(group), longest, dtype=torch.long)
        for row, j in enumerate(group):
            ids[row, : lengths[j]] = torch.tensor(examples[j]["input_ids"])
            mask[row, : lengths[j]] = 1
        labels = torch.tensor([examples[j]["labels"] for j in group])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    order = torch.randperm(len(lengths), generator=g).tolist()
    plans = {
        "hf_random": [order[k: k + batch] for k in range(0, len(order), batch)],
        "hf_bucketed": make_batches(lengths, batch, None, shuffle=True, seed=0),
        "packed": TokenBudgetPlan(tuple(lengths), batch * max(lengths), seed=0, max_examples=batch)(0),
    }
    made = {name: [padded(group) for group in groups] for name, groups in plans.items() if name != "packed"}
    made["packed"] = [pack_classification([examples[j] for j in group]) for group in plans["packed"]]
    computed = sum(int(b["attention_mask"].numel()) for b in made["hf_bucketed"])
    return made, sum(lengths), computed


def measure_epoch(rounds: int, warmup: int) -> dict:
    """Scenario "epoch": every variant's whole epoch per round (module docstring)."""
    made, real, computed = epoch_batches()
    base = classifier()
    models = build(base, EPOCH_VARIANTS)
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-5) for name, model in models.items()}
    for model in models.values():
        model.train()

    def loss(name: str, batch) -> torch.Tensor:
        return classification_loss(models[name], batch)[0] if name == "packed" else models[name](**batch).loss

    def epoch(name: str) -> float:
        start = time.perf_counter()
        for batch in made[name]:
            optimizers[name].zero_grad(set_to_none=True)
            loss(name, batch).backward()
            optimizers[name].step()
        return time.perf_counter() - start

    load_before = os.getloadavg()
    common.round_robin(list(EPOCH_VARIANTS), warmup, epoch, seed=1)
    times = common.round_robin(list(EPOCH_VARIANTS), rounds, epoch, seed=0)
    bucketed = statistics.median(times["hf_bucketed"])
    return {
        "scenario": "epoch",
        "examples": len(made["hf_random"]) * 32,
        "real_tokens": real,
        "padding_fraction": {name: 1 - real / sum(int(b["attention_mask"].numel()) for b in made[name])
                             for name in ("hf_random", "hf_bucketed")},
        "bucketed_computed_tokens": computed,
        "steps": {name: len(batches) for name, batches in made.items()},
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "variants": {name: {"median_s": statistics.median(values), "times_s": values,
                            "speedup_vs_hf_bucketed": bucketed / statistics.median(values),
                            "speedup_per_round_median": statistics.median(
                                a / b for a, b in zip(times["hf_bucketed"], values)),
                            "real_tokens_per_s": real / statistics.median(values)}
                     for name, values in times.items()},
    }


def epoch_table(result: dict) -> str:
    rows = [[name, str(result["steps"][name]), f"{v['median_s']:.1f}", f"{v['real_tokens_per_s']:.0f}",
             f"{v['speedup_vs_hf_bucketed']:.2f}x", f"{v['speedup_per_round_median']:.2f}x"]
            for name, v in result["variants"].items()]
    return common.markdown_table(["variant", "steps", "median s/epoch", "real tokens/s", "vs hf_bucketed",
                                  "per-round ratio (median)"], rows)


def table(results: list[dict]) -> str:
    rows = [[r["scenario"], f"{r['padding_fraction']:.0%}", name, f"{v['median_s']:.3f}",
             f"{v['real_tokens_per_s']:.0f}", f"{v['speedup_vs_hf_sdpa']:.2f}x",
             f"{v['speedup_per_round_median']:.2f}x",
             f"{v['loss_rel_diff']:.1e} / {v['grad_rel_diff']:.1e}"]
            for r in results for name, v in r["variants"].items()]
    return common.markdown_table(["scenario", "padding", "variant", "median s/step", "real tokens/s", "vs HF sdpa",
                                  "per-round ratio (median)", "loss / grad rel diff vs HF sdpa"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--scenario", nargs="+", default=["w1", "none"], choices=["w1", "none", "epoch"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", help="results JSON (default bench/results/w3_cpu_<commit>.json; --quick: temp dir)")
    parser.add_argument("--quick", action="store_true", help="1 warm-up round, 1 timed, the W1 mix only")
    args = parser.parse_args()
    if args.quick:
        args.warmup, args.rounds, args.scenario = 1, 1, ["w1"]
        args.out = args.out or str(Path(tempfile.gettempdir()) / "w3_cpu_quick.json")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [measure_epoch(args.rounds, args.warmup) if scenario == "epoch" else
               measure(scenario, args.rounds, args.warmup) for scenario in args.scenario]
    environment = common.environment("cpu", threads=torch.get_num_threads(),
                                     omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "(default)"))
    report = {"workload": "W3 (CPU)", "environment": environment, "results": results}
    common.write_json(report, args.out or common.default_out("w3", "cpu"))
    print(report["environment"])
    print("load average before/after: " + "; ".join(
        f"{r['scenario']}: {r['load_average_before'][0]:.1f} -> {r['load_average_after'][0]:.1f}" for r in results))
    steps = [r for r in results if r["scenario"] != "epoch"]
    if steps:
        print(table(steps))
    for r in results:
        if r["scenario"] == "epoch":
            print(f"epoch: {r['examples']} examples, {r['real_tokens']} real tokens, padding {r['padding_fraction']}")
            print(epoch_table(r))


if __name__ == "__main__":
    main()
