"""An ultralytics checkpoint as its own ``Model.save`` writes it (``{'model': DetectionModel, ...}``: a pickled
module, fp16): refused before anything is unpickled, with the recipe; the recipe's state dict converts and loads
into the model its yaml builds. ultralytics is not among the test extras (it moves numpy and torch); where it is
installed, this runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from models import one_line, spectral

from spectral_cli import load_spectral

ultralytics = pytest.importorskip("ultralytics")
pytestmark = pytest.mark.slow


def test_an_ultralytics_checkpoint_is_refused_with_the_recipe_and_the_recipe_converts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    YOLO("yolov8n.yaml").save("yolo.pt")  # random weights, from the yaml the package ships
    before = (tmp_path / "yolo.pt").read_bytes()

    for trust in ((), ("--trust-pickle",)):
        result = spectral("convert", "yolo.pt", *trust)
        assert result.exit_code == 3, result.output
        line = one_line(result.stderr)
        assert "'model' (ultralytics.nn.tasks.DetectionModel)" in line and "state_dict()" in line, line
    assert (tmp_path / "yolo.pt").read_bytes() == before and sorted(os.listdir(tmp_path)) == ["yolo.pt"]

    saved = torch.load("yolo.pt", weights_only=False)["model"]  # the recipe the message gives
    torch.save(saved.state_dict(), "yolo.state_dict.pt")
    result = spectral("convert", "yolo.state_dict.pt")
    assert result.exit_code == 0, result.output

    model = DetectionModel("yolov8n.yaml", verbose=False).to(next(saved.parameters()).dtype)
    done = load_spectral(model, "yolo.state_dict.spectral.pt")
    convs = {n: m for n, m in saved.named_modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)}
    assert {name for name, *_ in done.registered} == set(convs)
    for name, module in dict(model.named_modules()).items():
        if name in convs:  # fp16 weights: the kernel back within fp16's rounding
            reference = convs[name].weight.float()
            err = (module.weight.float() - reference).abs().max() / reference.abs().max()
            assert err < 2e-3, (name, float(err))
