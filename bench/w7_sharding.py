"""W7 (issue 7): sharded fine-tuning (FSDP) and tensor-parallel generation of a Llama-8B shape on 1..N GPUs.

    # 2 x H200, about 6 minutes (--budget 540 s: runs that would not fit are skipped); --out e.g. $OUT/...
    LIT_FAST_COMMIT=<sha> python -m bench.w7_sharding --devices 1 2 --out $OUT/w7_sharding.json --workdir $OUT/w7_logs
    # CPU smoke run of the script (tiny Llama, gloo, 1 and 2 processes, fp32), about 75 s on 2 cores
    .venv/bin/python -m bench.w7_sharding --tiny --accelerator cpu --out /tmp/w7_tiny.json

Each run is its own process group (torchrun --standalone -m bench.w7_sharding --child ..., a JSON file per rank); the results file is rewritten
after every run, so a run cut short keeps what it measured. Parts (--only): fsdp, lora, tp.

fsdp / lora (rank 16, alpha 32, all-linear): Llama-8B shape, sequence 2048, micro-batch 1 per GPU, random token
  ids; Trainer + FSDPStrategy(FULL_SHARD) + bf16-mixed (fp32 master weights: full FT holds 16 B/param, 128 GB over
  all GPUs) + gradient checkpointing, as configs/finetune-fsdp.yaml. A thin LightningModule (lit_fast.CausalLM
  needs a checkpoint and a tokenizer) does in configure_model what the product does: lit_fast.models.lora.apply_lora,
  lit_fast.models.sharding.configure_fsdp (a unit per decoder layer, LoRA A/B leaves as units of their own), activation
  checkpointing as LitTransformer. No checkpoint is read (the product's rank 0 reads one and broadcasts it): every
  rank builds on the meta device and FSDP's param_init_fn fills each unit on its GPU with N(0, 0.02), norms 1,
  RoPE buffers recomputed, LoRA B random too (GEMMs on zeros run faster). AdamW (fused). N=1 is FSDPStrategy on
  one GPU (run as NO_SHARD). Step: median of --steps after --warmup, forward + backward + optimizer between cuda
  synchronizes; peak memory per rank from training start (optimizer state included). MFU = F * tokens/s /
  (N * 989 TFLOP/s), F = 4 P + 2 T + 6 L S H per token: forward and backward-to-activations over the matmul
  parameters P (all but the input embedding), backward-to-weights over the trainable ones T (P for full FT, the
  adapters for LoRA), causal attention (L layers, S sequence, H hidden); recomputation not counted.

tp: greedy, 8 prompts x 128 random token ids, 128 new tokens (no EOS), bf16, through Trainer.predict. 1 GPU: the
  product's plain path (strategy auto, bf16-true). N GPUs: ModelParallelStrategy, weights loaded as for
  configs/generate-tp.yaml: load_pretrained(**sharding.tensor_parallel_kwargs()), i.e. from_pretrained(tp_plan=
  "auto", device_mesh=...), then transformers generate (decoding: hf). One child writes a seeded random checkpoint
  once (16 GB, in a temp dir, deleted afterwards) that every run loads. Reported: tokens/s (median of --gen-reps
  calls after a warm-up) and the N-GPU tokens against 1 GPU: identical positions, identical rows, the first
  position where a row differs. Tensor parallelism sums partial products in another order: in bf16 a near-tie can
  flip and the row then goes its own way; the same check in fp32 on a small shape tells rounding from a real bug.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from bench import common
from bench.common import ROOT

T0 = time.perf_counter()
GIB = 2**30
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
SHAPES = {
    "llama-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=14336, vocab_size=128256),
    "small": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                  intermediate_size=1408, vocab_size=32000),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512),
}


def llama_config(shape: str):
    from transformers import LlamaConfig

    # no EOS: random weights would end rows at random; every row generates all its new tokens
    return LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, tie_word_embeddings=False,
                       bos_token_id=None, eos_token_id=None, pad_token_id=None)


# ---- children: a fine-tune run, a generation run, a checkpoint --------------------------------------------------
def _random_init(module, device, std: float) -> None:
    """FSDP param_init_fn: put one meta module on its device and fill it (unit by unit, before sharding)."""
    import torch

    module.to_empty(device=device, recurse=False)
    with torch.no_grad():
        for name, p in module.named_parameters(recurse=False):
            if p.ndim >= 2:
                p.normal_(0.0, std)
            elif name == "bias":
                p.zero_()
            else:
                p.fill_(1.0)  # norm weights
        if hasattr(module, "inv_freq"):  # rotary embedding: computed buffers; rebuild on the CPU and copy
            for name, b in type(module)(module.config).named_buffers(recurse=False):
                getattr(module, name).copy_(b)


def child_train(spec: dict) -> None:
    import lightning as L
    import torch
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel
    from transformers import AutoModelForCausalLM

    from lit_fast.models import sharding
    from lit_fast.models.lora import LoraSettings, apply_lora

    cuda = spec["accelerator"] == "gpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    class Train(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model, self.losses, self.counts, self.times, self.start = None, [], {}, [], 0.0

        def configure_model(self):
            if self.model is not None:
                return
            config = llama_config(spec["shape"])
            with torch.device("meta"):  # on every rank: no weights in host memory
                model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
            if spec["lora"]:
                settings = LoraSettings(rank=16, alpha=32, dropout=0.05, target_modules="all-linear")
                model = apply_lora(model, settings, "CAUSAL_LM")
            embed = model.get_input_embeddings().weight
            self.counts = {"total": sum(p.numel() for p in model.parameters()), "embedding": embed.numel(),
                           "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                           "embedding_trainable": embed.requires_grad, "layers": config.num_hidden_layers,
                           "hidden": config.hidden_size}
            strategy = self.trainer.strategy
            # the product's wrap policy and LoRA flags (lora.fsdp_units: separate or blocks)
            sharding.configure_fsdp(strategy, model, spec.get("lora_units", "separate"))
            strategy.kwargs["param_init_fn"] = partial(_random_init, device=strategy.root_device,
                                                       std=config.initializer_range)
            kwargs = {"use_reentrant": False}  # as LitTransformer.configure_model
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            self.model = model

        def training_step(self, batch, batch_idx):
            loss = self.model(input_ids=batch, attention_mask=torch.ones_like(batch), labels=batch).loss
            self.losses.append(loss.detach())
            return loss

        def configure_optimizers(self):  # as LitTransformer's, with CausalLM's weight_decay 0
            params = [p for p in self.model.parameters() if p.requires_grad]
            return torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, fused=cuda or None)

        def on_train_start(self):
            if cuda:
                torch.cuda.reset_peak_memory_stats()

        def on_train_batch_start(self, batch, batch_idx):
            sync()
            self.start = time.perf_counter()

        def on_train_batch_end(self, outputs, batch, batch_idx):  # after the optimizer step
            sync()
            self.times.append(time.perf_counter() - self.start)

    class CPUSmokeFSDP(FSDPStrategy):
        """Smoke run only: Lightning refuses FSDPStrategy on CPU (by exact type, so a subclass passes) and gives
        torch's FSDP device_id=None there, for which FSDP wants an accelerator; with device_id=cpu it runs on gloo."""

        def _setup_model(self, model):
            model = FullyShardedDataParallel(module=model, sharding_strategy=self.sharding_strategy,
                                             mixed_precision=self.mixed_precision_config,
                                             device_id=torch.device("cpu"), **self.kwargs)
            self.kwargs.pop("auto_wrap_policy", None)  # applied just now (Lightning would warn it is ignored)
            return super()._setup_model(model)

    n, total, rank = spec["n"], spec["warmup"] + spec["steps"], int(os.environ.get("RANK", "0"))
    torch.manual_seed(1234 + rank)
    data = torch.randint(0, SHAPES[spec["shape"]]["vocab_size"], (total * n * spec["micro_batch"], spec["seq"]),
                         generator=torch.Generator().manual_seed(0))
    strategy = (FSDPStrategy if cuda else CPUSmokeFSDP)(sharding_strategy="FULL_SHARD", state_dict_type="full")
    trainer = L.Trainer(accelerator=spec["accelerator"], devices=n, strategy=strategy, precision=spec["precision"],
                        max_steps=total, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    module = Train()
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=spec["micro_batch"]))  # dealt over ranks
    losses = [float(x) for x in module.losses]
    wrap = {"fsdp_units": sum(isinstance(m, FullyShardedDataParallel) for m in trainer.strategy.model.modules()),
            # this rank's share of what AdamW updates (summed over ranks: the trainable count, plus padding)
            "optimizer_numel_local": sum(p.numel() for g in trainer.optimizers[0].param_groups for p in g["params"])}
    out = {"step_s": module.times, "counts": module.counts, "wrap": wrap, "loss_first": losses[0],
           "loss_last": losses[-1], "device": torch.cuda.get_device_name() if cuda else "cpu",
           "mem_alloc_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
           "mem_reserved_gib": torch.cuda.max_memory_reserved() / GIB if cuda else None}
    Path(f"{spec['result']}.rank{rank}.json").write_text(json.dumps(out))


def child_save(spec: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda" if spec["accelerator"] == "gpu" else "cpu"):  # init on the GPU: seconds for 8B
        model = AutoModelForCausalLM.from_config(llama_config(spec["shape"]), dtype=getattr(torch, spec["dtype"]))
    model.save_pretrained(spec["dir"])


def child_generate(spec: dict) -> None:
    import lightning as L
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy
    from transformers import AutoModelForCausalLM

    from lit_fast.models import sharding
    from lit_fast.fastpath.decoder.loop import SamplingConfig, hf_generate
    from lit_fast.models.loading import load_pretrained

    cuda = spec["accelerator"] == "gpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    class Generate(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model, self.result = None, {}

        def configure_model(self):  # LitTransformer.build_model without the task's extras
            if self.model is None:
                strategy = self.trainer.strategy
                extra = sharding.tensor_parallel_kwargs(strategy) if sharding.is_model_parallel(strategy) else {}
                self.model = load_pretrained(spec["dir"], AutoModelForCausalLM, dtype=spec["dtype"],
                                             attention="sdpa", **extra)

        def predict_step(self, batch, batch_idx):
            cfg, mask, times = SamplingConfig(max_new_tokens=spec["new_tokens"]), torch.ones_like(batch), []
            hf_generate(self.model, batch, mask, cfg)  # warm-up
            for _ in range(spec["reps"]):
                sync()
                start = time.perf_counter()
                new = hf_generate(self.model, batch, mask, cfg)
                sync()
                times.append(time.perf_counter() - start)
            self.result = {"gen_s": times, "tokens": new.tolist()}

    n = spec["n"]
    prompts = torch.randint(0, SHAPES[spec["shape"]]["vocab_size"], (spec["batch"], spec["prompt"]),
                            generator=torch.Generator().manual_seed(0))
    strategy = ModelParallelStrategy(tensor_parallel_size=n, data_parallel_size=1) if n > 1 else "auto"
    trainer = L.Trainer(accelerator=spec["accelerator"], devices=n, strategy=strategy, logger=False,
                        precision="bf16-true" if spec["dtype"] == "bfloat16" else "32-true",
                        enable_progress_bar=False, enable_model_summary=False)
    module = Generate()
    trainer.predict(module, torch.utils.data.DataLoader(prompts, batch_size=spec["batch"]), return_predictions=False)
    out = {**module.result, "device": torch.cuda.get_device_name() if cuda else "cpu",
           "mem_alloc_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None}
    Path(f"{spec['result']}.rank{trainer.global_rank}.json").write_text(json.dumps(out))


# ---- parent: launch, collect, compare, report -------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - T0:4.0f}s] {msg}", flush=True)


def _descendants(pid: int) -> list[int]:
    """Ids of the processes below `pid` (from /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:  # field 4: the parent's id
                children.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue  # a process that ended meanwhile
    return children + [d for c in children for d in _descendants(c)]


def launch(name: str, role: str, spec: dict, n: int, args, deadline: float) -> dict:
    """One child (torchrun with n ranks; `save` alone): its per-rank results, or an error with the log's tail."""
    left = deadline - time.time()
    if left < 20:
        log(f"{name}: skipped (time budget spent)")
        return {"error": "skipped (budget)"}
    spec = {**spec, "n": n, "result": str(args.workdir / name), "accelerator": args.accelerator}
    # the children run this module from the repository root (cwd), so that `bench` and `lit_fast` import
    script = ["-m", "bench.w7_sharding", "--child", role, "--spec", json.dumps(spec)]
    cmd = [sys.executable, *script] if role == "save" else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *script]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.accelerator == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")
    log(f"{name}: start ({n} process(es))")
    start, logfile = time.perf_counter(), args.workdir / f"{name}.log"
    with open(logfile, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            rc = proc.wait(timeout=left)
        except subprocess.TimeoutExpired:  # torchrun starts each rank in a session of its own: kill them by id
            for pid in [proc.pid, *_descendants(proc.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
            rc = "timeout"
    wall = time.perf_counter() - start
    ranks = [json.loads(p.read_text()) for p in sorted(args.workdir.glob(f"{name}.rank*.json"))]
    if rc != 0 or (role != "save" and len(ranks) != n):
        tail = logfile.read_text()[-3000:]
        oom = "out of memory" in logfile.read_text().lower()
        log(f"{name}: FAILED (rc {rc}{', OOM' if oom else ''}) after {wall:.0f} s; log tail:\n{tail}")
        return {"error": f"rc {rc}" + (" (OOM)" if oom else ""), "wall_s": wall, "log_tail": tail}
    log(f"{name}: done in {wall:.0f} s")
    return {"wall_s": wall, "ranks": ranks}


def summarize_train(r: dict, n: int, args) -> dict:
    if "error" in r:
        return {"devices": n, **r}
    ranks, c = r["ranks"], r["ranks"][0]["counts"]
    step = statistics.median(ranks[0]["step_s"][args.warmup:])
    tokens_s = n * args.micro_batch * args.seq / step
    matmul = c["total"] - c["embedding"]
    trainable = c["trainable"] - (c["embedding"] if c["embedding_trainable"] else 0)
    flops = 4 * matmul + 2 * trainable + 6 * c["layers"] * args.seq * c["hidden"]
    return {"devices": n, "wall_s": r["wall_s"], "device": ranks[0]["device"], "step_s_median": step,
            "step_s_all": ranks[0]["step_s"], "tokens_per_s": tokens_s, "tokens_per_s_per_device": tokens_s / n,
            "mfu": flops * tokens_s / (n * args.peak_tflops * 1e12) if args.accelerator == "gpu" else None,
            "flops_per_token": flops, "params": c, "wrap_per_rank": [x["wrap"] for x in ranks],
            "peak_alloc_gib_per_rank": [x["mem_alloc_gib"] for x in ranks],
            "peak_reserved_gib_per_rank": [x["mem_reserved_gib"] for x in ranks],
            "loss_first": ranks[0]["loss_first"], "loss_last": ranks[0]["loss_last"]}


def compare_tokens(ref: list, other: list) -> dict:
    """Position-wise agreement and, per row, the length of the common prefix (where greedy decoding parted)."""
    same = sum(a == b for ra, rb in zip(ref, other) for a, b in zip(ra, rb))
    prefix = [next((i for i, (a, b) in enumerate(zip(ra, rb)) if a != b), len(ra)) for ra, rb in zip(ref, other)]
    return {"identical_fraction": same / sum(map(len, ref)), "rows": len(ref),
            "rows_identical": sum(p == len(r) for p, r in zip(prefix, ref)),
            "first_divergence": min(prefix) if min(prefix) < len(ref[0]) else None, "common_prefix_per_row": prefix}


def summarize_gen(r: dict, n: int, ref: dict | None, args) -> dict:
    if "error" in r:
        return {"devices": n, **r}
    rank0 = r["ranks"][0]
    gen = statistics.median(rank0["gen_s"])
    out = {"devices": n, "wall_s": r["wall_s"], "device": rank0["device"], "gen_s_median": gen,
           "gen_s_all": rank0["gen_s"], "tokens_per_s": args.batch * args.new_tokens / gen,
           "ms_per_step": 1000 * gen / args.new_tokens,
           "peak_alloc_gib_per_rank": [x["mem_alloc_gib"] for x in r["ranks"]],
           "ranks_agree": all(x["tokens"] == rank0["tokens"] for x in r["ranks"]), "tokens": rank0["tokens"]}
    if ref is not None:
        out["vs_1_device"] = compare_tokens(ref["tokens"], rank0["tokens"])
    return out


def print_tables(record: dict) -> None:
    def gib(values):
        return "n/a" if None in values else f"{max(values):.1f}"

    print(f"\nW7 on {record['device']} | torch {record['torch']}, transformers {record['transformers']}, lightning "
          f"{record['lightning']}, peft {record['peft']} | commit {record['commit']} | {record['protocol']}\n")
    print("| part | GPUs | tokens/s | tokens/s/GPU | scaling | step s | MFU | peak alloc GiB/GPU | peak reserved "
          "GiB/GPU | loss first->last |\n|---|---|---|---|---|---|---|---|---|---|")
    for part in ("fsdp", "lora"):
        rows = record["parts"].get(part, [])
        base = next((r for r in rows if "tokens_per_s" in r), None)
        for r in rows:
            if "error" in r:
                print(f"| {part} | {r['devices']} | {r['error']} | | | | | | | |")
                continue
            mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
            print(f"| {part} | {r['devices']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_device']:,.0f} | "
                  f"{r['tokens_per_s_per_device'] / base['tokens_per_s_per_device']:.0%} | {r['step_s_median']:.3f} "
                  f"| {mfu} | {gib(r['peak_alloc_gib_per_rank'])} | {gib(r['peak_reserved_gib_per_rank'])} | "
                  f"{r['loss_first']:.3f}->{r['loss_last']:.3f} |")
    print("\n| generation | GPUs | tokens/s | ms/step | peak alloc GiB/GPU | ranks agree | identical vs 1 GPU "
          "| rows identical | first divergence |\n|---|---|---|---|---|---|---|---|---|")
    for part in ("tp", "tp_fp32_check"):
        for r in record["parts"].get(part, []):
            if "error" in r:
                print(f"| {part} | {r['devices']} | {r['error']} | | | | | | |")
                continue
            c = r.get("vs_1_device")
            first = c and ("none" if c["first_divergence"] is None else c["first_divergence"])
            check = "- | - | -" if c is None else \
                f"{c['identical_fraction']:.1%} | {c['rows_identical']}/{c['rows']} | {first}"
            print(f"| {part} ({r['dtype']}) | {r['devices']} | {r['tokens_per_s']:,.0f} | {r['ms_per_step']:.1f} | "
                  f"{gib(r['peak_alloc_gib_per_rank'])} | {r['ranks_agree']} | {check} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2], help="GPU counts to run, e.g. 1 2 4")
    p.add_argument("--only", nargs="+", choices=["fsdp", "lora", "tp"], default=["fsdp", "lora", "tp"])
    p.add_argument("--accelerator", default="gpu", choices=["gpu", "cpu"])
    p.add_argument("--tiny", action="store_true", help="smoke test: tiny Llama, seq 64, 1+2 steps, 2 x 8 prompt, 8 new")
    p.add_argument("--precision", default=None, help="fine-tune precision (default bf16-mixed; on CPU 32-true)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per step")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="timed fine-tune steps")
    p.add_argument("--batch", type=int, default=8, help="generation: prompts")
    p.add_argument("--prompt", type=int, default=128, help="generation: prompt tokens")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--gen-reps", type=int, default=2, help="timed generate calls after one warm-up")
    p.add_argument("--lora-units", choices=["separate", "blocks"], default="separate",
                   help="lora: lora.fsdp_units, A/B as FSDP units of their own (the default) or inside their block's unit")
    p.add_argument("--no-fp32-check", action="store_true", help="skip the fp32 small-shape token check")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H200: 989)")
    p.add_argument("--budget", type=float, default=540, help="seconds for everything; runs past it are skipped")
    p.add_argument("--workdir", default=None, help="child logs and per-rank JSON, kept (default: a new temp dir)")
    p.add_argument("--out", help="results JSON (default bench/results/w7_<device>x<N>_<commit>.json; --tiny: the "
                                 "temp dir)")
    p.add_argument("--child", choices=["train", "generate", "save"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        import logging

        logging.basicConfig(level=logging.WARNING)
        logging.getLogger("lit_fast").setLevel(logging.INFO)  # its wrap, LoRA and tensor-parallel lines
        child = {"train": child_train, "generate": child_generate, "save": child_save}[args.child]
        return child(json.loads(args.spec))

    for key, value in NCCL_ENV.items():  # inherited by every child
        os.environ.setdefault(key, value)
    shape = "tiny" if args.tiny else "llama-8b"
    if args.tiny:
        args.seq, args.warmup, args.steps, args.batch = min(args.seq, 64), 1, 2, min(args.batch, 2)
        args.prompt, args.new_tokens, args.gen_reps = min(args.prompt, 8), min(args.new_tokens, 8), 1
    args.precision = args.precision or ("32-true" if args.accelerator == "cpu" else "bf16-mixed")
    gen_dtype = "float32" if args.accelerator == "cpu" else "bfloat16"
    args.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="w7_"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.budget

    from importlib.metadata import distributions

    versions = {m: next((d.version for d in distributions(name=m)), "?") for m in ("torch", "transformers", "lightning",
                                                                                     "peft")}
    record = {"workload": "W7", "device": "?", **versions,
              "python": platform.python_version(), "platform": platform.platform(),
              "commit": common.git_commit(), "shape": shape,
              "devices": args.devices, "nccl_env": {k: os.environ[k] for k in NCCL_ENV},
              "peak_tflops": args.peak_tflops,
              "protocol": f"fine-tune: seq {args.seq}, micro-batch {args.micro_batch}/GPU, {args.precision}, grad "
                          f"ckpt, warm-up {args.warmup}, median of {args.steps} steps; generate: {args.batch} x "
                          f"{args.prompt} prompt, {args.new_tokens} new, greedy, {gen_dtype}, "
                          f"median of {args.gen_reps}",
              "mfu_formula": "(4 P + 2 T + 6 L S H) * tokens/s / (N * peak); P: matmul params (all but the input "
                             "embedding), T: trainable matmul params; recompute not counted", "parts": {}}
    if args.tiny:  # a smoke test, not a measurement: never into bench/results by default
        args.out = args.out or str(Path(tempfile.gettempdir()) / "w7_tiny.json")
    tag = "cpu" if args.accelerator == "cpu" else \
        f"{common.device_tag(name=common.gpu_name_from_smi())}x{max(args.devices)}"
    out = Path(args.out or common.RESULTS / f"w7_{tag}_{record['commit']}.json")

    def save(part: str, rows: list) -> None:
        record["parts"][part] = rows
        record["device"] = next((r["device"] for r in rows if "device" in r), record["device"])
        common.write_json(record, out, quiet=True)

    train = {"shape": shape, "seq": args.seq, "micro_batch": args.micro_batch, "warmup": args.warmup,
             "steps": args.steps, "precision": args.precision, "lora_units": args.lora_units}
    for part in [x for x in ("fsdp", "lora") if x in args.only]:
        rows = []
        for n in args.devices:
            rows.append(summarize_train(launch(f"{part}-{n}", "train", {**train, "lora": part == "lora"}, n, args,
                                               deadline), n, args))
            save(part, rows)

    checks = [("tp", shape, gen_dtype)]
    if not (args.no_fp32_check or args.tiny):  # on CPU the main run is fp32 already
        checks.append(("tp_fp32_check", "small", "float32"))
    for part, gen_shape, dtype in (checks if "tp" in args.only else []):
        directory = Path(tempfile.mkdtemp(prefix=f"w7_ckpt_{gen_shape}_"))  # not in --workdir: 16 GB
        spec = {"shape": gen_shape, "dtype": dtype, "dir": str(directory), "batch": args.batch,
                "prompt": args.prompt, "new_tokens": args.new_tokens, "reps": args.gen_reps}
        saved = launch(f"{part}-save", "save", spec, 1, args, deadline)
        if "error" in saved:
            save(part, [{"devices": "save", "dtype": dtype, **saved}])
            continue
        rows, ref = [], None
        for n in args.devices:
            row = {**summarize_gen(launch(f"{part}-{n}", "generate", spec, n, args, deadline), n, ref, args),
                   "dtype": dtype, "shape": gen_shape}
            ref = row if n == 1 and "tokens" in row else ref
            rows.append(row)
            save(part, rows)
        shutil.rmtree(directory, ignore_errors=True)

    log(f"results in {out}; child logs in {args.workdir}")
    print_tables(record)


if __name__ == "__main__":
    main()
