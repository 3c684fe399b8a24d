"""YAML -> frozen dataclass configs: unknown keys, wrong types, bad YAML, missing files, CLI overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from trn.config import from_dict, load_config, parse_override, to_dict
from trn.errors import ConfigError


@dataclass(frozen=True)
class Optim:
    lr: float = 0.1
    name: Literal["sgd", "adam"] = "sgd"


@dataclass(frozen=True)
class Cfg:
    epochs: int = 3
    scale: float = 1.0
    augment: bool = True
    out: str = "runs/x"
    data_dir: str | None = None
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    shape: tuple[int, ...] = (1, 28, 28)
    extra: dict = field(default_factory=dict)
    optim: Optim = field(default_factory=Optim)

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")


def _yaml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_defaults_without_file() -> None:
    cfg = load_config(Cfg)
    assert cfg == Cfg()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 5  # type: ignore[misc]


def test_yaml_file_is_read_and_coerced(tmp_path: Path) -> None:
    p = _yaml(tmp_path, "epochs: 7\nscale: 2\nsizes: [3, 4]\nshape: [3, 32, 32]\noptim: {lr: 0.5, name: adam}\n")
    cfg = load_config(Cfg, p)
    assert cfg.epochs == 7
    assert cfg.scale == 2.0 and isinstance(cfg.scale, float)  # int -> float is lossless
    assert cfg.sizes == [3, 4] and cfg.shape == (3, 32, 32)
    assert cfg.optim == Optim(lr=0.5, name="adam")
    assert to_dict(cfg)["optim"] == {"lr": 0.5, "name": "adam"}


def test_no_config_file_gives_defaults() -> None:
    assert load_config(Cfg) == Cfg()
    assert load_config(Cfg, overrides=["epochs=7"]) == Cfg(epochs=7)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "\n\n"])
def test_config_file_without_options_is_refused(tmp_path: Path, text: str) -> None:
    # Running the defaults from a file that says nothing would silently write to the default output path.
    with pytest.raises(ConfigError, match="holds no options"):
        load_config(Cfg, _yaml(tmp_path, text))


def test_unknown_key_lists_valid_options(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['epoch'\].*valid options") as exc:
        load_config(Cfg, _yaml(tmp_path, "epoch: 3\n"))
    assert "epochs" in str(exc.value)
    with pytest.raises(ConfigError, match=r"optim: unknown option\(s\) \['momentum'\]"):
        load_config(Cfg, _yaml(tmp_path, "optim: {momentum: 0.9}\n"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("epochs: three\n", "epochs: expected an integer"),
        ("epochs: 2.5\n", "epochs: expected an integer"),
        ("epochs: true\n", "epochs: expected an integer"),  # bool is not an int here
        ("scale: fast\n", "scale: expected a number"),
        ("augment: 1\n", "augment: expected true/false"),
        ("out: 3\n", "out: expected a string"),
        ("sizes: 3\n", "sizes: expected a list"),
        ("sizes: [1, x]\n", r"sizes\[1\]: expected an integer"),
        ("extra: [1]\n", "extra: expected a mapping"),  # bare ``dict`` annotation (arch_kwargs is one)
        ("optim: {name: rmsprop}\n", r"optim.name: must be one of \['sgd', 'adam'\]"),
        ("optim: 3\n", "optim: expected a mapping"),
        ("data_dir: 5\n", "data_dir: expected a string"),
    ],
)
def test_wrong_types(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(Cfg, _yaml(tmp_path, text))


def test_optional_accepts_none(tmp_path: Path) -> None:
    assert load_config(Cfg, _yaml(tmp_path, "data_dir: null\n")).data_dir is None
    assert load_config(Cfg, _yaml(tmp_path, "data_dir: /d\n")).data_dir == "/d"


def test_dataclass_validation_becomes_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="epochs must be >= 0"):
        load_config(Cfg, _yaml(tmp_path, "epochs: -1\n"))


def test_bad_yaml_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Cfg, _yaml(tmp_path, "epochs: [1, 2\n"))
    with pytest.raises(ConfigError, match="mapping of options at top level"):
        load_config(Cfg, _yaml(tmp_path, "- 1\n- 2\n"))
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00epochs: 1")  # not UTF-8 text: a clear error, not a UnicodeDecodeError
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Cfg, binary)
    with pytest.raises(ConfigError, match="expected a mapping of options"):
        from_dict(Cfg, [1, 2])


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Cfg, _yaml(tmp_path, "out: !!python/object/apply:os.system ['echo hi']\n"))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found") as exc:
        load_config(Cfg, tmp_path / "nope.yaml")
    assert "nope.yaml" in str(exc.value)


def test_overrides(tmp_path: Path) -> None:
    p = _yaml(tmp_path, "epochs: 7\noptim: {lr: 0.5}\n")
    cfg = load_config(Cfg, p, ["epochs=2", "optim.name=adam", "sizes=[5, 6]", "data_dir=null", "out=a=b"])
    assert cfg.epochs == 2 and cfg.optim == Optim(lr=0.5, name="adam")
    assert cfg.sizes == [5, 6] and cfg.data_dir is None
    assert cfg.out == "a=b"  # only the first '=' splits
    assert load_config(Cfg, None, ["optim.lr=1.0e-3"]).optim.lr == pytest.approx(1e-3)
    # PyYAML follows YAML 1.1, where 1e-3 (no dot) is a string: it is rejected with a clear message
    with pytest.raises(ConfigError, match="optim.lr: expected a number, got str '1e-3'"):
        load_config(Cfg, None, ["optim.lr=1e-3"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("epochs", "must look like key=value"),
        ("epochs=x", "epochs: expected an integer"),
        ("nope=1", r"unknown option\(s\) \['nope'\]"),
        ("optim.nope=1", r"optim: unknown option\(s\) \['nope'\]"),
        ("epochs.x=1", "epochs is not a section"),
        ("sizes=[1, 2", "not valid YAML"),
    ],
)
def test_bad_overrides(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(Cfg, _yaml(tmp_path, "epochs: 7\n"), [override])


def test_parse_override() -> None:
    assert parse_override("a.b= 3") == (["a", "b"], 3)
    assert parse_override("x=true") == (["x"], True)
    assert parse_override("x=") == (["x"], None)


def test_shipped_classifier_config_loads() -> None:
    from trn.train_classifier import ClassifierTrainConfig

    path = Path(__file__).resolve().parents[1] / "configs" / "classifier_fmnist.yaml"
    cfg = load_config(ClassifierTrainConfig, path, ["epochs=1"])
    assert cfg.arch == "small_cnn" and cfg.dataset == "fashion-mnist" and cfg.epochs == 1
    assert cfg.out == "checkpoints/fmnist_guard"


_MANIFESTS = {"kuberay-rayservice.yaml", "serve_deploy.yaml"}  # deployment manifests, checked in tests/test_serve.py


def _config_loader(name: str):
    """The loader of a file in configs/, by its name (the command that reads it)."""
    from trn.eval_downstream import DownstreamEvalConfig
    from trn.evaluate import EvalConfig
    from trn.evaluate_defenses import DefenseEvalConfig
    from trn.robustness import AdaptiveEvalConfig
    from trn.serve_config import load_serve_config
    from trn.train_agnostic import AgnosticTrainConfig
    from trn.train_classifier import ClassifierTrainConfig
    from trn.train_robust import RobustTrainConfig
    from trn.train_trn import TRNTrainConfig

    if name.startswith("serve"):
        return load_serve_config
    table = [  # (file-name prefix, config class); the first match wins
        ("classifier_", ClassifierTrainConfig), ("zoo_", ClassifierTrainConfig),
        ("eval_adaptive", AdaptiveEvalConfig), ("eval_robust", AdaptiveEvalConfig),
        ("eval_defenses", DefenseEvalConfig), ("eval_downstream", DownstreamEvalConfig), ("eval_", EvalConfig),
        ("trn_fmnist_agnostic", AgnosticTrainConfig), ("trn_fmnist_robust", RobustTrainConfig),
        ("trn_fmnist_fallback", RobustTrainConfig), ("trn_fmnist", TRNTrainConfig),
    ]
    for prefix, cls in table:
        if name.startswith(prefix):
            return lambda path: load_config(cls, path)
    raise AssertionError(f"configs/{name}: no loader known for this name; add it to the table")


@pytest.mark.parametrize(
    "path",
    [p for p in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")) if p.name not in _MANIFESTS],
    ids=lambda p: p.name,
)
def test_every_shipped_config_loads(path: Path) -> None:
    """Each file in configs/ parses into the config of the command that reads it: no unknown key, no bad type."""
    cfg = _config_loader(path.name)(path)
    assert dataclasses.is_dataclass(cfg) or type(cfg).__name__ == "ServeConfig"
