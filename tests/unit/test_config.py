"""Run config: every packaged config loads, overrides apply, unknown keys and bad types are rejected."""

from __future__ import annotations

import pytest

from taxonet.config import ConfigError, RunConfig, available_configs, from_dict, load_config

pytestmark = pytest.mark.unit

PAPER_CONFIGS = ("resnet50_mtl", "effnetb3_mtl", "resnet50_species", "effnetb3_species")


def test_the_packaged_configs_are_all_listed() -> None:
    names = available_configs()
    for name in ("demo", *PAPER_CONFIGS):
        assert name in names
    assert "serve" not in names and not any(n.startswith("taxonomy") for n in names)


@pytest.mark.parametrize("name", available_configs())
def test_each_packaged_config_loads_and_round_trips(name: str) -> None:
    config = load_config(name)
    assert isinstance(config, RunConfig)
    assert config.name == name
    assert from_dict(config.to_dict()) == config


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_follow_method_md(name: str) -> None:
    config = load_config(name)
    assert config.model.backbone == ("resnet50" if name.startswith("resnet50") else "efficientnet_b3")
    assert config.model.single_task == name.endswith("_species")
    assert (config.model.dropout, config.model.hidden) == (0.5, 512)
    assert (config.optim.name, config.optim.lr, config.optim.weight_decay) == ("adam", 1e-4, 0.0)
    assert (config.optim.epochs, config.optim.batch_size, config.data.input_size) == (20, 20, 128)
    assert (config.loss.alpha, config.loss.dependency, config.anomaly.k) == (0.5, "paper", 2.0)


def test_the_demo_config_is_cpu_sized() -> None:
    config = load_config("demo")
    assert config.model.weights is None and not config.train.use_gpu
    assert config.data.input_size <= 64


def test_overrides_from_strings_and_dicts() -> None:
    config = load_config("demo", ["optim.epochs=3", "model.weights=null", "loss.dependency=soft", "optim.lr=0.01",
                                  "data.mean=[0.5, 0.5, 0.5]", "train.run_name=x=y"])
    assert config.optim.epochs == 3
    assert config.model.weights is None
    assert config.loss.dependency == "soft"
    assert config.optim.lr == 0.01
    assert config.data.mean == (0.5, 0.5, 0.5)
    assert config.train.run_name == "x=y"  # only the first '=' separates key and value
    again = load_config("demo").with_overrides({"anomaly.k": 2.5, "model.single_task": True})
    assert again.anomaly.k == 2.5 and again.model.single_task
    assert load_config("demo").optim.epochs != 3  # the packaged file is untouched


def test_config_from_a_path(tmp_path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nmodel: {backbone: resnet18, weights: null}\noptim: {epochs: 2}\n")
    config = load_config(path)
    assert (config.name, config.model.backbone, config.optim.epochs) == ("mine", "resnet18", 2)
    assert config.optim.lr == RunConfig().optim.lr  # unspecified keys keep their defaults


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.nope=1"], r"unknown config key 'optim.nope'"),
        (["nosection.key=1"], r"unknown config section 'nosection'"),
        (["epochs"], r"must look like section.key=value"),
        (["optim.epochs=abc"], r"optim.epochs must be an integer, got 'abc'"),
        (["optim.epochs=2.5"], r"optim.epochs must be an integer"),
        (["optim.epochs=0"], r"optim.epochs must be >= 1"),
        (["optim.lr=fast"], r"optim.lr must be a number"),
        (["train.use_gpu=3"], r"train.use_gpu must be true/false"),
        (["optim.epochs=null"], r"optim.epochs may not be null"),
        (["data.mean=0.5"], r"data.mean must be a list"),
        (["loss.dependency=bogus"], r"loss.dependency must be one of paper, soft, none"),
        (["loss.alpha=1.5"], r"loss.alpha must be in \[0, 1\]"),
        (["optim.name=rmsprop"], r"optim.name must be adam, adamw or sgd"),
        (["model.dropout=1.0"], r"model.dropout must be in \[0, 1\)"),
        (["optim.epochs=[1"], r"not valid YAML"),
    ],
)
def test_bad_overrides_are_rejected_with_the_key_named(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("demo", overrides)


def test_unknown_keys_in_a_file_are_rejected(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\noptim: {epochs: 2, learning_rate: 0.1}\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['learning_rate'\] in optim"):
        load_config(path)
    path.write_text("name: bad\ntraining: {epochs: 2}\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['training'\] in config"):
        load_config(path)
    path.write_text("name: bad\noptim: 3\n")
    with pytest.raises(ConfigError, match=r"optim must be a mapping"):
        load_config(path)


def test_unknown_config_name_lists_the_packaged_ones() -> None:
    with pytest.raises(ConfigError, match=r"no config named 'resnet1000'.*demo"):
        load_config("resnet1000")


def test_configs_are_frozen() -> None:
    config = load_config("demo")
    with pytest.raises(AttributeError):
        config.optim.epochs = 5  # type: ignore[misc]


def test_learning_rate_schedules_are_pure_functions_of_the_epoch() -> None:
    from taxonet.train.loop import learning_rate

    def rates(schedule: str, epochs: int = 10) -> list[float]:
        optim = load_config("demo", {"optim.schedule": schedule, "optim.epochs": epochs, "optim.lr": 1e-3}).optim
        return [learning_rate(optim, e) for e in range(epochs)]

    assert rates("constant") == [1e-3] * 10
    cosine = rates("cosine")
    assert cosine[0] == pytest.approx(1e-3) and all(a > b > 0 for a, b in zip(cosine, cosine[1:]))
    onecycle = rates("onecycle")  # warm-up over 3 epochs from lr/25, peak at epoch 3, then decay
    assert onecycle[0] == pytest.approx(4e-5) and onecycle[3] == pytest.approx(1e-3) == max(onecycle)
    assert all(a < b for a, b in zip(onecycle[:3], onecycle[1:4]))
    assert all(a > b > 0 for a, b in zip(onecycle[3:], onecycle[4:]))
    with pytest.raises(ConfigError, match="onecycle"):
        load_config("demo", {"optim.schedule": "step"})


# ---------------------------------------------------------------------------------------------------- scaling keys
def test_min_workers_defaults_to_a_fixed_size_and_parses() -> None:
    assert load_config("demo").train.min_workers is None
    config = load_config("demo", ["train.num_workers=4", "train.min_workers=2"])
    assert (config.train.min_workers, config.train.num_workers) == (2, 4)
    assert load_config("demo", ["train.min_workers=null"]).train.min_workers is None
    assert load_config("demo", ["train.min_workers='1'"]).train.min_workers == 1
    assert from_dict(config.to_dict()) == config


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.num_workers=2", "train.min_workers=3"], r"train.min_workers must be between 1 and train.num_workers"),
    (["train.min_workers=0"], r"train.min_workers must be between 1"),
    (["train.min_workers=two"], r"train.min_workers must be an integer"),
    (["train.min_workers=1.5"], r"train.min_workers must be an integer"),
])
def test_bad_min_workers_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("demo", overrides)


def test_resources_per_worker_parse_from_yaml_and_overrides(tmp_path) -> None:
    assert load_config("demo").train.resources_per_worker == {}
    config = load_config("demo", ["train.resources_per_worker={node_b: 0.5, 'accelerator_type:H100': 1e-3}"])
    assert config.train.resources_per_worker == {"node_b": 0.5, "accelerator_type:H100": 0.001}
    assert from_dict(config.to_dict()) == config
    path = tmp_path / "r.yaml"
    path.write_text("train: {resources_per_worker: {node_b: 1}}\n")
    assert load_config(path).train.resources_per_worker == {"node_b": 1.0}


@pytest.mark.parametrize(("value", "message"), [
    ("[node_b]", r"must be a mapping of resource name to amount"),
    ("{CPU: 2}", r"may not set CPU: use train.cpus_per_worker"),
    ("{GPU: 1}", r"may not set GPU: use train.gpus_per_worker"),
    ("{node_b: -1}", r"train.resources_per_worker.node_b must be >= 0"),
    ("{node_b: lots}", r"train.resources_per_worker.node_b must be a number"),
    ("{node_b: .nan}", r"must be a finite number"),
])
def test_bad_resources_per_worker_are_refused(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("demo", [f"train.resources_per_worker={value}"])


def test_loader_threads_take_a_count_or_auto() -> None:
    assert load_config("demo").train.loader_threads == 1
    assert load_config("demo", ["train.loader_threads=auto"]).train.loader_threads == "auto"
    assert load_config("demo", ["train.loader_threads=6"]).train.loader_threads == 6
    assert load_config("demo", ["train.loader_threads='6'"]).train.loader_threads == 6
    for bad, message in (("many", "must be a number >= 1 or auto"), ("0", "must be a number >= 1 or auto"),
                         ("2.5", "must be an integer"), ("null", "may not be null")):
        with pytest.raises(ConfigError, match=message):
            load_config("demo", [f"train.loader_threads={bad}"])


def test_decode_modes() -> None:
    assert load_config("demo").data.decode == "cpu"  # CPU runs unchanged by default
    for mode in ("cpu", "gpu", "auto"):
        assert load_config("demo", [f"data.decode={mode}"]).data.decode == mode
    with pytest.raises(ConfigError, match=r"data.decode must be one of cpu, gpu, auto, got 'nvjpeg'"):
        load_config("demo", ["data.decode=nvjpeg"])
