"""Shipped configs load, the demo file says what the embedded demo runs, and each recipe is what
its comments and docs/recipes.md say: its layout fills the allocation it names, `lbva plan
--config` plans it, and every config a doc or script names exists."""

import re
from pathlib import Path

import pytest

from lbva.launchers.cli import main
from lbva.training.config import DEMO_BASE, TrainConfig
from lbva.training.config_io import load_config

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
RECIPES = ["lingbot_va_5b_mot.toml", "lingbot_va_shared.toml", "post_training.toml"]
SIX_SOURCES = {"agibot", "robomind", "interndata-a1", "oxe", "umi", "robocoin"}


def _recipe(name: str) -> TrainConfig:
    return load_config(TrainConfig, CONFIGS / name)


def _world(config: TrainConfig) -> int:
    p = config.parallel
    return p.pp * p.dp_replicate * p.dp_shard * p.cp * p.tp


def test_demo_file_equals_the_embedded_demo():
    assert load_config(TrainConfig, CONFIGS / "demo.toml") == load_config(TrainConfig, base=DEMO_BASE)


def test_every_shipped_config_loads():
    for path in CONFIGS.glob("*.toml"):
        load_config(TrainConfig, path)


@pytest.mark.parametrize("name", RECIPES)
def test_a_recipe_follows_the_papers_optimiser_and_fixes_its_world_size(name):
    config = _recipe(name)
    assert config.optim.betas == (0.9, 0.95) and config.optim.grad_clip == 2.0
    assert config.data.token_budget == 10240  # the paper packs up to 10K tokens per sequence
    # Explicit sizes: the layout says how many GPUs it was sized for (`lbva plan --config`).
    assert config.parallel.dp_shard != -1
    sized_for = re.search(r"Sized for (\d+) nodes x (\d+) H100", (CONFIGS / name).read_text())
    assert sized_for and int(sized_for[1]) * int(sized_for[2]) == _world(config)


@pytest.mark.parametrize("name", ["lingbot_va_5b_mot.toml", "lingbot_va_shared.toml"])
def test_pretraining_recipes_mix_the_six_sources_uniformly_at_the_papers_lr(name):
    config = _recipe(name)
    assert config.data.weights() == {source: 1.0 for source in SIX_SOURCES}
    assert {Path(p).name for p in config.data.prepared} == SIX_SOURCES
    assert (config.optim.lr, config.optim.weight_decay) == (1e-4, 0.01)
    assert 0 < config.optim.warmup_steps < config.run.steps and config.optim.min_lr_ratio < 1
    assert config.objective.forward_dynamics_weight == 0


def test_the_recipes_differ_only_in_the_model():
    mot, shared = _recipe("lingbot_va_5b_mot.toml"), _recipe("lingbot_va_shared.toml")
    assert (mot.model.preset, shared.model.preset) == ("lingbot-va-5b-mot", "lingbot-va-shared")
    for section in ("data", "objective", "optim", "checkpoint", "parallel"):
        assert getattr(mot, section) == getattr(shared, section), section


def test_post_training_adds_forward_dynamics_from_an_imported_checkpoint():
    config = _recipe("post_training.toml")
    assert config.objective.forward_dynamics_weight > 0
    assert (config.optim.lr, config.run.steps) == (1e-5, 3000)
    assert config.model.preset == "lingbot-va-shared"  # the released checkpoint's layout
    # The folder `lbva import lingbot SRC checkpoints/lingbot-va-base` writes.
    assert config.checkpoint.resume == "checkpoints/lingbot-va-base/step_00000000"


@pytest.mark.parametrize("name", RECIPES)
def test_lbva_plan_plans_each_recipe_on_its_own_layout(name, capsys):
    config = _recipe(name)
    assert main(["plan", "--config", str(CONFIGS / name)]) == 0
    out = capsys.readouterr().out
    p = config.parallel
    row = re.search(rf"^\s+{p.pp}\s+{p.dp_replicate}\s+{p.dp_shard}\s+{p.cp}\s+{p.tp}\s+-\s+([\d.]+)\s+([\d.]+)",
                    out, re.M)
    assert row, out
    assert f"on {_world(config) // 8} x 8 H100" in out
    assert "memory per GPU of this layout (GiB), fits" in out
    assert f"run: {config.run.steps:,} steps" in out and "GPU-hours" in out
    # What the recipe's comment quotes is what the planner says.
    memory, step_s = row.groups()
    assert f"{memory} GiB per GPU, {step_s} s per step" in (CONFIGS / name).read_text()
    assert f"`configs/{name}` | " in (REPO / "docs" / "recipes.md").read_text()
    assert f"{step_s} s, {memory} GiB/GPU" in (REPO / "docs" / "recipes.md").read_text()


def _config_mentions() -> set[str]:
    texts = [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "slurm").rglob("*.sbatch"),
             *(REPO / "slurm").rglob("*.sh"), *(REPO / "scripts").rglob("*"), *(REPO / "launchers").rglob("*.py"), *(REPO / "bench").rglob("*.py"),
             *CONFIGS.glob("*.toml")]
    found = set()
    for path in texts:
        if path.is_file():
            found |= set(re.findall(r"configs/[\w.-]+\.toml", path.read_text(errors="ignore")))
    return found


def test_every_config_a_doc_or_script_names_exists():
    mentioned = _config_mentions()
    assert "configs/lingbot_va_5b_mot.toml" in mentioned
    assert [m for m in sorted(mentioned) if not (REPO / m).is_file()] == []
