"""Run configuration: frozen dataclasses loaded from YAML, overridden from the command line.

Configs ship as package data (``taxonet/configs/*.yaml``) and are addressed by name (``--config demo``) or path.
Overrides are ``section.key=value`` strings (``train.epochs=3``, ``model.weights=null``); the value is read as YAML
and then by the type of the key it sets (:func:`_split_override`). The resolved config is saved beside every
checkpoint (:meth:`RunConfig.to_dict`).

Numbers: a number-typed key takes a number in decimal notation however a person or a template writes it: ``3``,
``-3.5e-2``, ``1e-5``, ``1E5``, ``1e+06`` (Helm, Go), ``0.00001`` (JSON), with ``_`` between digits as in Python
(``1_000`` is 1000); an integer key also takes an exact whole number written as a float (``1e+06``, ``2.0``).
YAML 1.1 alone reads ``1e-5`` as a string and ``010`` as octal 8; here both are numbers in decimal (1e-05, 10).
Hexadecimal, octal, sexagesimal (``1:30``), ``inf`` and ``nan`` are refused with the key named. A string key
keeps the text as typed (``train.run_name=007`` is ``"007"``, not 7).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from decimal import Decimal, InvalidOperation
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
    #: fine-tune: a checkpoint URI or registry reference (MODELS/NAME@ALIAS, MODELS/NAME@N) whose weights initialise
    #: the whole model; its taxonomy and architecture must match this run's (a taxonomy change needs a full run)
    init_from: str | None = None


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
    #: where training decodes the JPEG shards: "cpu" (PIL + torchvision transforms per image, in the worker's
    #: loader threads), "gpu" (one batched nvjpeg decode per batch on the worker's device, then resize and the
    #: paper's augmentations per batch there; only the JPEG bytes cross to the device) or "auto" (gpu when the
    #: worker has a CUDA device). See docs/data.md "Decoding on the device".
    decode: str = "cpu"
    #: keep the splits in Ray's object store after the first read ("auto": when the split's Parquet bytes take at
    #: most a quarter of the cluster's object store; "always"; "never": stream from storage every epoch). Reading
    #: once saves each epoch the wait for its first batch (~1.9 s per epoch on 2 CPU cores for 1,800 small crops).
    cache: str = "auto"


#: where training decodes images (DataConfig.decode)
DECODE_MODES = ("cpu", "gpu", "auto")

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
    #: Ray Train workers (one per GPU); the most an elastic run uses
    num_workers: int = 1
    #: elastic training: the fewest workers a run starts or continues with (ScalingConfig(num_workers=(min, max)));
    #: null = num_workers, a fixed size. See docs/scaling.md "Losing a node".
    min_workers: int | None = None
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    #: more resources each worker needs, merged into ScalingConfig.resources_per_worker: custom node resources
    #: (``{node_b: 0.5}``) or an accelerator type (``{"accelerator_type:H100": 0.001}``); CPU and GPU come from
    #: cpus_per_worker and gpus_per_worker
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    #: FailureConfig(max_failures): worker failures retried from the latest checkpoint
    max_failures: int = 1
    #: bf16 autocast and channels_last (only applied on GPU)
    amp: bool = True
    channels_last: bool = True
    #: limit batches per epoch (0 = all); for smoke tests and benchmarks
    max_steps_per_epoch: int = 0
    #: data-loading threads per worker for decode/augment: a number, or "auto" = the CPUs Ray gives the worker
    #: (its ``cpus_per_worker``, rounded down, at least 1)
    loader_threads: int | str = 1


#: rules for a predicted chain that is not a path of the taxonomy (taxonet.anomaly.lowest_reliable_level)
CHAIN_RULES = ("strict", "lenient")
#: the authors' rule (METHOD.md): a broken chain makes the whole answer unsure
DEFAULT_CHAIN_RULE = "strict"


@dataclass(frozen=True)
class AnomalyConfig:
    #: threshold tau = mu - k * sigma (paper's code: k = 2; later work 2.5)
    k: float = 2.0
    #: classes with fewer correctly classified training samples than this get no threshold
    min_samples: int = 2
    #: "strict" (the authors' code: a predicted chain that is not a path of the taxonomy is unsure at every rank)
    #: or "lenient" (taxonet's variant: the ranks above the first broken link stay reliable). Saved with the
    #: thresholds in the checkpoint, so evaluate, the predictor and the HTTP answer all apply the same rule.
    chain_rule: str = DEFAULT_CHAIN_RULE
    #: round tau to 0.1 as the authors' code does (off: tau keeps full precision)
    round_tau: bool = False

    def __post_init__(self) -> None:
        if self.chain_rule not in CHAIN_RULES:
            raise ConfigError(f"anomaly.chain_rule must be one of {', '.join(CHAIN_RULES)}, got {self.chain_rule!r}")


#: a model name in the registry and an alias name (``MODELS/NAME@ALIAS``): no separators, no leading dot or dash
MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: alias names start with a letter, so ``NAME@12`` (a pinned version) can never be taken for an alias
ALIAS_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class RegistryConfig:
    #: model registry root MODELS (local directory or s3://bucket/prefix); a finished run is published as the next
    #: version of MODELS/NAME. "" = do not publish (the run's own best/ is written either way)
    uri: str = ""
    #: model name in the registry; "" = the config's ``name``
    name: str = ""
    #: alias moved to the new version after publishing (e.g. "production", "staging"); "" = none
    promote: str = ""


@dataclass(frozen=True)
class RunConfig:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    anomaly: AnomalyConfig = field(default_factory=AnomalyConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)

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


@dataclass(frozen=True)
class _OverrideValue:
    """The value of one ``--set`` override: the text as typed, and its YAML reading.

    Kept together until the key's type is known (:func:`_coerce`): a number key reads the text in decimal
    notation (YAML 1.1 would give the string ``'1e-5'``), a string key keeps the text (YAML would turn ``007``
    into 7), every other key takes the YAML reading.
    """

    text: str
    parsed: Any


def _split_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}") from exc
    return key.strip(), _OverrideValue(raw.strip(), value)


#: a number in decimal notation: optional sign, digits with a fraction and/or an exponent; ``_`` only between
#: digits (Python's rule: PEP 515). Written out so that YAML 1.1's octal, hex and sexagesimal forms never match.
_DIGITS = r"[0-9](?:_?[0-9])*"
_DECIMAL_NUMBER = re.compile(rf"[+-]?(?:{_DIGITS}(?:\.(?:{_DIGITS})?)?|\.{_DIGITS})(?:[eE][+-]?{_DIGITS})?")


def _number_from_text(text: str) -> Decimal | None:
    """The exact value of ``text`` when it is a finite number in decimal notation, else None."""
    text = text.strip()
    if not _DECIMAL_NUMBER.fullmatch(text):
        return None
    try:
        value = Decimal(text.replace("_", ""))
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def _override_number_text(value: _OverrideValue) -> str:
    """The text a number key reads: as typed, or inside YAML/JSON quotes (Helm's toJson of a string "5")."""
    if _number_from_text(value.text) is None and isinstance(value.parsed, str):
        return value.parsed
    return value.text


def _as_float(value: Any, key: str) -> float:
    if isinstance(value, _OverrideValue):
        value = _override_number_text(value)
    if isinstance(value, str):
        number = _number_from_text(value)
        if number is None:
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(number)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return float(value)


def _as_int(value: Any, key: str) -> int:
    if isinstance(value, _OverrideValue):
        value = _override_number_text(value)
    shown = value
    if isinstance(value, str):
        number = _number_from_text(value)
        if number is None:
            raise ConfigError(f"{key} must be an integer, got {shown!r}")
        value = number
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be an integer, got {shown!r}")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be an integer, got {shown!r}")
        value = Decimal(value)
    if isinstance(value, Decimal):
        if value != value.to_integral_value():
            raise ConfigError(f"{key} must be an integer, got {shown!r}")
        return int(value)
    return value


def _build(cls: type, data: Any, where: str) -> Any:
    if isinstance(data, _OverrideValue):  # a whole section given as one override (`--set loss={alpha: 0.3}`)
        data = data.parsed
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
    if text == "int | None":
        if value is None or isinstance(value, _OverrideValue) and value.parsed is None:
            return None
        return _as_int(value, key)
    if text == "int | str":  # a count or a word (train.loader_threads: 4 or "auto")
        if value is None or isinstance(value, _OverrideValue) and value.parsed is None:
            raise ConfigError(f"{key} may not be null")
        if isinstance(value, _OverrideValue):
            value = value.parsed if isinstance(value.parsed, str) else value
        if isinstance(value, str) and _number_from_text(value) is None:
            return value.strip()
        return _as_int(value, key)
    if text == "dict[str, float]":
        return _as_resources(value.parsed if isinstance(value, _OverrideValue) else value, key)
    if hint is float:
        if isinstance(value, _OverrideValue) and value.parsed is None or value is None:
            raise ConfigError(f"{key} may not be null")
        return _as_float(value, key)
    if hint is int:
        if isinstance(value, _OverrideValue) and value.parsed is None or value is None:
            raise ConfigError(f"{key} may not be null")
        return _as_int(value, key)
    if isinstance(value, _OverrideValue):
        # a string key keeps what was typed when YAML would have read it as another scalar (007, 1e-5, true)
        is_string_key = hint is str or text.startswith("str")
        if is_string_key and value.parsed is not None and not isinstance(value.parsed, (str, list, dict)):
            return value.text
        value = value.parsed
    if value is None:
        if "None" in text:
            return None
        raise ConfigError(f"{key} may not be null")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true/false, got {value!r}")
        return value
    if hint is str or text.startswith("str"):
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    if text.startswith("tuple"):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(_as_float(v, f"{key}[{i}]") for i, v in enumerate(value))
    return value


def _as_resources(value: Any, key: str) -> dict[str, float]:
    """A mapping of Ray resource names to amounts per worker (``{node_b: 0.5}``)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be a mapping of resource name to amount, e.g. {{node_b: 0.5}}; got {value!r}")
    resources = {}
    for name, amount in value.items():
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{key}: resource names must be non-empty strings, got {name!r}")
        if name in ("CPU", "GPU"):
            raise ConfigError(f"{key} may not set {name}: use train.{name.lower()}s_per_worker")
        number = _as_float(amount, f"{key}.{name}")
        if number < 0:
            raise ConfigError(f"{key}.{name} must be >= 0, got {number}")
        resources[name] = number
    return resources


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
    if config.train.min_workers is not None and not 1 <= config.train.min_workers <= config.train.num_workers:
        raise ConfigError(f"train.min_workers must be between 1 and train.num_workers ({config.train.num_workers}), "
                          f"got {config.train.min_workers}")
    threads = config.train.loader_threads
    if threads != "auto" and (not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"train.loader_threads must be a number >= 1 or auto, got {threads!r}")
    if config.data.decode not in DECODE_MODES:
        raise ConfigError(f"data.decode must be one of {', '.join(DECODE_MODES)}, got {config.data.decode!r}")
    if not 0.0 <= config.model.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {config.model.dropout}")
    _validate_registry(config)


def _validate_registry(config: RunConfig) -> None:
    registry = config.registry
    if registry.promote and not registry.uri:
        raise ConfigError(f"registry.promote={registry.promote!r} needs registry.uri (the registry to publish to)")
    if registry.name and not MODEL_NAME_PATTERN.match(registry.name):
        raise ConfigError(f"registry.name {registry.name!r} is not a valid model name (letters, digits, '.', '_', "
                          "'-'; up to 128 characters)")
    if registry.uri and not registry.name and not MODEL_NAME_PATTERN.match(config.name):
        raise ConfigError(f"the config's name {config.name!r} is not a valid model name for the registry; set "
                          "registry.name")
    if registry.promote and not ALIAS_PATTERN.match(registry.promote):
        raise ConfigError(f"registry.promote {registry.promote!r} is not a valid alias name (a letter, then "
                          "letters, digits, '_' or '-')")


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
