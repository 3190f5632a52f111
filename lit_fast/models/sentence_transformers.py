"""What a sentence-transformers model says about itself, read the same way from a local folder and from a hub id.

A sentence-transformers model is a Hugging Face model plus files that change its vectors: `modules.json` (the module
chain), each module's `config.json` (pooling modes, Dense layers and their weights, Normalize),
`sentence_bert_config.json` (maximum length and lower-casing, in the older format) and
`config_sentence_transformers.json` (prompts). `read_sentence_transformer` turns them into a `SentenceTransformerSpec`;
anything in them that would change the vectors and that lit_fast does not reproduce is an error, never a silently
different vector.

For a hub id the files come from the local cache the weights come from (`loading.hub_file`). A model that is cached
without its sentence-transformers files cannot be read right: that is an error too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from lit_fast.errors import ConfigError
from lit_fast.models.loading import hub_file

POOLING_MODES = ("cls", "mean", "max", "mean_sqrt_len", "weightedmean", "lasttoken")
# the names older sentence-transformers saved: pooling_mode_<key> -> our mode, in the order it concatenates them
_LEGACY_POOLING = {"cls_token": "cls", "max_tokens": "max", "mean_tokens": "mean",
                   "mean_sqrt_len_tokens": "mean_sqrt_len", "weightedmean_tokens": "weightedmean",
                   "lasttoken": "lasttoken"}
_NEW_POOLING = {"cls": "cls", "max": "max", "mean": "mean", "mean_sqrt_len_tokens": "mean_sqrt_len",
                "weightedmean": "weightedmean", "lasttoken": "lasttoken"}
# activations a Dense module may name (torch dotted paths as sentence-transformers saves them)
ACTIVATIONS = {"torch.nn.modules.activation.Tanh": torch.nn.Tanh, "torch.nn.modules.linear.Identity": torch.nn.Identity,
               "torch.nn.modules.activation.ReLU": torch.nn.ReLU, "torch.nn.modules.activation.GELU": torch.nn.GELU,
               "torch.nn.modules.activation.Sigmoid": torch.nn.Sigmoid}


@dataclass(frozen=True)
class DenseSpec:
    """A Dense module: `activation(x @ weight.T + bias)`."""

    weight: torch.Tensor  # (out_features, in_features)
    bias: Optional[torch.Tensor]
    activation: str  # a key of ACTIVATIONS


@dataclass(frozen=True)
class SentenceTransformerSpec:
    """The parts of a sentence-transformers model that shape its vectors, after the transformer."""

    pooling: tuple[str, ...] = ("mean",)  # concatenated in this order when several
    include_prompt: bool = True  # False: prompt tokens are left out of the pooling
    dense: tuple[DenseSpec, ...] = ()
    normalize: bool = False
    max_length: Optional[int] = None  # the older format's max_seq_length (newer ones keep it in the tokenizer)
    lower_case: bool = False
    prompts: dict = field(default_factory=dict)  # name -> text put before each input
    default_prompt_name: Optional[str] = None


def read_sentence_transformer(source: str, revision: Optional[str] = None) -> Optional[SentenceTransformerSpec]:
    """The spec of the model at `source` (a local folder or a hub id), or None when it has no `modules.json` (a plain
    transformers model: sentence-transformers then mean-pools, and so does the Embedder)."""
    modules_file = hub_file(source, "modules.json", revision)
    if modules_file is None:
        return None
    modules = json.loads(modules_file.read_text())
    spec: dict = {"dense": []}
    for position, module in enumerate(modules):
        kind = module.get("type", "").rsplit(".", 1)[-1]
        folder = module.get("path", "")
        where = f"{source}: module {position} ({module.get('type')})"
        if kind == "Transformer":
            if position != 0:
                raise ConfigError(f"{where}: the transformer is not the first module; lit_fast cannot reproduce this "
                                  "model's vectors")
        elif kind == "Pooling":
            spec.update(_pooling(_config(source, folder, revision, where), where))
        elif kind == "Dense":
            spec["dense"].append(_dense(source, folder, revision, where))
        elif kind == "Normalize":
            if position != len(modules) - 1:
                raise ConfigError(f"{where}: Normalize is not the last module; lit_fast normalises last")
            spec["normalize"] = True
        else:
            raise ConfigError(f"{where}: lit_fast's embedder reproduces Transformer, Pooling, Dense and Normalize "
                              "modules only; this model's vectors would differ. Use sentence-transformers for it")
    if "pooling" not in spec:
        raise ConfigError(f"{source}: modules.json has no Pooling module; lit_fast cannot tell how to pool")
    bert_config = hub_file(source, "sentence_bert_config.json", revision)
    if bert_config is not None:
        config = json.loads(bert_config.read_text())
        if config.get("max_seq_length"):
            spec["max_length"] = int(config["max_seq_length"])
        spec["lower_case"] = bool(config.get("do_lower_case", False))
    st_config = hub_file(source, "config_sentence_transformers.json", revision)
    if st_config is not None:
        config = json.loads(st_config.read_text())
        spec["prompts"] = {name: text for name, text in (config.get("prompts") or {}).items()}
        spec["default_prompt_name"] = config.get("default_prompt_name")
    spec["dense"] = tuple(spec["dense"])
    return SentenceTransformerSpec(**spec)


def _config(source: str, folder: str, revision: Optional[str], where: str) -> dict:
    path = hub_file(source, f"{folder}/config.json" if folder else "config.json", revision)
    if path is None:
        raise ConfigError(f"{where}: its config.json is missing")
    return json.loads(path.read_text())


def _pooling(config: dict, where: str) -> dict:
    """Pooling modes from either format: `pooling_mode` (a name or a list) or `pooling_mode_<mode>: true` flags."""
    if "pooling_mode" in config:
        given = config["pooling_mode"]
        names = [given] if isinstance(given, str) else list(given)
        unknown = [n for n in names if n not in _NEW_POOLING]
        if unknown:
            raise ConfigError(f"{where}: pooling mode(s) {unknown} are not reproduced by lit_fast "
                              f"(it knows {sorted(_NEW_POOLING)})")
        modes = tuple(_NEW_POOLING[n] for n in names)
    else:
        flags = {k[len("pooling_mode_"):]: v for k, v in config.items() if k.startswith("pooling_mode_") and v}
        unknown = [k for k in flags if k not in _LEGACY_POOLING]
        if unknown:
            raise ConfigError(f"{where}: pooling mode(s) {unknown} are not reproduced by lit_fast")
        modes = tuple(mode for key, mode in _LEGACY_POOLING.items() if key in flags) or ("mean",)
    return {"pooling": modes, "include_prompt": bool(config.get("include_prompt", True))}


def _dense(source: str, folder: str, revision: Optional[str], where: str) -> DenseSpec:
    config = _config(source, folder, revision, where)
    activation = config.get("activation_function", "torch.nn.modules.activation.Tanh")
    if activation not in ACTIVATIONS:
        raise ConfigError(f"{where}: activation {activation} is not one lit_fast reproduces ({sorted(ACTIVATIONS)})")
    weights = hub_file(source, f"{folder}/model.safetensors", revision)
    if weights is not None:
        from safetensors.torch import load_file

        state = load_file(str(weights))
    else:
        weights = hub_file(source, f"{folder}/pytorch_model.bin", revision)
        if weights is None:
            raise ConfigError(f"{where}: no weights (model.safetensors or pytorch_model.bin) in {folder}")
        from lit_fast.models.loading import load_tensors

        state = load_tensors(str(weights))
    weight, bias = state.get("linear.weight"), state.get("linear.bias")
    if weight is None or tuple(weight.shape) != (config["out_features"], config["in_features"]):
        raise ConfigError(f"{where}: its weights do not match in_features {config.get('in_features')} and "
                          f"out_features {config.get('out_features')}")
    if config.get("bias", True) and bias is None:
        raise ConfigError(f"{where}: bias is on but the weights have none")
    return DenseSpec(weight, bias if config.get("bias", True) else None, activation)


def write_sentence_transformer(folder: Path, spec: SentenceTransformerSpec, hidden_size: int) -> None:
    """The sentence-transformers files of `spec` in `folder` (beside an exported HF model), in the format every
    sentence-transformers version since 2 reads."""
    from safetensors.torch import save_file

    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]

    def add(kind: str) -> Path:
        index = len(modules)
        path = f"{index}_{kind}"
        modules.append({"idx": index, "name": str(index), "path": path, "type": f"sentence_transformers.models.{kind}"})
        (folder / path).mkdir(exist_ok=True)
        return folder / path

    pooling = {"word_embedding_dimension": hidden_size,
               **{f"pooling_mode_{key}": mode in spec.pooling for key, mode in _LEGACY_POOLING.items()}}
    if not spec.include_prompt:
        pooling["include_prompt"] = False
    (add("Pooling") / "config.json").write_text(json.dumps(pooling, indent=2))
    for dense in spec.dense:
        out_features, in_features = dense.weight.shape
        path = add("Dense")
        (path / "config.json").write_text(json.dumps({"in_features": in_features, "out_features": out_features,
                                                      "bias": dense.bias is not None,
                                                      "activation_function": dense.activation}, indent=2))
        state = {"linear.weight": dense.weight.detach().contiguous().cpu()}
        if dense.bias is not None:
            state["linear.bias"] = dense.bias.detach().contiguous().cpu()
        save_file(state, str(path / "model.safetensors"))
    if spec.normalize:
        add("Normalize")
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": spec.max_length, "do_lower_case": spec.lower_case}, indent=2))
    if spec.prompts or spec.default_prompt_name:
        (folder / "config_sentence_transformers.json").write_text(json.dumps(
            {"prompts": spec.prompts, "default_prompt_name": spec.default_prompt_name}, indent=2))
