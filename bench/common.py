"""What the benchmark scripts share: the workload shapes, timing, the environment of a run, and its results file.

Run every script from the repository root as a module (`python -m bench.w1_encoder ...`): Python then imports
from the current folder, so `lit_fast` and `bench` import without an installed package and without path tricks.

- environment: `environment()` names the device, the torch / transformers / CUDA versions and the commit
  (`LIT_FAST_COMMIT` when set: a tree copied to the GPU machine may carry a stale `.git`);
- timing: `time_once_ms` (CUDA events around one call, then a wait for the end event; a host clock on the CPU),
  `time_ms` (warm-up, then one sample per call), `round_robin` (every variant once per round, in an order shuffled
  each round), `time_graph_us` (calls captured in one CUDA graph, per-launch time), `host_ms` (host time of a call);
- floors: `matmul_peak_tflops` (an 8192^3 bf16 matmul measured in the same run) and `copy_bandwidth` (device to
  device copy, read + write counted);
- the W1 / W6 encoder shapes and batches (`bert_base`, `bert_small`, `w1_lengths`, `w1_batch`, `encoder_flops`);
- results: `default_out` (bench/results/<stem>_<device>_<commit>.json, never an existing file's name by accident),
  `write_json`, and `markdown_table` for the table every script prints last.
"""

from __future__ import annotations

import json
import os
import platform
import random
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository root
RESULTS = ROOT / "bench" / "results"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


# ---- environment ---------------------------------------------------------------------------------------------
def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_commit() -> str:
    """The commit measured: LIT_FAST_COMMIT when set (a copied tree's .git may be stale), else git's short HEAD."""
    return os.environ.get("LIT_FAST_COMMIT") or _git("rev-parse", "--short", "HEAD") or "unknown"


def git_dirty() -> bool | None:
    """Whether lit_fast/ or bench/ differ from the commit (None when that cannot be told, e.g. LIT_FAST_COMMIT)."""
    if os.environ.get("LIT_FAST_COMMIT"):
        return None
    return bool(_git("status", "--porcelain", "--", "lit_fast", "bench"))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device | str | None = None) -> str:
    """The GPU's name (CUDA), else `CPU: <model>, <n> cores`."""
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {cpu_name()}, {os.cpu_count()} cores"


def device_tag(device: torch.device | str | None = None, name: str | None = None) -> str:
    """A short name for results files: h100, h200, a100, ... or cpu (of `name` when given, else of `device`)."""
    name = name or device_name(device)
    if name.startswith("CPU"):
        return "cpu"
    found = re.search(r"\b([A-Z]{1,2}\d{2,4})\b", name)
    return found[1].lower() if found else re.sub(r"[^a-z0-9]+", "", name.lower())[:12] or "gpu"


def gpu_name_from_smi() -> str:
    """The first GPU's name from nvidia-smi, for a parent process that must not touch CUDA itself (its children
    need the memory); "GPU" when nvidia-smi is not there."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out.splitlines()[0].strip() if out else "GPU"


def environment(device: torch.device | str | None = None, **extra) -> dict:
    """What a results file records about its run: device, versions, commit, date (and `extra`)."""
    try:
        import transformers
        transformers_version = transformers.__version__
    except ImportError:  # pragma: no cover
        transformers_version = None
    return {"device": device_name(device),
            "gpus_visible": torch.cuda.device_count() if torch.cuda.is_available() else 0,
            "torch": torch.__version__, "transformers": transformers_version, "cuda": torch.version.cuda,
            "python": platform.python_version(), "commit": git_commit(), "dirty": git_dirty(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), **extra}


# ---- timing --------------------------------------------------------------------------------------------------
def synchronize(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def time_once_ms(fn: Callable[[], object], cuda: bool | None = None) -> float:
    """One call in ms. CUDA: events around it, then a wait for the end event (device time of what it queued);
    elsewhere the host clock."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start_event.record()
    fn()
    end_event.record()
    end_event.synchronize()
    return start_event.elapsed_time(end_event)


def time_ms(fn: Callable[[], object], warmup: int, reps: int, cuda: bool | None = None) -> list[float]:
    """`warmup` untimed calls, then `reps` samples of `time_once_ms` (take the median)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return [time_once_ms(fn, cuda) for _ in range(reps)]


def median_ms(fn: Callable[[], object], warmup: int = 5, reps: int = 20, cuda: bool | None = None) -> float:
    return statistics.median(time_ms(fn, warmup, reps, cuda))


def round_robin(names: list[str], rounds: int, measure: Callable[[str], float], seed: int | None = 0
                ) -> dict[str, list[float]]:
    """`rounds` rounds of one `measure(name)` of every variant, so that a drift in clocks or host speed during the
    run falls on all of them alike. `seed`: the order is shuffled each round (seeded), so that no variant always
    runs right after the same one; None keeps the given order."""
    times: dict[str, list[float]] = {name: [] for name in names}
    order = list(names)
    shuffle = random.Random(seed).shuffle if seed is not None else None
    for _ in range(rounds):
        if shuffle is not None:
            shuffle(order)
        for name in order:
            times[name].append(measure(name))
    return times


def host_ms(fn: Callable[[], object], reps: int) -> float:
    """Median host time of one call after a device wait (it returns once its kernels are queued, or after its own
    waits for the device)."""
    samples = []
    for _ in range(reps):
        synchronize()
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    synchronize()
    return statistics.median(samples)


def capture_graph(fn: Callable[[], object], launches: int = 1) -> torch.cuda.CUDAGraph:
    """`launches` calls of `fn` as one CUDA graph, after one call on a side stream (lazy initialisation and
    compilation stay out of the graph)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    return graph


def time_graph_us(fn: Callable[[], object], launches: int = 20, warmup: int = 3, reps: int = 10) -> list[float]:
    """Per-launch us of `fn`: `launches` calls captured in one CUDA graph, `warmup` untimed replays, then `reps`
    timed replays (samples; take the median). Host launch costs are out of the picture."""
    graph = capture_graph(fn, launches)
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    samples = [time_once_ms(graph.replay, True) * 1e3 / launches for _ in range(reps)]
    del graph
    return samples


# ---- floors --------------------------------------------------------------------------------------------------
def matmul_peak_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16, device: str = "cuda") -> float:
    """TFLOP/s of an n^3 matmul measured now (the protocol's peak: 8192^3 bf16 on the GPU), median of 20."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = median_ms(lambda: a @ b, 5, 20, torch.device(device).type == "cuda")
    return 2 * n**3 / (ms * 1e-3) / 1e12


def copy_bandwidth(device: torch.device | str = "cuda", nbytes: int = 2 << 30) -> float:
    """Bytes/s of a device-to-device copy of `nbytes` (read + write counted), median of 10 after 3."""
    device = torch.device(device)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), 3, 10, device.type == "cuda")
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3)


# ---- the encoder workloads (W1 on the GPU, W6 on the CPU) ------------------------------------------------------
W1_BATCH, W1_MAX_LEN = 128, 256
# scenario -> (batch size, lengths drawn after torch.manual_seed(0)); right padding to W1_MAX_LEN
W1_SCENARIOS = {
    "pad0": (W1_BATCH, lambda: torch.full((W1_BATCH,), W1_MAX_LEN)),  # 0% padding
    "pad25": (W1_BATCH, lambda: torch.randint(128, 257, (W1_BATCH,))),  # ~24%
    "w1": (W1_BATCH, lambda: torch.randint(32, 257, (W1_BATCH,))),  # the W1 mix, ~43%
    "pad60": (W1_BATCH, lambda: torch.randint(32, 173, (W1_BATCH,))),  # ~61%
    "pad75": (W1_BATCH, lambda: torch.randint(32, 97, (W1_BATCH,))),  # ~75%
    "w1_batch8": (8, lambda: torch.randint(32, 257, (8,))),  # the W1 mix in a batch of 8: launch overhead shows
}
# not in a default run: the W1 mix at other batch sizes, where the host stops being the limit
W1_BATCH_SWEEP = {f"w1_batch{n}": (n, lambda n=n: torch.randint(32, 257, (n,))) for n in (1, 2, 4, 16, 32, 64)}
W1_ALL_SCENARIOS = {**W1_SCENARIOS, **W1_BATCH_SWEEP}


def bert_model(layers: int, hidden: int, heads: int, ffn: int, attention: str = "sdpa"):
    """A random-init BERT of this shape (seed 0, vocabulary 30522), in eval mode."""
    import transformers

    config = transformers.BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=ffn)
    config._attn_implementation = attention
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def bert_base():
    """W1's model: BERT-base shape (12 layers, hidden 768, 12 heads, FFN 3072)."""
    return bert_model(12, 768, 12, 3072)


def bert_small():
    """W6's model: BERT-small shape (4 layers, hidden 512, 8 heads, FFN 2048)."""
    return bert_model(4, 512, 8, 2048)


def w1_lengths(scenario: str = "w1") -> torch.Tensor:
    """The sequence lengths of a W1 scenario (drawn after torch.manual_seed(0))."""
    _, draw = W1_ALL_SCENARIOS[scenario]
    torch.manual_seed(0)
    return draw()


def w1_batch(scenario: str = "w1", device: torch.device | str = "cuda") -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of a W1 scenario: ids in [1000, 30000), right padding to 256."""
    lengths = w1_lengths(scenario)  # seeds, then draws the lengths; the ids follow from the same generator
    ids = torch.randint(1000, 30000, (len(lengths), W1_MAX_LEN))
    mask = (torch.arange(W1_MAX_LEN) < lengths[:, None]).long()
    return ids.to(device), mask.to(device)


def encoder_flops(mask: torch.Tensor, layers: int = 12, hidden: int = 768, ffn: int = 3072) -> float:
    """FLOPs of the real tokens through the encoder layers: the GEMMs and attention's QK^T and PV."""
    lengths = mask.sum(1).double()
    tokens = lengths.sum().item()
    gemms = tokens * 2 * (4 * hidden * hidden + 2 * hidden * ffn)
    attention = 4 * hidden * (lengths**2).sum().item()
    return layers * (gemms + attention)


# ---- results -------------------------------------------------------------------------------------------------
def default_out(stem: str, device: torch.device | str | None = None, suffix: str = "") -> str:
    """bench/results/<stem>_<device tag><suffix>_<commit>.json (e.g. w1_h200_c3e80e2.json)."""
    return str(RESULTS / f"{stem}_{device_tag(device)}{suffix}_{git_commit()}.json")


def write_json(report: dict, path: str | Path, quiet: bool = False) -> None:
    """Write `report` to `path` (folders made; written to a temporary name first, so a run cut short never leaves
    half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, path)
    if not quiet:
        print(f"wrote {path}", flush=True)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table (what every script prints last)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join("" if cell is None else str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
