"""Tests for the typed dataclass config loader in lbva.training.config_io."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from lbva.training.config_io import config_to_dict, dump_toml, load_config, parse_override
from lbva.errors import UserError

# Names of the classes whose validate() ran, in call order.
VALIDATED: list[str] = []


@dataclass(frozen=True)
class DataConfig:
    root: Path = Path("data")
    sources: list[str] = field(default_factory=lambda: ["demo"])
    weights: tuple[float, ...] = (1.0,)

    def validate(self) -> None:
        VALIDATED.append("DataConfig")
        if len(self.weights) != len(self.sources):
            n_weights, n_sources = len(self.weights), len(self.sources)
            raise UserError(f"data.weights has {n_weights} entries, sources has {n_sources}")


@dataclass
class RunConfig:
    name: str = "default"
    seed: int = 0
    wandb: bool = True
    resume: Path | None = None
    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "constant"] = "cosine"
    clip: float | None = 1.0

    def validate(self) -> None:
        VALIDATED.append("OptimConfig")


@dataclass
class TrainConfig:
    # A factory default that differs from RunConfig's own defaults: partial tables must keep it.
    run: RunConfig = field(default_factory=lambda: RunConfig(name="factory"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = 1000
    eval_steps: list[int] = field(default_factory=list)

    def validate(self) -> None:
        VALIDATED.append("TrainConfig")


@dataclass
class NeedsName:
    name: str


@pytest.fixture(autouse=True)
def _clear_validated() -> None:
    VALIDATED.clear()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    return path


def error_of(*args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        load_config(TrainConfig, *args, **kwargs)
    return str(info.value)


def test_defaults() -> None:
    assert load_config(TrainConfig) == TrainConfig()


def test_file_overrides_defaults(tmp_path: Path) -> None:
    cfg = load_config(TrainConfig, write(tmp_path, "steps = 5\n[optim]\nlr = 3e-4\n"))
    assert (cfg.steps, cfg.optim.lr, cfg.optim.betas) == (5, 3e-4, (0.9, 0.999))


def test_override_beats_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[optim]\nlr = 3e-4\n")
    assert load_config(TrainConfig, path, ["optim.lr=1e-3"]).optim.lr == 1e-3


def test_base_beats_defaults_but_loses_to_file(tmp_path: Path) -> None:
    base = {"steps": 7, "optim": {"lr": 0.5}}
    cfg = load_config(TrainConfig, write(tmp_path, "[optim]\nlr = 0.25\n"), base=base)
    assert (cfg.steps, cfg.optim.lr) == (7, 0.25)


def test_partial_table_keeps_factory_default() -> None:
    cfg = load_config(TrainConfig, overrides=["run.seed=3"])
    assert (cfg.run.name, cfg.run.seed) == ("factory", 3)


def test_unknown_key_in_file_names_file_key_and_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "[optim]\nlrr = 1.0\n")
    message = error_of(path)
    assert message.startswith(f"{path}: unknown key 'optim.lrr'")
    assert "known keys in [optim]: lr, betas, schedule, clip" in message
    assert message.endswith("did you mean 'lr'?")


def test_unknown_key_without_close_match_has_no_suggestion() -> None:
    message = error_of(overrides=["zzz=1"])
    assert message.startswith("override 'zzz=1': unknown key 'zzz'; known keys in the top level")
    assert "did you mean" not in message


def test_wrong_type_names_override_and_key() -> None:
    assert error_of(overrides=["optim.lr=abc"]) == (
        "override 'optim.lr=abc': optim.lr must be a float, got 'abc' (str)"
    )


def test_table_where_value_expected(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "[optim.lr]\nx = 1\n"))
    assert "optim.lr is a single value (a float), not a table" in message


def test_value_where_table_expected() -> None:
    assert "override 'optim=3': optim is a table of settings" in error_of(overrides=["optim=3"])


def test_literal_rejects_other_values_and_lists_allowed() -> None:
    message = error_of(overrides=["optim.schedule=linear"])
    assert "optim.schedule must be one of 'cosine', 'constant', got 'linear'" in message


def test_literal_accepts_allowed_value() -> None:
    cfg = load_config(TrainConfig, overrides=["optim.schedule=constant"])
    assert cfg.optim.schedule == "constant"


def test_tuple_wrong_length() -> None:
    message = error_of(overrides=["optim.betas=[0.9]"])
    assert "optim.betas must have exactly 2 items, got 1" in message


def test_tuple_converted_and_items_checked() -> None:
    cfg = load_config(TrainConfig, overrides=["optim.betas=[0.9, 1]", "run.data.weights=[2]"])
    assert cfg.optim.betas == (0.9, 1.0) and cfg.run.data.weights == (2.0,)
    assert "optim.betas[1] must be a float" in error_of(overrides=["optim.betas=[0.9, 'x']"])


def test_list_items_checked() -> None:
    message = error_of(overrides=["run.data.sources=['a', 2]"])
    assert "run.data.sources[1] must be a string, got 2 (int)" in message


def test_toml_syntax_error_names_file(tmp_path: Path) -> None:
    path = write(tmp_path, "steps = = 3\n")
    assert error_of(path).startswith(f"{path}: invalid TOML: ")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert error_of(path) == f"{path}: config file not found"


def test_int_accepted_for_float() -> None:
    lr = load_config(TrainConfig, overrides=["optim.lr=1"]).optim.lr
    assert lr == 1.0 and type(lr) is float


@pytest.mark.parametrize(
    ("override", "expected"),
    [("run.wandb=1", "run.wandb must be a bool"), ("steps=true", "steps must be an int")],
)
def test_bool_is_strict(override: str, expected: str) -> None:
    assert expected in error_of(overrides=[override])


def test_float_not_accepted_for_int() -> None:
    assert "steps must be an int, got 2.5 (float)" in error_of(overrides=["steps=2.5"])


def test_optional_none_and_value(tmp_path: Path) -> None:
    assert load_config(TrainConfig, overrides=["optim.clip=none"]).optim.clip is None
    assert load_config(TrainConfig, write(tmp_path, '[optim]\nclip = "None"\n')).optim.clip is None
    assert load_config(TrainConfig, overrides=["optim.clip=2"]).optim.clip == 2.0
    assert load_config(TrainConfig, base={"optim": {"clip": None}}).optim.clip is None
    assert "optim.clip must be a float" in error_of(overrides=["optim.clip=big"])


def test_none_rejected_for_non_optional() -> None:
    assert "steps must be an int, got 'none' (str)" in error_of(overrides=["steps=none"])


def test_path_from_string() -> None:
    cfg = load_config(TrainConfig, overrides=["run.data.root=/tmp/x", "run.resume=ckpt/step_10"])
    assert cfg.run.data.root == Path("/tmp/x") and cfg.run.resume == Path("ckpt/step_10")


def test_validate_runs_children_before_parents() -> None:
    load_config(TrainConfig)
    assert VALIDATED == ["DataConfig", "OptimConfig", "TrainConfig"]


def test_validate_error_propagates_unchanged() -> None:
    message = error_of(overrides=["run.data.weights=[1, 2]"])
    assert message == "data.weights has 2 entries, sources has 1"


def test_missing_required_key() -> None:
    with pytest.raises(UserError, match="missing required key 'name'"):
        load_config(NeedsName)
    assert load_config(NeedsName, overrides=["name=x"]) == NeedsName("x")


def test_dump_toml_round_trip(tmp_path: Path) -> None:
    overrides = [
        'run.name="say \\"hi\\" \\\\ \\n\\ttab"',  # a TOML basic string with escapes
        "run.resume=/ckpt/a b",
        "run.wandb=false",
        "run.data.sources=['a', 'b']",
        "run.data.weights=[0.5, 1e-5]",
        "optim.clip=none",
        "optim.schedule=constant",
        "eval_steps=[10, 20]",
    ]
    cfg = load_config(TrainConfig, overrides=overrides)
    path = tmp_path / "resolved.toml"
    dump_toml(cfg, path)
    assert cfg.run.name == 'say "hi" \\ \n\ttab'
    assert load_config(TrainConfig, path) == cfg
    assert config_to_dict(cfg)["run"]["resume"] == "/ckpt/a b"


@pytest.mark.parametrize(
    ("text", "keys", "value"),
    [
        ("optim.lr=3e-4", ["optim", "lr"], 3e-4),
        ("steps=12", ["steps"], 12),
        ("run.name=demo", ["run", "name"], "demo"),
        ("run.name='quoted'", ["run", "name"], "quoted"),
        ("run.name=two words", ["run", "name"], "two words"),
        ("optim.betas=[0.9, 0.95]", ["optim", "betas"], [0.9, 0.95]),
        ("run.wandb=false", ["run", "wandb"], False),
        (" run . seed = 4 ", ["run", "seed"], 4),
    ],
)
def test_parse_override(text: str, keys: list[str], value: object) -> None:
    assert parse_override(text) == (keys, value)


@pytest.mark.parametrize("text", ["optim.lr", "=3", "optim..lr=3"])
def test_parse_override_rejects_malformed(text: str) -> None:
    with pytest.raises(UserError, match="expected section.key=value"):
        parse_override(text)
