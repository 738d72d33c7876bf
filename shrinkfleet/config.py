"""The fleet definition (``params.yaml``) as a strict, typed schema.

``params.yaml`` has one section per stage holding the fleet-wide defaults, a ``datasets:``
mapping and a ``models:`` mapping keyed by model name. Each model names its dataset, its
teacher and student architectures and, per stage, the settings it overrides (a section it
leaves out takes the fleet's). DVC tracks each ``models.<name>.<stage>`` key on its own (see
:mod:`shrinkfleet.pipeline`): editing one model's ``prune`` settings re-runs only that
model's prune and later stages, never its teacher.

``models`` is a mapping, not a list: a model is named by its key everywhere (DVC stages
``teacher-digits-cnn``, MLflow runs, registered models), so reordering the fleet changes nothing.

Errors name the key path (``models.digits-cnn.prune.target_sparsity``), say what is
allowed and are raised before any work starts.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import typing
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
QUANT_MODES = ("float32", "float16", "dynamic", "int8")
SKLEARN_SETS = ("digits", "breast_cancer", "wine", "iris")


class ConfigError(ValueError):
    """params.yaml (or a value derived from it) is invalid; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------- data


class SplitConfig(_Strict):
    """How every dataset is split into train/val/test."""

    val_fraction: float = Field(
        0.15, gt=0, lt=0.5, description="Share of the training pool held out for validation."
    )
    test_fraction: float = Field(
        0.2,
        gt=0,
        lt=0.5,
        description="Share of the data held out for testing when the source has no test split.",
    )


class _DatasetBase(_Strict):
    features: FeatureConfig = Field(
        default_factory=lambda: FeatureConfig(), description="Feature selection/extraction (tabular only)."
    )
    limit: int | None = Field(
        None, gt=0, description="Keep at most this many training samples (stratified); null keeps all."
    )
    limit_test: int | None = Field(
        None, gt=0, description="Keep at most this many test samples (stratified); null keeps all."
    )


class SklearnDataset(_DatasetBase):
    """A dataset bundled with scikit-learn (no download)."""

    source: Literal["sklearn"] = "sklearn"
    name: Literal["digits", "breast_cancer", "wine", "iris"] = Field(
        description="Which bundled set: digits (8x8 images) or a tabular set."
    )


class MnistDataset(_DatasetBase):
    """MNIST (or Fashion-MNIST) in the original IDX gz files."""

    source: Literal["mnist"] = "mnist"
    path: str = Field(description="Folder holding *-images-idx3-ubyte.gz and *-labels-idx1-ubyte.gz.")


class Cifar10Dataset(_DatasetBase):
    """CIFAR-10, the 'python version' tarball (cifar-10-python.tar.gz)."""

    source: Literal["cifar10"] = "cifar10"
    path: str = Field(description="Path of cifar-10-python.tar.gz.")


class NpzDataset(_DatasetBase):
    """Your own arrays: x_train/y_train/x_test/y_test, or x/y split by shrinkfleet."""

    source: Literal["npz"] = "npz"
    path: str = Field(description="Path of the .npz file.")
    kind: Literal["image", "tabular"] = Field(
        "tabular", description="image: scaled to [0, 1]; tabular: standardised on the train split."
    )
    task: Literal["classification", "regression"] = Field(
        "classification", description="classification: y holds class ids; regression: y holds numbers to predict."
    )


class _TableDataset(_DatasetBase):
    """A table with one row per sample: a label column and feature columns (numbers or strings)."""

    path: str = Field(description="Path of the table file.")
    label: str = Field(description="The label column: class names or ids, or (regression) the numbers to predict.")
    task: Literal["classification", "regression"] = Field(
        "classification", description="classification: the label is a class; regression: a number."
    )
    columns: list[str] | None = Field(
        None, min_length=1, description="Feature columns; null = every column but the label."
    )
    impute: Literal["median"] | None = Field(
        None, description="Missing values: null stops the run naming the column; median fills numbers with the "
        "train split's median (a missing string gets no category: all zeros).",
    )


class CsvDataset(_TableDataset):
    """A CSV table read with pandas."""

    source: Literal["csv"] = "csv"


class ParquetDataset(_TableDataset):
    """A Parquet table read with pandas (pyarrow)."""

    source: Literal["parquet"] = "parquet"


class ImagesDataset(_DatasetBase):
    """A folder of image files, one sub-folder per class (PNG or JPEG), decoded and resized with Pillow."""

    source: Literal["images"] = "images"
    path: str = Field(description="Folder holding one sub-folder of images per class; folder names are the classes.")
    image_size: tuple[Annotated[int, Field(ge=1, le=4096)], Annotated[int, Field(ge=1, le=4096)]] = Field(
        description="Height and width every image is resized to, pixels."
    )
    color: Literal["rgb", "grayscale"] = Field("rgb", description="rgb: 3 channels; grayscale: 1 channel.")


DatasetSpec = Annotated[
    SklearnDataset | MnistDataset | Cifar10Dataset | NpzDataset | CsvDataset | ParquetDataset | ImagesDataset,
    Field(discriminator="source"),
]


# ----------------------------------------------------------------------------- models


class _TrainOverrides(_Strict):
    epochs: int | None = Field(None, ge=1, le=10_000, description="Override of the stage's epochs.")
    batch_size: int | None = Field(None, ge=1, description="Override of the stage's batch size.")
    learning_rate: float | None = Field(None, gt=0, lt=1, description="Override of the stage's Adam learning rate.")


class MlpArch(_TrainOverrides):
    """A multi-layer perceptron (inputs are flattened first)."""

    arch: Literal["mlp"] = "mlp"
    hidden: list[Annotated[int, Field(ge=1)]] = Field([64, 32], min_length=1, description="Units per hidden layer.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout after each hidden layer.")


class CnnArch(_TrainOverrides):
    """A small convolutional network for images: conv/relu/max-pool blocks, then dense layers."""

    arch: Literal["cnn"] = "cnn"
    filters: list[Annotated[int, Field(ge=1)]] = Field([16, 32], min_length=1, description="Filters per conv block.")
    kernel_size: int = Field(3, ge=1, le=11, description="Square kernel size of every conv layer.")
    padding: Literal["same", "valid"] = Field("same", description="Conv padding (valid: LeNet-5's shrinking maps).")
    dense: list[Annotated[int, Field(ge=1)]] = Field([64], description="Units of the dense layers after the convs.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout before the classifier.")


BUILDER_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"
# Set by shrinkfleet for a tf_keras.applications model: the dataset decides them, and nothing is downloaded.
APPLICATION_FIXED = ("weights", "input_shape", "input_tensor", "classes", "include_top")


class PretrainedArch(_Strict):
    """Your trained model, used as it is (its weights are not retrained): a .keras, .h5 or SavedModel folder."""

    arch: Literal["pretrained"] = "pretrained"
    path: str = Field(description="The model file or SavedModel folder, relative to params.yaml's folder.")
    imports: list[Annotated[str, Field(pattern=r"^[A-Za-z_][\w.]*$")]] = Field(
        default_factory=list, description="Modules imported first (from the project folder), e.g. ones that "
        "register custom layers for Keras serialization.")


class ApplicationArch(_TrainOverrides):
    """A ``tf_keras.applications`` architecture, trained from scratch (``weights=None``)."""

    arch: Literal["application"] = "application"
    name: str = Field(pattern=r"^[A-Z][A-Za-z0-9]*$", description="The constructor, e.g. MobileNetV2, ResNet50.")
    options: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of the constructor, e.g. {alpha: 0.35}; input shape, "
        "classes and weights come from the dataset.")
    batchnorm_momentum: float | None = Field(
        0.9, gt=0, lt=1, description="Momentum of every BatchNormalization layer's moving statistics; null keeps the "
        "constructor's (0.999 in MobileNet and EfficientNet: after a few epochs from scratch their statistics are "
        "still those of the initialisation, and the trained model predicts at chance).")

    @field_validator("options")
    @classmethod
    def _not_fixed(cls, v: dict[str, Any]) -> dict[str, Any]:
        fixed = [k for k in v if k in APPLICATION_FIXED]
        if fixed:
            raise ValueError(f"{', '.join(fixed)}: set by shrinkfleet (input shape and classes come from the "
                             "dataset, weights are never downloaded)")
        return v


class CustomArch(_TrainOverrides):
    """Your architecture: ``function(input_shape, outputs, **options)`` returning a functional tf_keras model."""

    arch: Literal["custom"] = "custom"
    builder: str = Field(pattern=BUILDER_PATTERN, description="module:function, imported from the project folder.")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments passed to the builder.")


ArchSpec = Annotated[MlpArch | CnnArch | PretrainedArch | ApplicationArch | CustomArch, Field(discriminator="arch")]
ARCH_KINDS = ("mlp", "cnn", "pretrained", "application", "custom")


# ----------------------------------------------------------------------------- stages


class TrainConfig(_Strict):
    """Supervised training of the teacher."""

    epochs: int = Field(30, ge=1, le=10_000, description="Passes over the training split.")
    batch_size: int = Field(64, ge=1, description="Samples per gradient step.")
    learning_rate: float = Field(1e-3, gt=0, lt=1, description="Adam learning rate.")
    patience: int = Field(
        5, ge=0, description="Stop after this many epochs without val-loss improvement (0 = never)."
    )


class DistillConfig(_Strict):
    """Knowledge distillation of the student from the teacher (Hinton et al., 2015)."""

    temperature: float = Field(4.0, gt=0, le=100, description="Softmax temperature T of the soft targets.")
    alpha: float = Field(
        0.1, ge=0, le=1, description="Weight of the hard-label cross-entropy; 1 - alpha weighs the KL term."
    )
    epochs: int = Field(40, ge=1, le=10_000, description="Passes over the training split.")
    batch_size: int = Field(64, ge=1, description="Samples per gradient step.")
    learning_rate: float = Field(2e-3, gt=0, lt=1, description="Adam learning rate.")
    patience: int = Field(8, ge=0, description="Early-stopping patience on val loss (0 = never).")


class PruneConfig(_Strict):
    """TFMOT magnitude pruning with a polynomial-decay sparsity schedule, then fine-tuning."""

    target_sparsity: float = Field(0.8, ge=0, lt=1, description="Fraction of zero weights reached at the end.")
    initial_sparsity: float = Field(0.0, ge=0, lt=1, description="Fraction of zero weights at the first step.")
    epochs: int = Field(15, ge=1, le=10_000, description="Fine-tuning epochs while the schedule runs.")
    batch_size: int = Field(64, ge=1, description="Samples per gradient step.")
    learning_rate: float = Field(1e-3, gt=0, lt=1, description="Adam learning rate while pruning.")
    frequency: int = Field(10, ge=1, description="Steps between two mask updates.")
    power: float = Field(3.0, gt=0, description="Exponent of the polynomial decay.")
    layer_sparsity: dict[str, Annotated[float, Field(ge=0, lt=1)]] | Literal["auto"] = Field(
        default_factory=dict,
        description="Target sparsity of named layers (e.g. {logits: 0.5}); the others take target_sparsity. "
        "auto: per-layer targets from a sensitivity analysis (auto_levels, auto_max_drop; docs/recipes.md).",
    )
    auto_levels: list[Annotated[float, Field(gt=0, lt=1)]] = Field(
        [0.5, 0.7, 0.8, 0.9, 0.95], min_length=1,
        description="layer_sparsity auto: the sparsities tried on each layer alone (no fine-tuning).",
    )
    auto_max_drop: float = Field(
        0.01, ge=0, le=1, description="layer_sparsity auto: largest validation accuracy drop (fraction) of the "
        "un-fine-tuned model with every layer at its chosen level, against the model before pruning.",
    )
    pattern: Literal["unstructured", "2:4"] = Field(
        "unstructured", description="unstructured magnitude pruning, or 2:4 (two zeros in every four weights)."
    )
    end_fraction: float = Field(
        0.75, gt=0, le=1, description="Share of the fine-tuning steps after which the target is reached."
    )

    @field_validator("layer_sparsity", mode="before")
    @classmethod
    def _mapping_or_auto(cls, v: Any) -> Any:
        if not isinstance(v, dict) and v != "auto":
            raise ValueError(f"must be a mapping of layer name to sparsity, or auto, got {v!r}")
        return v

    @field_validator("initial_sparsity")
    @classmethod
    def _below_target(cls, v: float, info: Any) -> float:  # per-layer targets start at min(initial, target)
        target = info.data.get("target_sparsity")
        if target is not None and v > target:
            raise ValueError(f"must be <= target_sparsity ({target})")
        return v


class QuantizeConfig(_Strict):
    """Conversion to TFLite flatbuffers (the last step of every recipe)."""

    representative_samples: int = Field(
        200, ge=1, description="Train samples used to calibrate full-integer int8 ranges."
    )


class ClusterConfig(_Strict):
    """TFMOT weight clustering (weight sharing): every kernel keeps at most ``clusters`` distinct values."""

    clusters: int = Field(16, ge=2, le=256, description="Distinct values per kernel (centroids).")
    init: Literal["kmeans_plus_plus", "linear", "density_based", "random"] = Field(
        "kmeans_plus_plus", description="How centroids start."
    )
    preserve_sparsity: bool = Field(True, description="Keep pruned zeros at zero (sparsity-preserving clustering).")
    epochs: int = Field(3, ge=1, le=10_000, description="Fine-tuning epochs with the centroids trainable.")
    batch_size: int = Field(64, ge=1, description="Samples per gradient step.")
    learning_rate: float = Field(5e-4, gt=0, lt=1, description="Adam learning rate.")


class ChannelsConfig(_Strict):
    """Channel pruning: remove the lowest-norm Dense units and Conv filters, then fine-tune (a smaller dense model)."""

    keep: float | Literal["auto"] = Field(
        0.5, description="Fraction of units/filters kept in every prunable layer (0 < keep <= 1), or auto: "
        "per-layer fractions from a sensitivity analysis (auto_levels, auto_max_drop; docs/recipes.md)."
    )
    target_macs: float | None = Field(
        None, gt=0, le=1, description="If set: the largest uniform keep whose model has at most this fraction "
        "of the input's MACs (replaces keep)."
    )
    norm: Literal["l1", "l2"] = Field("l1", description="Norm of a unit's weights that ranks it (l1 or l2).")
    round_to: int = Field(
        1, ge=1, le=256, description="Each layer keeps a multiple of this many units/filters (rounded up, at most "
        "its width): 8 or 16 fills the SIMD tiles of LiteRT's kernels; 1 = exactly the fraction."
    )
    auto_levels: list[Annotated[float, Field(gt=0, lt=1)]] = Field(
        [0.25, 0.5, 0.75], min_length=1,
        description="keep auto: the fractions of units removed, tried on each layer alone (no fine-tuning).",
    )
    auto_max_drop: float = Field(
        0.02, ge=0, le=1, description="keep auto: largest validation accuracy drop (fraction) of the "
        "un-fine-tuned model with every layer at its chosen level, against the input model.",
    )
    epochs: int = Field(3, ge=0, le=10_000, description="Fine-tuning epochs after the cut (0 = none).")
    batch_size: int = Field(64, ge=1, description="Samples per gradient step.")
    learning_rate: float = Field(5e-4, gt=0, lt=1, description="Adam learning rate.")

    @field_validator("keep", mode="before")
    @classmethod
    def _fraction(cls, v: Any) -> Any:
        if v != "auto" and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1):
            raise ValueError(f"must be a fraction in (0, 1] or auto, got {v!r}")
        return v


class QatConfig(_Strict):
    """Quantization-aware training (QAT, PQAT, CQAT, PCQAT) before the int8 conversion."""

    epochs: int = Field(2, ge=1, le=10_000, description="Fine-tuning epochs with fake-quantized weights.")
    batch_size: int = Field(64, ge=1, description="Samples per gradient step.")
    learning_rate: float = Field(1e-4, gt=0, lt=1, description="Adam learning rate.")


TRAINING_STEPS = ("channels", "prune", "cluster", "qat", "pqat", "cqat", "pcqat")
QAT_STEPS = ("qat", "pqat", "cqat", "pcqat")
STEP_CONFIGS: dict[str, str] = {"channels": "channels", "prune": "prune", "cluster": "cluster",
                                **{q: "qat" for q in QAT_STEPS}}


class RecipeSpec(_Strict):
    """An ordered list of techniques applied to a starting model, ending in one TFLite conversion."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    start: Literal["teacher", "student", "pruned"] = Field(
        "pruned", alias="from", description="Model the recipe starts from."
    )
    steps: list[str | dict[str, dict[str, Any]]] = Field(
        min_length=1, description="Technique names (or {name: {overrides}}), the last one a conversion."
    )

    @field_validator("steps")
    @classmethod
    def _shape(cls, steps: list[Any]) -> list[Any]:
        names = [s if isinstance(s, str) else next(iter(s)) for s in steps]
        for s in steps:
            if isinstance(s, dict) and len(s) != 1:
                raise ValueError(f"a step is a name or a one-key mapping {{name: {{...}}}}, got {s}")
        allowed = (*TRAINING_STEPS, *QUANT_MODES)
        for n in names:
            if n not in allowed:
                raise ValueError(f"unknown step {n!r}; one of: {', '.join(allowed)}")
        if names[-1] not in QUANT_MODES:
            raise ValueError(f"the last step must be a conversion ({', '.join(QUANT_MODES)}), got {names[-1]!r}")
        if any(n in QUANT_MODES for n in names[:-1]):
            raise ValueError("a conversion may only be the last step")
        for i, n in enumerate(names):
            if n in QAT_STEPS and names[-1] != "int8":
                raise ValueError(f"{n} trains for int8: the recipe must end with int8")
            if n in ("cqat", "pcqat") and "cluster" not in names[:i]:
                raise ValueError(f"{n} preserves clusters: put a cluster step before it")
        if sum(n in QAT_STEPS for n in names) > 1:
            raise ValueError("at most one of qat, pqat, cqat, pcqat per recipe")
        return steps

    def step_names(self) -> list[str]:
        return [s if isinstance(s, str) else next(iter(s)) for s in self.steps]


DEFAULT_RECIPES: dict[str, dict[str, Any]] = {
    "pruned-float32": {"steps": ["float32"]},
    "pruned-float16": {"steps": ["float16"]},
    "pruned-dynamic": {"steps": ["dynamic"]},
    "pruned-int8": {"steps": ["int8"]},
    "pruned-clustered": {"steps": ["cluster", "float32"]},
    "pruned-pcqat": {"steps": ["cluster", "pcqat", "int8"]},
}


class SearchConfig(_Strict):
    """Bounded search for the smallest variant within an accuracy bound (off unless enabled)."""

    enabled: bool = Field(False, description="Run the search in the compress stage.")
    budget: int = Field(6, ge=1, le=1000, description="Most trials (each prunes, clusters and converts).")
    max_accuracy_drop: float = Field(
        0.01, ge=0, le=1, description="Largest accepted drop vs the teacher on the validation split (fraction)."
    )
    sparsities: list[Annotated[float, Field(ge=0, lt=1)]] = Field(
        [0.8, 0.9, 0.95], min_length=1, description="Target sparsities to try."
    )
    clusters: list[Annotated[int, Field(ge=2, le=256)]] = Field(
        [8, 16, 32], min_length=1, description="Cluster counts to try."
    )
    conversions: list[Literal["float32", "int8"]] = Field(
        ["float32"], min_length=1, description="Conversions to try (float32 keeps exact clusters for coding)."
    )


class FeatureConfig(_Strict):
    """Feature selection / extraction for tabular data, fitted on the train split only."""

    variance_threshold: float | None = Field(
        None, ge=0, description="Drop raw features whose train variance is at most this; null = keep all."
    )
    select_k: int | None = Field(
        None, ge=1, description="Keep the k features with the highest mutual information with the label."
    )
    pca: int | None = Field(None, ge=1, description="Project onto this many principal components.")


class EvaluateConfig(_Strict):
    """How every variant is measured."""

    latency_runs: int = Field(100, ge=1, description="Timed LiteRT calls per variant and batch size.")
    latency_warmup: int = Field(10, ge=0, description="Untimed calls before timing (at least one is made).")
    batch_sizes: list[int] = Field(
        [1, 32], min_length=1, description="Batch sizes every variant is timed at on LiteRT, giving "
        "latency_ms_p50_b<N> and speedup_vs_float32_b<N> (batch 1 is always timed too)."
    )
    threads: int = Field(
        1, ge=1, le=256, description="Threads of the LiteRT interpreter (XNNPACK) that times the variants; "
        "1 is the reproducible figure on a shared machine and what a phone's one big core does."
    )

    @field_validator("batch_sizes")
    @classmethod
    def _batches(cls, value: list[int]) -> list[int]:
        if any(b < 1 or b > 4096 for b in value):
            raise ValueError(f"batch sizes must be between 1 and 4096, got {value}")
        return sorted({1, *value})


class GateConfig(_Strict):
    """Which variants may be promoted to production, and which one is."""

    max_accuracy_drop: float = Field(
        0.04, ge=0, le=1,
        description="Largest accepted teacher accuracy - variant accuracy (fraction; 0.04 = 4 points).",
    )
    max_error_increase: float = Field(
        0.1, ge=0, description="Regression: largest accepted (variant MAE - teacher MAE) / teacher MAE "
        "(fraction; 0.1 = 10% worse)."
    )
    max_size_bytes: int | None = Field(None, gt=0, description="Largest accepted flatbuffer size; null = no limit.")
    max_latency_ms_p50: float | None = Field(
        None, gt=0, description="Largest accepted median LiteRT latency in ms at batch size latency_batch; "
        "null = no limit."
    )
    latency_batch: int = Field(
        1, ge=1, description="The batch size whose latency (latency_ms_p50_b<N>, one of evaluate.batch_sizes) "
        "max_latency_ms_p50 and the latency_ms_p50 objective use."
    )
    max_macs: int | None = Field(
        None, gt=0, description="Largest accepted multiply-accumulates per example (macs); null = no limit."
    )
    objective: Literal["size_bytes", "coded_bytes", "accuracy", "latency_ms_p50", "macs"] = Field(
        "size_bytes", description="How the candidate is chosen among passing variants: smallest size_bytes "
        "(flatbuffer) or coded_bytes (entropy-coded), highest accuracy (regression: lowest MAE), lowest "
        "latency_ms_p50 (at latency_batch) or fewest macs."
    )
    promote: bool = Field(True, description="Register the candidate in the MLflow Model Registry and move production.")


class RunConfig(_Strict):
    """How the Prefect flow executes the fleet."""

    workers: int = Field(2, ge=1, le=256, description="Worker processes that run stages in parallel.")
    retries: int = Field(2, ge=0, le=10, description="Retries of a stage after a transient failure.")
    retry_delay_seconds: float = Field(5.0, ge=0, description="Wait before a retry.")
    mixed_precision: bool = Field(False, description="Train in mixed_float16 on GPUs (ignored on CPU).")
    engine: Literal["process", "dask"] = Field(
        "process",
        description="Where stages run: process (a local process pool of `workers` processes) or dask "
        "(a Dask cluster through prefect-dask).",
    )
    dask_address: str | None = Field(
        None,
        description="Scheduler of an existing Dask cluster (tcp://host:8786) for engine dask; null starts a "
        "local cluster of `workers` processes with one thread each.",
    )
    worker_max_models: int = Field(
        20, ge=0, le=100_000,
        description="Engine process: the process pool is replaced by a fresh one after every `workers` x this "
        "many models, returning the memory TensorFlow keeps from model to model (about 15 MB per model "
        "measured); 0 keeps one pool for the whole run.",
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "worker_max_stages" in data:
            raise ValueError("worker_max_stages was replaced by worker_max_models (models per worker process "
                             "before its pool is replaced; a model is one task now)")
        return data

    @field_validator("dask_address")
    @classmethod
    def _scheduler_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^(tcp|tls|inproc|ucx|ws|wss)://[^\s/]+$", value):
            raise ValueError(f"must be a Dask scheduler address such as tcp://10.0.0.5:8786, got {value!r}")
        return value


# ----------------------------------------------------------------------------- storage

# Keys that smell of a secret: credentials come from the environment or an AWS profile only.
CREDENTIAL_KEY = re.compile(r"(access_?key|secret|password|passwd|token|credential|session)", re.IGNORECASE)
# Where each storage setting may be overridden, first match wins (the env beats params.yaml;
# AWS's own endpoint variables only fill in when neither names an endpoint).
STORAGE_ENV: dict[str, tuple[str, ...]] = {
    "s3_bucket": ("SHRINKFLEET_S3_BUCKET",),
    "s3_prefix": ("SHRINKFLEET_S3_PREFIX",),
    "endpoint_url": ("SHRINKFLEET_S3_ENDPOINT_URL",),
    "region": ("SHRINKFLEET_S3_REGION",),
}
# No region fallback: boto3 and DVC read AWS_REGION/AWS_DEFAULT_REGION themselves, and a
# region taken from one machine's environment must not be written into the committed .dvc/config.
STORAGE_ENV_FALLBACK: dict[str, tuple[str, ...]] = {
    "endpoint_url": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
}


class ReportConfig(_Strict):
    """What the run's report draws."""

    pareto_x: Literal["coded_bytes", "latency", "macs"] = Field(
        "coded_bytes", description="The Pareto plot's x axis: coded_bytes (entropy-coded flatbuffer), latency "
        "(median LiteRT latency at each model's gate.latency_batch) or macs; the table's Pareto front (*) "
        "stays the coded bytes'."
    )


class StorageConfig(_Strict):
    """Remote storage on S3 or an S3-compatible store (MinIO): the DVC remote and MLflow's artifacts.

    Credentials never go here: boto3 reads them from the environment or an AWS profile.
    """

    s3_bucket: str | None = Field(
        None, pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$",
        description="Bucket for the DVC remote and MLflow artifacts; null = no remote storage (all local).",
    )
    s3_prefix: str = Field(
        "shrinkfleet", pattern=r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$",
        description="Folder in the bucket: DVC objects under <prefix>/dvc, MLflow artifacts under <prefix>/mlflow.",
    )
    endpoint_url: str | None = Field(
        None, pattern=r"^https?://[^\s/]+(/\S*)?$",
        description="S3 API endpoint of MinIO or another S3-compatible store; null = AWS S3.",
    )
    region: str | None = Field(
        None, pattern=r"^[a-z0-9-]+$", description="Bucket region; null = boto3's default (AWS_DEFAULT_REGION)."
    )

    @field_validator("s3_prefix", mode="before")
    @classmethod
    def _strip_slashes(cls, v: Any) -> Any:
        return v.strip("/") if isinstance(v, str) else v

    def with_env(self, environ: dict[str, str] | None = None) -> StorageConfig:
        """These settings with the environment's overrides applied (``SHRINKFLEET_S3_*``, then AWS's own).

        Raises:
            ConfigError: an environment variable holds a bad value; the message names the variable.
        """
        import os

        env = os.environ if environ is None else environ
        values = self.model_dump()
        source = {k: f"storage.{k}" for k in values}
        for key, names in STORAGE_ENV.items():
            for name in names:
                if env.get(name):
                    values[key], source[key] = env[name], name
                    break
        for key, names in STORAGE_ENV_FALLBACK.items():
            if values[key] is None:
                for name in names:
                    if env.get(name):
                        values[key], source[key] = env[name], name
                        break
        try:
            return StorageConfig.model_validate(values)
        except ValidationError as exc:
            problems = [f"{source[str(e['loc'][0])]}: {e['msg'].replace('String should', 'must')}"
                        for e in exc.errors()]
            raise ConfigError("invalid storage setting\n  " + "\n  ".join(problems)) from None


# ----------------------------------------------------------------------------- per model


class _SectionOverrides(_Strict):
    """A model's overrides of one stage section; validated again after merging."""

    model_config = ConfigDict(extra="allow", frozen=True)


class ModelSpec(_Strict):
    """One fleet member as written in params.yaml."""

    dataset: str = Field(description="Name of an entry in datasets:.")
    teacher: ArchSpec = Field(description="Teacher architecture (+ optional training overrides).")
    student: ArchSpec | None = Field(
        description="Student architecture (+ optional distill-training overrides); null = no distillation: the "
        "prune stage starts from the teacher.")
    distill: dict[str, Any] = Field(default_factory=dict, description="Overrides of the distill: section.")
    prune: dict[str, Any] = Field(default_factory=dict, description="Overrides of the prune: section.")
    quantize: dict[str, Any] = Field(default_factory=dict, description="Overrides of the quantize: section.")
    cluster: dict[str, Any] = Field(default_factory=dict, description="Overrides of the cluster: section.")
    channels: dict[str, Any] = Field(default_factory=dict, description="Overrides of the channels: section.")
    qat: dict[str, Any] = Field(default_factory=dict, description="Overrides of the qat: section.")
    recipes: list[str] | None = Field(None, description="Names of the fleet's recipes to run (null = all).")
    search: dict[str, Any] = Field(default_factory=dict, description="Overrides of the search: section.")
    gate: dict[str, Any] = Field(
        default_factory=dict, description="Overrides of the gate: section (optional: no stage reads it)."
    )


class ResolvedModel(_Strict):
    """A fleet member with every section resolved: what the stages actually read."""

    name: str
    seed: int
    dataset_name: str
    dataset: DatasetSpec
    split: SplitConfig
    teacher_arch: ArchSpec
    teacher: TrainConfig
    student_arch: ArchSpec | None
    distill: DistillConfig
    prune: PruneConfig
    quantize: QuantizeConfig
    cluster: ClusterConfig
    channels: ChannelsConfig
    qat: QatConfig
    recipes: dict[str, RecipeSpec]
    search: SearchConfig
    evaluate: EvaluateConfig
    gate: GateConfig

    def step_config(self, recipe: str, index: int) -> tuple[str, Any]:
        """``(step name, resolved config)`` of a recipe step: the model's section plus the step's overrides.

        Raises:
            ConfigError: an override names an unknown key or a bad value.
        """
        step = self.recipes[recipe].steps[index]
        name, overrides = (step, {}) if isinstance(step, str) else next(iter(step.items()))
        section = STEP_CONFIGS.get(name)
        if section is None:
            if overrides:
                raise ConfigError(f"recipes.{recipe}.steps[{index}]: {name} takes no settings")
            return name, self.quantize
        base = getattr(self, section)
        try:
            return name, type(base).model_validate({**base.model_dump(), **overrides})
        except ValidationError as exc:
            raise ConfigError(_format_errors(exc, prefix=f"recipes.{recipe}.steps[{index}].{name}")) from None

    def flat_params(self) -> dict[str, Any]:
        """Every resolved setting as a flat ``section.key -> value`` dict (for MLflow)."""
        out: dict[str, Any] = {"seed": self.seed, "dataset": self.dataset_name}
        for section in ("dataset", "split", "teacher_arch", "teacher", "student_arch",
                        "distill", "prune", "quantize", "cluster", "channels", "qat", "evaluate"):
            value = getattr(self, section)
            if value is None:  # no student
                out[f"{section}.arch"] = None
                continue
            for key, v in value.model_dump().items():
                out[f"{section}.{key}"] = v
        return out

    @property
    def user_modules(self) -> list[str]:
        """Modules of yours the model's artifacts need imported before they load (custom layers):
        a pretrained model's ``imports`` and a custom builder's module, teacher's then student's."""
        from shrinkfleet.pipeline import user_modules

        return user_modules(self.teacher_arch, self.student_arch)

    @property
    def base(self) -> str:
        """The Keras model pruning starts from: the student, or the teacher when there is none."""
        return "teacher" if self.student_arch is None else "student"

    @property
    def keras_variants(self) -> tuple[str, ...]:
        """The model's Keras stages' outputs, in chain order."""
        return ("teacher", "pruned") if self.student_arch is None else ("teacher", "student", "pruned")


class FleetConfig(_Strict):
    """The whole params.yaml."""

    fleet: str = Field(
        "default", pattern=NAME_PATTERN, description="Fleet name; the MLflow experiment is shrinkfleet/<fleet>."
    )
    seed: int = Field(42, ge=0, description="Seed of every split, initialisation and shuffle.")
    run: RunConfig = RunConfig()
    data: SplitConfig = SplitConfig()
    teacher: TrainConfig = TrainConfig()
    distill: DistillConfig = DistillConfig()
    prune: PruneConfig = PruneConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    cluster: ClusterConfig = ClusterConfig()
    channels: ChannelsConfig = ChannelsConfig()
    qat: QatConfig = QatConfig()
    recipes: dict[str, RecipeSpec] = Field(
        default_factory=lambda: {k: RecipeSpec.model_validate(v) for k, v in DEFAULT_RECIPES.items()},
        description="Compression recipes by name; every model runs all of them unless it lists its own.",
    )
    search: SearchConfig = SearchConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    gate: GateConfig = GateConfig()
    report: ReportConfig = ReportConfig()
    storage: StorageConfig = StorageConfig()
    datasets: dict[str, DatasetSpec] = Field(description="Datasets by name.")
    models: dict[str, ModelSpec] = Field(description="The fleet: models by name.")

    @field_validator("models", mode="before")
    @classmethod
    def _mapping(cls, v: Any) -> Any:
        if isinstance(v, list):
            raise ValueError(
                "must be a mapping keyed by model name (models: {digits-cnn: {...}}), not a list: "
                "the name is what DVC stages, MLflow runs and the registry know a model by"
            )
        if isinstance(v, dict) and not v:
            raise ValueError("the fleet is empty: list at least one model")
        return v

    @field_validator("models", "datasets", "recipes")
    @classmethod
    def _names(cls, v: dict[str, Any]) -> dict[str, Any]:
        for name in v:
            if not re.match(NAME_PATTERN, str(name)):
                raise ValueError(
                    f"name {name!r} must be lower-case letters, digits, '-' or '_' (at most 63 characters)"
                )
        return v

    def model_names(self) -> list[str]:
        return list(self.models)

    def resolve(self, name: str) -> ResolvedModel:
        """Merge the fleet defaults with one model's overrides and validate the result."""
        if name not in self.models:
            raise ConfigError(f"models.{name}: no such model{did_you_mean(name, self.models)}; the fleet has "
                              f"{', '.join(self.models)}")
        spec = self.models[name]
        errors: list[str] = []

        def merged(cls: type[BaseModel], base: BaseModel, overrides: dict[str, Any], section: str) -> Any:
            try:
                return cls.model_validate({**base.model_dump(), **overrides})
            except ValidationError as exc:
                errors.append(_format_errors(exc, prefix=f"models.{name}.{section}").split("\n  ", 1)[1])
                return None

        sections = {
            "teacher": merged(TrainConfig, self.teacher, _train_overrides(spec.teacher), "teacher"),
            "distill": merged(
                DistillConfig, self.distill, {**_train_overrides(spec.student), **spec.distill}, "distill"
            ),
            "prune": merged(PruneConfig, self.prune, spec.prune, "prune"),
            "quantize": merged(QuantizeConfig, self.quantize, spec.quantize, "quantize"),
            "cluster": merged(ClusterConfig, self.cluster, spec.cluster, "cluster"),
            "channels": merged(ChannelsConfig, self.channels, spec.channels, "channels"),
            "qat": merged(QatConfig, self.qat, spec.qat, "qat"),
            "search": merged(SearchConfig, self.search, spec.search, "search"),
            "gate": merged(GateConfig, self.gate, spec.gate, "gate"),
        }
        chosen = list(self.recipes) if spec.recipes is None else spec.recipes
        unknown = [r for r in chosen if r not in self.recipes]
        if unknown:
            errors.append(f"models.{name}.recipes: {', '.join(unknown)} not in recipes: "
                          f"(one of: {', '.join(self.recipes)})")
        if not chosen and not (sections["search"] and sections["search"].enabled):
            errors.append(f"models.{name}.recipes: empty, and search is off: the model would have no variant")
        task = getattr(self.datasets.get(spec.dataset), "task", "classification")
        if task == "regression" and sections["search"] is not None and sections["search"].enabled:
            errors.append(f"models.{name}.search: the search bounds an accuracy drop; {spec.dataset} is a "
                          "regression dataset (turn search off for this model)")
        if task == "regression" and sections["prune"] is not None and sections["prune"].layer_sparsity == "auto":
            errors.append(f"models.{name}.prune.layer_sparsity: auto bounds an accuracy drop; {spec.dataset} is a "
                          "regression dataset (give per-layer sparsities or none)")
        if spec.student is None:
            from_student = [r for r in chosen if r in self.recipes and self.recipes[r].start == "student"]
            if from_student:
                errors.append(f"models.{name}.recipes: {', '.join(from_student)} start(s) from the student, and "
                              f"models.{name} has none (student: null); list the recipes it runs")
        if spec.dataset not in self.datasets:
            errors.append(
                f"models.{name}.dataset: {spec.dataset!r} is not in datasets: (one of: {', '.join(self.datasets)})"
            )
        if errors:
            raise ConfigError("invalid fleet definition\n  " + "\n  ".join(errors))
        return ResolvedModel(
            name=name,
            seed=self.seed,
            dataset_name=spec.dataset,
            dataset=self.datasets[spec.dataset],
            split=self.data,
            teacher_arch=spec.teacher,
            student_arch=spec.student,
            evaluate=self.evaluate,
            recipes={r: self.recipes[r] for r in chosen},
            **sections,
        )

    def datasets_in_use(self, models: list[str] | None = None) -> list[str]:
        names = models or self.model_names()
        return sorted({self.models[m].dataset for m in names})


def select_models(fleet_models: list[str], wanted: list[str] | None) -> list[str]:
    """The fleet members to run, in fleet order.

    Raises:
        ConfigError: ``wanted`` names a model that is not in the fleet.
    """
    if not wanted:
        return fleet_models
    unknown = [m for m in wanted if m not in fleet_models]
    if unknown:
        hints = "".join(did_you_mean(m, fleet_models) for m in unknown)
        raise ConfigError(f"--models: {', '.join(unknown)} not in the fleet{hints} (one of: {', '.join(fleet_models)})")
    return [m for m in fleet_models if m in wanted]


def _train_overrides(arch: Any) -> dict[str, Any]:
    return {k: v for k in ("epochs", "batch_size", "learning_rate") if (v := getattr(arch, k, None)) is not None}


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (through Optional, unions, Annotated, list, dict values)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is dict:
        args = args[1:]
    return [m for a in args for m in _models_in(a)]


def allowed_keys(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys a mapping at ``loc`` (a pydantic error location, the key itself last) may hold.

    Followed through the models' fields; a list index, a dict key or a union's tag in the path
    keeps the candidate models. Empty when the path cannot be followed.
    """
    current: list[type[BaseModel]] = [root]
    for part in loc[:-1]:
        if isinstance(part, int) or _is_tag(str(part)):
            continue
        fields = [m.model_fields[part] for m in current if part in m.model_fields]
        nxt = [m for f in fields for m in _models_in(f.annotation)]
        if not fields:  # a dict key (a model's or dataset's name): same candidates
            continue
        current = nxt
    return sorted({k for m in current for k in m.model_fields})


def did_you_mean(word: str, choices: Any) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` to a mistyped ``word``, else ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _format_errors(exc: ValidationError, prefix: str = "", source: str = "") -> str:
    lines = []
    root = globals().get(exc.title)
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        # Discriminated unions add the chosen tag ('mlp', 'sklearn') to the path: drop it.
        loc = [p for i, p in enumerate(loc) if not (i > 0 and _is_tag(p))]
        path = ".".join([prefix, *loc] if prefix else loc) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
        if err["type"] == "extra_forbidden":
            keys = allowed_keys(root, err["loc"]) if isinstance(root, type) and issubclass(root, BaseModel) else []
            hint = did_you_mean(str(err["loc"][-1]), keys)
            msg = ("unknown key" + (hint or " (check the spelling; allowed keys are documented in params.yaml)"))
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif err["type"] == "literal_error":
            msg = msg.replace("must be", "must be one of:")
        elif err["type"] == "union_tag_invalid":
            path += "." + err["ctx"]["discriminator"].strip("'")
            msg = f"{err['ctx']['tag']!r} is not one of: {err['ctx']['expected_tags']}"
        lines.append(f"{path}: {msg}")
    head = f"{source}: invalid fleet definition" if source else "invalid fleet definition"
    return head + "\n  " + "\n  ".join(lines)


def _is_tag(part: str) -> bool:
    return part in {*ARCH_KINDS, "sklearn", "mnist", "cifar10", "npz", "csv", "parquet", "images"}


class DuplicateKeyError(yaml.MarkedYAMLError):
    """A YAML mapping repeats a key; ``path`` is its key path (``models.digits-cnn``)."""

    def __init__(self, path: str, first: yaml.Mark, again: yaml.Mark) -> None:
        super().__init__(problem=f"duplicate key {path}", problem_mark=again)
        self.path, self.line, self.first_line = path, again.line + 1, first.line + 1

    def __str__(self) -> str:
        return (f"{self.path}: duplicate key (line {self.line}; first at line {self.first_line}); YAML would "
                "silently keep only the last one, so give each entry its own name")


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping repeating a key, naming the key path and line.

    PyYAML keeps the last of two equal keys without a word, so two models with the same name
    would quietly become one. The whole document is composed (the node tree, no Python
    objects yet) and checked before the safe constructor builds anything, so loading stays
    exactly as safe as ``yaml.safe_load``. Keys brought in by a merge (``<<: *defaults``) may
    be overridden, as YAML intends; only keys written twice in the same mapping are refused.
    """

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        _check_unique(node, "")
        return self.construct_document(node)


def _check_unique(node: yaml.Node, path: str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, yaml.Mark] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else f"<{key.tag}>"
            child = f"{path}.{name}" if path else str(name)
            if key.tag != "tag:yaml.org,2002:merge":
                if name in seen:
                    raise DuplicateKeyError(child, seen[name], key.start_mark)
                seen[name] = key.start_mark
            _check_unique(value, child)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique(item, f"{path}[{i}]")


def load_params(path: Path | str) -> FleetConfig:
    """Read, validate and cross-check a params.yaml.

    Raises:
        ConfigError: the file is missing or unreadable, is not YAML, repeats a key (see
            :class:`UniqueKeyLoader`), or a key is wrong; the message names the file and every
            offending key path.
    """
    return load_snapshot(path).fleet


def _read_params(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the fleet definition ({exc.strerror})") from None


def parse_params_text(text: str, source: str = "params.yaml") -> FleetConfig:
    """Validate the text of a params.yaml (see :func:`load_params`)."""
    try:
        raw = yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader subclass: no arbitrary objects
    except DuplicateKeyError as exc:
        raise ConfigError(f"{source}: invalid fleet definition\n  {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: must be a YAML mapping with datasets: and models:")
    return parse_params(raw, source=source)


@dataclass(frozen=True)
class Snapshot:
    """A params.yaml read and validated once: what every stage of one run receives.

    The flow reads the file once, at the start of a run, and hands this object (pickled) to
    every stage task, so no worker reads params.yaml: an edit made while a run goes on
    changes nothing in that run. ``file_sha256`` is the hash of the bytes that were read;
    :meth:`file_unchanged` tells whether the file on disk still holds them, which is what
    lets a stage record itself in DVC (``dvc.lock`` takes its params from the file on disk:
    after an edit it would record settings the stage never used). ``digest`` identifies the
    resolved settings themselves (the same for two files that differ only in comments) and
    is what MLflow records beside the resolved settings.
    """

    fleet: FleetConfig
    path: Path
    file_sha256: str

    @cached_property
    def digest(self) -> str:
        """sha256 of the validated settings, every default filled in (canonical JSON)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def to_json(self) -> str:
        """The validated settings, every default filled in, as canonical JSON."""
        return json.dumps(self.fleet.model_dump(mode="json", by_alias=True), sort_keys=True, indent=1)

    @property
    def base_dir(self) -> Path:
        """The folder that relative paths in the file (datasets, model files) are relative to."""
        return self.path.parent

    def file_unchanged(self) -> bool:
        """The file on disk still holds the bytes this snapshot was read from."""
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest() == self.file_sha256
        except OSError:
            return False


def load_snapshot(path: Path | str) -> Snapshot:
    """Read and validate a params.yaml once (see :class:`Snapshot` and :func:`load_params`)."""
    path = Path(path).resolve()
    data = _read_params(path)
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    fleet = parse_params_text(text, source=str(path))
    return Snapshot(fleet=fleet, path=path, file_sha256=hashlib.sha256(data).hexdigest())


def parse_params(raw: dict[str, Any], source: str = "params.yaml") -> FleetConfig:
    """Validate an already-parsed params mapping (see :func:`load_params`)."""
    secrets = credential_keys(raw)
    if secrets:
        raise ConfigError(
            f"{source}: credentials do not belong in the fleet definition (it is committed to git and logged)\n  "
            + "\n  ".join(f"{key}: remove it; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) "
                           "in the environment instead" for key in secrets))
    try:
        fleet = FleetConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source=source)) from None
    problems = []
    for name, ds in fleet.datasets.items():
        image = ds.source in ("mnist", "cifar10", "images") or getattr(ds, "name", "") == "digits" or getattr(
            ds, "kind", "") == "image"
        if image and ds.features != FeatureConfig():
            problems.append(f"datasets.{name}.features: feature selection/extraction applies to tabular data; "
                            f"{name} holds images")
    for name in fleet.models:
        try:
            resolved = fleet.resolve(name)
        except ConfigError as exc:
            problems.append(str(exc).split("\n  ", 1)[1])
            continue
        # Every recipe step's settings as that model's stages will merge them: a bad override
        # (an unknown key, a value out of range) stops the run here, not after training.
        for recipe, spec in resolved.recipes.items():
            for index in range(len(spec.steps)):
                try:
                    resolved.step_config(recipe, index)
                except ConfigError as exc:
                    problems += [p for p in str(exc).split("\n  ")[1:] if p not in problems]
    if problems:
        raise ConfigError(f"{source}: invalid fleet definition\n  " + "\n  ".join(problems))
    return fleet


def credential_keys(raw: dict[str, Any]) -> list[str]:
    """Key paths that look like credentials, at the top level or under ``storage:`` (values are never read)."""
    found = [str(k) for k in raw if CREDENTIAL_KEY.search(str(k))]
    storage = raw.get("storage")
    if isinstance(storage, dict):
        found += [f"storage.{k}" for k in storage if CREDENTIAL_KEY.search(str(k))]
    return found


def resolve_path(value: str, base: Path) -> Path:
    """A dataset path from params.yaml: absolute, or relative to the params file's folder."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)
