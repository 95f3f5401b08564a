"""The trainer never loses the last good state and never "succeeds" on nothing: weights that are
not finite are never committed or exported and stop the run with one line, the good checkpoints
kept; a run whose samples are all bad stops naming source and shards; a second run into a folder
that holds a run's checkpoints is refused before training; a changed optimizer or schedule
setting at resume is applied (the config wins) and said once per key."""

import math
import shutil

import pytest
from rich.console import Console

from lbva.checkpoints_tools.manager import committed_steps, step_dir
from lbva.errors import UserError
from lbva.launchers import cli
from lbva.training import trainer
from lbva.training.metrics import read_metrics
from lbva.training.optim import lr_factor

from helpers import prepared_demo, tiny_train_config
from test_bad_data_ranks import string_latents

QUIET = Console(quiet=True)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return prepared_demo(tmp_path_factory.mktemp("data"), num_episodes=4, frames_per_episode=33, image_size=64, seed=1)


def _config(dataset, out, *overrides):
    # Validation only at the last step: it would double the cost of these short runs.
    return tiny_train_config(dataset, out, "checkpoint.async_save=false", "run.eval_every=1000", *overrides)


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def six_good_steps(dataset, tmp_path_factory):
    """Checkpoints 2, 4, 6 (keep_last 3) and model.safetensors of a finite six-step run, to copy."""
    out = tmp_path_factory.mktemp("good")
    trainer.train(_config(dataset, out, "run.name=r", "run.steps=6", "checkpoint.every=2", "checkpoint.keep_last=3"),
                  QUIET)
    return out / "r"


def _copy(run_dir, tmp_path):
    shutil.copytree(run_dir, tmp_path / "r")
    return tmp_path / "r"


def poison_update(monkeypatch, step: int, *, everything: bool = True) -> None:
    """The optimizer update of training step `step` makes the weights non-finite after the fact
    (every weight NaN, or one entry inf), while that step's own loss and gradients were finite."""
    original_build = trainer.build_optimizer

    def build_optimizer(model, optim):
        optimizer = original_build(model, optim)

        def poison(*_):
            # AdamW's own step count (loaded on resume), not the calls: loading runs one step too.
            if int(next(iter(optimizer.state.values()))["step"]) != step:
                return
            if everything:
                for parameter in model.parameters():
                    parameter.data.fill_(math.nan)
            else:
                next(model.parameters()).data.view(-1)[0] = math.inf

        optimizer.register_step_post_hook(poison)
        return optimizer

    monkeypatch.setattr(trainer, "build_optimizer", build_optimizer)


RESUME = ("checkpoint.every=2", "checkpoint.keep_last=3", "checkpoint.resume=auto", "run.name=r")


def test_the_issues_resume_with_an_infinite_lr_is_refused_before_anything_changes(dataset, tmp_path, six_good_steps,
                                                                                  capsys):
    run_dir = _copy(six_good_steps, tmp_path)
    before = _files(run_dir)
    status = cli.main(["train", "model.preset=tiny-mot", f"data.prepared=['{dataset}']", f"run.output_dir={tmp_path}",
                       "run.steps=14", "optim.lr=inf", *RESUME])
    assert status == 2
    assert capsys.readouterr().err == "lbva: error: optim.lr must be a finite number > 0 and <= 1, got inf\n"
    assert _files(run_dir) == before


def test_a_resume_whose_weights_go_nan_stops_and_keeps_the_good_checkpoints(dataset, tmp_path, six_good_steps,
                                                                            monkeypatch):
    run_dir = _copy(six_good_steps, tmp_path)
    before = _files(run_dir / "checkpoints"), (run_dir / "model.safetensors").read_bytes()
    poison_update(monkeypatch, 7)  # steps 8, 9, 10 are skipped, and the saves at 8 and 10 refused
    console = Console(record=True, width=400)
    with pytest.raises(UserError) as raised:
        trainer.train(_config(dataset, tmp_path, "run.steps=14", *RESUME), console)
    assert "resume: optim" not in console.export_text()  # nothing changed but the run length
    assert str(raised.value) == ("optim.max_nonfinite_steps: 3 steps in a row (up to step 10) had a non-finite loss "
                                 "or gradient norm; stopped, the last good weights are in the checkpoint of step 6")
    assert committed_steps(run_dir / "checkpoints") == [2, 4, 6]
    assert (_files(run_dir / "checkpoints"), (run_dir / "model.safetensors").read_bytes()) == before


def test_weights_that_are_not_finite_at_the_end_stop_the_run_without_exporting_them(dataset, tmp_path, six_good_steps,
                                                                                    monkeypatch):
    run_dir = _copy(six_good_steps, tmp_path)
    weights = (run_dir / "model.safetensors").read_bytes()
    poison_update(monkeypatch, 7)  # step 7 breaks the weights, step 8 is skipped (1 of 3): the run ends with them
    with pytest.raises(UserError, match=r"^step 8: the weights are not finite .*the last good weights are in the "
                                        r"checkpoint of step 6$"):
        trainer.train(_config(dataset, tmp_path, "run.steps=8", *RESUME), QUIET)
    assert committed_steps(run_dir / "checkpoints") == [2, 4, 6]
    assert (run_dir / "model.safetensors").read_bytes() == weights


def test_one_infinite_weight_is_never_committed(dataset, tmp_path, monkeypatch):
    poison_update(monkeypatch, 3, everything=False)
    config = _config(dataset, tmp_path, "run.name=inj", "run.steps=3", "checkpoint.every=1")
    with pytest.raises(UserError, match=r"^step 3: the weights are not finite.*checkpoint of step 2$"):
        trainer.train(config, QUIET)
    assert committed_steps(tmp_path / "inj" / "checkpoints") == [1, 2]
    assert not (tmp_path / "inj" / "model.safetensors").exists()


def test_the_same_run_started_again_from_scratch_is_refused_before_training(dataset, tmp_path, six_good_steps):
    run_dir = _copy(six_good_steps, tmp_path)
    before = _files(run_dir / "checkpoints"), (run_dir / "metrics.jsonl").read_text()
    with pytest.raises(UserError) as raised:
        trainer.train(_config(dataset, tmp_path, "run.name=r", "run.steps=6", "checkpoint.every=2"), QUIET)
    assert str(raised.value) == (f"checkpoint.resume=none: {run_dir} already holds checkpoints up to step 6 and this "
                                 "run starts from scratch; set checkpoint.resume=auto to continue that run, or choose "
                                 "another run.name")
    assert (_files(run_dir / "checkpoints"), (run_dir / "metrics.jsonl").read_text()) == before


def test_resuming_from_an_older_checkpoint_into_a_folder_with_newer_ones_is_refused(dataset, tmp_path, six_good_steps):
    run_dir = _copy(six_good_steps, tmp_path)
    older = step_dir(run_dir / "checkpoints", 4)
    with pytest.raises(UserError, match=r"already holds checkpoints up to step 6 and this run starts at step 4;"):
        trainer.train(_config(dataset, tmp_path, "run.name=r", "run.steps=8", f"checkpoint.resume={older}"), QUIET)
    assert committed_steps(run_dir / "checkpoints") == [2, 4, 6]


CHANGED = {"optim.lr": ("0.0001", "0.0003"), "optim.betas": ("[0.9, 0.95]", "[0.8, 0.9]"),
           "optim.eps": ("1e-08", "1e-06"), "optim.weight_decay": ("0.01", "0.05"),
           "optim.warmup_steps": ("2", "0"), "optim.min_lr_ratio": ("0.1", "0.5"), "run.steps": ("6", "8")}


def test_changed_optimizer_settings_at_resume_are_applied_and_said_once_each(dataset, tmp_path, six_good_steps,
                                                                             monkeypatch):
    run_dir = _copy(six_good_steps, tmp_path)
    optimizers, original_build = [], trainer.build_optimizer
    monkeypatch.setattr(trainer, "build_optimizer", lambda *args: optimizers.append(original_build(*args))
                        or optimizers[-1])
    console = Console(record=True, width=400)
    overrides = [f"{key}={new}" for key, (_, new) in CHANGED.items()]
    config = _config(dataset, tmp_path, "run.name=r", "checkpoint.resume=auto", *overrides)
    trainer.train(config, console)
    printed = console.export_text()
    for key, (old, new) in CHANGED.items():
        assert printed.count(f"resume: {key} {old} -> {new} (the config wins over the checkpoint)") == 1, key
    decayed, plain = optimizers[0].param_groups
    assert (decayed["betas"], decayed["eps"], decayed["weight_decay"], plain["weight_decay"]) == ((0.8, 0.9), 1e-6,
                                                                                                   0.05, 0.0)
    lrs = {r["step"]: r["lr"] for r in read_metrics(run_dir / "metrics.jsonl") if r["step"] > 6}
    assert lrs == pytest.approx({s: 3e-4 * lr_factor(s, 8, config.optim) for s in (7, 8)})


def test_a_run_whose_shards_are_all_unreadable_stops_in_one_line_naming_them(dataset, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    shards = sorted((data / "shards").rglob("*.tar"))
    for shard in shards:
        shard.write_bytes(b"not a tar file" * 64)
    out = tmp_path / "runs"
    status = cli.main(["train", "model.preset=tiny-mot", f"data.prepared=['{data}']", f"run.output_dir={out}",
                       "run.name=bad", "data.text_tokens=8", "data.window_frames=4", "data.token_budget=256",
                       "data.pad_multiple=32", "run.steps=4", "run.log_every=1"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert err.startswith("lbva: error: data.max_skipped_fraction: step 1 has no real token; ")
    assert "bad samples by source: pusher " in err and str(shards[0]) in err
    assert not (out / "bad" / "model.safetensors").exists() and committed_steps(out / "bad" / "checkpoints") == []


def test_the_fail_policy_stops_lbva_train_with_one_line_naming_the_sample(dataset, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    string_latents(data, "pusher__e000001__s000")
    status = cli.main(["train", "model.preset=tiny-mot", f"data.prepared=['{data}']", f"run.output_dir={tmp_path}",
                       "run.name=fail", "data.on_error=fail", "data.text_tokens=8", "data.window_frames=4",
                       "data.token_budget=256", "data.pad_multiple=32", "run.steps=4", "data.validation_fraction=0"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert err.startswith("lbva: error: undecodable: sample pusher__e000001__s000 in ") and "latents of dtype |S2" in err
