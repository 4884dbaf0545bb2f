"""Run configuration: frozen dataclasses loaded from YAML, overridden from the command line.

Configs ship as package data (``taxonet/configs/*.yaml``) and are addressed by name (``--config demo``) or path.
Overrides are ``section.key=value`` strings whose values are parsed as YAML (``train.epochs=3``,
``model.weights=null``). The resolved config is saved beside every checkpoint (:meth:`RunConfig.to_dict`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config that cannot be loaded: unknown name, unknown key or a bad value."""


@dataclass(frozen=True)
class ModelConfig:
    #: backbone name in the model registry (resnet50, efficientnet_b3, resnet18, mobilenet_v3_small, small_cnn, ...)
    backbone: str = "resnet50"
    #: "imagenet" (torchvision weights), a local path or s3:// URI of a backbone state dict, or null (random init)
    weights: str | None = "imagenet"
    #: dropout on the shared feature R0 (paper: 0.5)
    dropout: float = 0.5
    #: hidden units of each rank head (paper: 512)
    hidden: int = 512
    #: single-task baseline: only a head for the last rank (the paper's "species only" models)
    single_task: bool = False


@dataclass(frozen=True)
class DataConfig:
    #: prepared dataset URI (local path or s3://bucket/prefix) holding dataset.json + shards/
    dataset: str = ""
    #: square input size in pixels (paper's code: 128)
    input_size: int = 128
    #: ImageNet normalisation (the original code divided by 255 twice; not copied)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    #: the paper's augmentations (rotation ±40°, scale 0.85–1.15, flips, perspective 0.2, colour jitter 0.5)
    augment: bool = True
    #: split names used for training / validation (best-checkpoint selection)
    train_split: str = "train"
    val_split: str = "val"
    #: keep the splits in Ray's object store after the first read ("auto": when the split's Parquet bytes take at
    #: most a quarter of the cluster's object store; "always"; "never": stream from storage every epoch). Reading
    #: once saves each epoch the wait for its first batch (~1.9 s per epoch on 2 CPU cores for 1,800 small crops).
    cache: str = "auto"


#: the dependency terms of taxonet.losses
DEPENDENCIES = ("paper", "soft", "none")


@dataclass(frozen=True)
class LossConfig:
    #: weight of the cross-entropy sum; (1 - alpha) weighs the dependency term (paper: 0.5)
    alpha: float = 0.5
    #: "paper" (argmax-based, no gradient, batch mean), "soft" (differentiable forbidden mass) or "none"
    dependency: str = "paper"
    #: weight λ of the outlier-exposure term on partially labelled samples (0 = the paper's loss); see
    #: taxonet.losses. Only for datasets whose partial labels are insects outside the class lists (bycatch).
    outlier_weight: float = 0.0

    def __post_init__(self) -> None:  # the one check of these values, for configs and for losses built directly
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"loss.alpha must be in [0, 1], got {self.alpha}")
        if self.dependency not in DEPENDENCIES:
            raise ConfigError(f"loss.dependency must be one of {', '.join(DEPENDENCIES)}, got {self.dependency!r}")
        if not (self.outlier_weight >= 0.0 and math.isfinite(self.outlier_weight)):
            raise ConfigError(f"loss.outlier_weight must be a finite number >= 0, got {self.outlier_weight}")


@dataclass(frozen=True)
class OptimConfig:
    #: paper: Adam, lr 1e-4, no weight decay, 20 epochs
    name: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    momentum: float = 0.9
    epochs: int = 20
    #: learning-rate schedule over epochs: "constant" (the paper), "cosine" (decays to 0 at the last epoch) or
    #: "onecycle" (linear warm-up from lr/25 over the first 30% of the epochs, then cosine decay)
    schedule: str = "constant"
    #: batch size per worker (paper: 20 on one GPU); the global batch scales with workers
    batch_size: int = 20


@dataclass(frozen=True)
class TrainConfig:
    #: run name: a rerun with the same name (and storage) resumes from the latest checkpoint
    run_name: str = "taxonet"
    #: where runs are written: local directory or s3://bucket/prefix
    storage: str = "runs"
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    seed: int = 0
    #: FailureConfig(max_failures): worker failures retried from the latest checkpoint
    max_failures: int = 1
    #: bf16 autocast and channels_last (only applied on GPU)
    amp: bool = True
    channels_last: bool = True
    #: limit batches per epoch (0 = all); for smoke tests and benchmarks
    max_steps_per_epoch: int = 0
    #: data-loading threads per worker for decode/augment
    loader_threads: int = 1


@dataclass(frozen=True)
class AnomalyConfig:
    #: threshold tau = mu - k * sigma (paper's code: k = 2; later work 2.5)
    k: float = 2.0
    #: classes with fewer correctly classified training samples than this get no threshold
    min_samples: int = 2


@dataclass(frozen=True)
class RunConfig:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    anomaly: AnomalyConfig = field(default_factory=AnomalyConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def with_overrides(self, overrides: list[str] | dict[str, Any]) -> "RunConfig":
        data = self.to_dict()
        items = overrides.items() if isinstance(overrides, dict) else (_split_override(o) for o in overrides)
        for dotted, value in items:
            node = data
            *path, leaf = dotted.split(".")
            for key in path:
                if not isinstance(node.get(key), dict):
                    raise ConfigError(f"unknown config section {key!r} in override {dotted!r}")
                node = node[key]
            if leaf not in node:
                raise ConfigError(f"unknown config key {dotted!r}")
            node[leaf] = value
        return from_dict(data)


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _split_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}") from exc
    return key.strip(), value


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {data!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in {where or 'config'}; known: {sorted(names)}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        hint = hints[f.name]
        key = f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, value, key)
        else:
            kwargs[f.name] = _coerce(value, hint, key)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    text = str(hint)
    if value is None:
        if "None" in text:
            return None
        raise ConfigError(f"{key} may not be null")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str or text.startswith("str"):
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    if text.startswith("tuple"):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(float(v) for v in value)
    return value


def from_dict(data: dict[str, Any]) -> RunConfig:
    config = _build(RunConfig, data, "")
    validate(config)
    return config


def validate(config: RunConfig) -> None:
    if config.data.cache not in ("auto", "always", "never"):
        raise ConfigError(f"data.cache must be auto, always or never, got {config.data.cache!r}")
    if config.optim.schedule not in ("constant", "cosine", "onecycle"):
        raise ConfigError(f"optim.schedule must be constant, cosine or onecycle, got {config.optim.schedule!r}")
    if config.optim.name not in ("adam", "adamw", "sgd"):
        raise ConfigError(f"optim.name must be adam, adamw or sgd, got {config.optim.name!r}")
    for key, value in (("optim.epochs", config.optim.epochs), ("optim.batch_size", config.optim.batch_size),
                       ("train.num_workers", config.train.num_workers), ("data.input_size", config.data.input_size)):
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if not 0.0 <= config.model.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {config.model.dropout}")


def available_configs() -> list[str]:
    root = resources.files("taxonet.configs")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml")
                  and not p.name.startswith(("taxonomy", "serve")))


def load_config(name_or_path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    """Load a packaged config by name (``demo``, ``resnet50_mtl``, ...) or a YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        text = path.read_text(encoding="utf-8")
    else:
        resource = resources.files("taxonet.configs").joinpath(f"{name_or_path}.yaml")
        if not resource.is_file():
            raise ConfigError(f"no config named {str(name_or_path)!r}; packaged configs: {available_configs()}, "
                              "or give a path to a .yaml file")
        text = resource.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {name_or_path} is not valid YAML: {exc}") from exc
    config = from_dict(data)
    if overrides:
        config = config.with_overrides(overrides)
    return config
