"""The run folder module: paths, checkpoint payload round trip, writers."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from spinegrade.config import config_to_dict, load_config
from spinegrade.engine import run_folder as rf
from spinegrade.engine.checkpoint import load_checkpoint, save_checkpoint
from spinegrade.errors import UserError


def test_paths_are_the_documented_names(tmp_path):
    run = rf.RunFolder(str(tmp_path))
    assert run.root == tmp_path
    assert run.run_info == tmp_path / "run.json"
    assert run.split == tmp_path / "split.csv"
    assert run.checkpoint("swa") == tmp_path / "checkpoints" / "swa.pt"
    assert run.eval_dir == tmp_path / "eval"
    with pytest.raises(UserError, match="choose one of best, last, swa"):
        run.checkpoint("final")


def test_info_and_final_checkpoint_fall_back_when_files_are_missing(tmp_path):
    run = rf.RunFolder(tmp_path)
    assert run.read_info() == {} and run.final_checkpoint() == "best"
    run.final.write_text(json.dumps({"final_checkpoint": "swa"}))
    assert run.final_checkpoint() == "swa"
    run.final.write_text(json.dumps({"final_checkpoint": "something else"}))
    assert run.final_checkpoint() == "best"


def test_classifier_payload_round_trips_and_keeps_format_1_keys(tmp_path):
    cfg = load_config("demo")
    model = nn.Linear(3, 2)
    payload = rf.checkpoint_payload(cfg, 4, model, fold=1, metrics={"ba": 0.5})
    assert list(payload) == ["config", "epoch", "fold", "model", "metrics"]  # no "kind"
    path = save_checkpoint(tmp_path / "best.pt", payload)
    ck = rf.read_checkpoint(path)
    assert (ck.epoch, ck.fold, ck.extra) == (4, 1, {"metrics": {"ba": 0.5}})
    assert ck.config == config_to_dict(cfg) and ck.cfg == cfg
    torch.testing.assert_close(ck.model["weight"], model.weight.detach())


def test_a_localizer_checkpoint_is_not_read_as_a_classifier(tmp_path):
    cfg = load_config("localizer")
    payload = rf.checkpoint_payload(cfg, 0, nn.Linear(1, 1), kind=rf.LOCALIZER, task={"name": "t"})
    assert payload["kind"] == "localizer" and "fold" not in payload
    path = save_checkpoint(tmp_path / "loc.pt", payload)
    with pytest.raises(UserError, match="not a classifier checkpoint"):
        rf.read_checkpoint(path)
    assert rf.read_checkpoint(path, kind=rf.LOCALIZER).extra == {"task": {"name": "t"}}
    assert load_checkpoint(path)["task"] == {"name": "t"}


def test_predictions_frame_maps_rows_to_studies_and_levels():
    index = pd.DataFrame({"row": [0, 1, 2], "study_id": [7, 7, 9]})
    pred = {"row": np.array([2, 0]), "level": np.array([4, 0]), "label": np.array([1, 0]),
            "probs": np.array([[0.2, 0.5, 0.3], [0.9, 0.05, 0.05]])}
    frame = rf.predictions_frame(pred, index)
    assert list(frame.columns) == ["row", "study_id", "level", "label", "prob_normal_mild",
                                   "prob_moderate", "prob_severe"]
    assert frame["study_id"].tolist() == [9, 7] and frame["level"].tolist() == ["l5_s1", "l1_l2"]
    assert frame["prob_moderate"].tolist() == [0.5, 0.05]


def test_json_writer_and_nan_to_none(tmp_path):
    row = rf.nan_to_none({"a": math.nan, "b": 1.5, "c": "x", "d": np.float64("nan")})
    assert row == {"a": None, "b": 1.5, "c": "x", "d": None}
    rf.write_json(tmp_path / "x.json", {"n": np.int64(3), "v": np.arange(2), **row})
    text = (tmp_path / "x.json").read_text()
    assert text.endswith("}\n") and json.loads(text) == {"n": 3, "v": [0, 1], **row}
