"""The colour-reliance diagnostic: accuracy on training environments with the colours swapped."""
from __future__ import annotations

import pytest
import torch

from domainbed_sil import colour_reliance, train


def colour_only(x: torch.Tensor) -> torch.Tensor:
    """Logit (N, 1): red ink minus green ink; predicts the label colour ColoredMNIST paints."""
    return (x[:, 0].flatten(1).sum(1) - x[:, 1].flatten(1).sum(1))[:, None]


def colour_blind(x: torch.Tensor) -> torch.Tensor:
    """Logit (N, 1) from the grey image only: ink above a threshold."""
    return (x.sum(1).flatten(1).sum(1) - 20.0)[:, None]


def test_swapping_twice_restores_the_images_and_other_shapes_are_refused():
    x = torch.rand(3, 2, 14, 14)
    assert torch.equal(colour_reliance.swap_colour_channels(colour_reliance.swap_colour_channels(x)), x)
    assert not torch.equal(colour_reliance.swap_colour_channels(x), x)
    with pytest.raises(ValueError, match=r"shape \(N, 2, H, W\), got \(3, 3, 14, 14\)"):
        colour_reliance.swap_colour_channels(torch.rand(3, 3, 14, 14))


def test_a_colour_reader_collapses_and_a_colour_blind_model_is_unchanged(cmnist):
    env = cmnist.environments[0]  # colour agrees with the label 80% of the time
    accuracy, swapped = colour_reliance.colour_swap_accuracies(colour_only, env.x, env.y, chunk=7_000)
    which = 1 - accuracy if accuracy < 0.5 else accuracy  # red may stand for either label
    assert which == pytest.approx(0.8, abs=0.01) and accuracy + swapped == pytest.approx(1.0)
    accuracy, swapped = colour_reliance.colour_swap_accuracies(colour_blind, env.x, env.y)
    assert accuracy == swapped


def test_cli_reports_no_change_for_the_grayscale_oracle_and_refuses_a_run_without_model(data_dir, tmp_path, capsys):
    common = ["--data_dir", str(data_dir), "--steps", "2", "--threads", "1",
              "--hparams", '{"grayscale_model": true, "hidden_dim": 8, "train_env_size": 2000}']
    assert train.main([*common, "--output_dir", str(tmp_path / "oracle")]) == 0
    capsys.readouterr()
    assert colour_reliance.main([str(tmp_path / "oracle"), "--data_dir", str(data_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all(line.endswith("change  +0.0") for line in lines[1:])
    assert train.main([*common, "--output_dir", str(tmp_path / "no_model"), "--skip_model_save"]) == 0
    assert colour_reliance.main([str(tmp_path / "no_model"), "--data_dir", str(data_dir)]) == 2
    assert "no model.pt" in capsys.readouterr().err
