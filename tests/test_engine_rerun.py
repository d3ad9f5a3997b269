"""``train`` on a folder that holds a run: resume, refuse, or --restart; never half of each."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from engine_fixtures import cli_args, make_cache, tiny_config
from spinegrade.cli import main
from spinegrade.data.cache import CropCache
from spinegrade.engine.train import fit

SHORT = ("train.epochs=2", "train.swa_start_epoch=2", "train.freeze_epochs=1")


def _train(capsys, cache, out, *extra):
    code = main(["train", "--cache", str(cache), "--out", str(out), *cli_args(*SHORT), *extra])
    return code, capsys.readouterr().err


def _snapshot(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("cache") / "c", n_studies=6).path


def test_finished_run_is_refused_and_restart_replaces_all_outputs(tmp_path, capsys, cache):
    run = tmp_path / "run"
    code, err = _train(capsys, cache, run)
    assert code == 0, err
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text("{}")  # an evaluate of the old run
    (run / "notes.txt").write_text("mine")            # not a run file: never touched
    before = _snapshot(run)
    assert (run / "checkpoints" / "swa.pt").is_file()

    code, err = _train(capsys, cache, run)  # the same command again
    assert code == 2 and "Traceback" not in err
    assert "finished run" in err and "--restart" in err and "new --out" in err
    assert _snapshot(run) == before  # nothing overwritten

    code, err = _train(capsys, cache, run, "--set", "train.swa=false", "--restart")
    assert code == 0, err
    names = {str(p) for p in _snapshot(run)}
    assert "checkpoints/swa.pt" not in names and "eval/metrics.json" not in names
    assert "notes.txt" in names and (run / "notes.txt").read_text() == "mine"
    assert json.loads((run / "final.json").read_text())["final_checkpoint"] == "best"
    assert (run / "report.html").stat().st_mtime_ns > 0
    assert len((run / "metrics.csv").read_text().splitlines()) == 1 + 2


class _Stop(KeyboardInterrupt):
    pass


def _interrupted_run(cache, run):
    """An unfinished run: interrupted after epoch 1's checkpoints (as by Ctrl-C)."""
    def stop(epoch, model):
        raise _Stop

    with pytest.raises(_Stop):
        fit(tiny_config(*SHORT), cache, run, on_epoch_end=stop)
    assert (run / "checkpoints" / "last.pt").is_file() and not (run / "final.json").exists()


def test_unfinished_run_of_another_config_is_refused(tmp_path, capsys, caplog, cache):
    caplog.set_level(logging.INFO, logger="spinegrade")
    run = tmp_path / "run"
    _interrupted_run(cache, run)
    before = _snapshot(run)
    code, err = _train(capsys, cache, run, "--set", "train.head_lr=1e-3")
    assert code == 2 and "train.head_lr: run has 0.0001, now 0.001" in err
    assert "--resume" in err and "--restart" in err and "new --out" in err
    assert "epoch 1" in err
    assert _snapshot(run) == before
    # Runtime-only settings may differ: the same command with more log lines resumes.
    code, err = _train(capsys, cache, run, "--set", "train.log_every=1")
    assert code == 0, err
    assert "resumed from" in caplog.text and "after epoch 1" in caplog.text
    assert (run / "final.json").is_file()
    assert "differs" not in caplog.text


def test_changed_cache_is_detected_by_resume_and_evaluate(tmp_path, capsys):
    cache = make_cache(tmp_path / "cache", n_studies=6).path
    run = tmp_path / "run"
    _interrupted_run(cache, run)
    old = CropCache.open(cache)
    relabelled = old.index.copy()
    relabelled["label"] = np.roll(relabelled["label"].to_numpy(), 1)  # same rows, other labels
    CropCache.create(cache, np.asarray(old.crops), relabelled, old.data_cfg)
    code, err = _train(capsys, cache, run, "--resume")
    assert code == 2 and "changed since the run was trained on it" in err
    assert not (run / "final.json").exists()
    code = main(["evaluate", str(run), "--checkpoint", "last", "--no-tta"])
    err = capsys.readouterr().err
    assert code == 2 and "changed since the run was trained on it" in err
    assert not (run / "eval").exists()


def test_failed_train_leaves_the_folder_as_it_was(tmp_path, capsys, cache):
    run = tmp_path / "run"
    code, err = _train(capsys, cache, run, "--set", "data.img_size=48")  # cache is 32 px
    assert code == 2 and "Traceback" not in err
    assert not run.exists() or not list(run.iterdir())


def test_resume_command_is_the_interrupted_one_plus_resume():
    from spinegrade.cli import resume_command

    argv = ["train", "--cache", "my cache", "--out", "runs/a", "--restart", "--set", "x.y=1"]
    assert resume_command(argv, "--resume", "--restart") == (
        "spinegrade train --cache 'my cache' --out runs/a --set x.y=1 --resume")
    assert resume_command(["train", "--resume"], "--resume") == "spinegrade train --resume"
    assert resume_command(["prepare", "d", "--out", "c"]) == "spinegrade prepare d --out c"
