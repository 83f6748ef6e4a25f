"""Training curves: the smoothed loss line is TensorBoard's debiased EMA, drawn over the raw values."""

import pytest

from nuwa_train.viz import exponential_moving_average, plot_training_curves


def test_the_moving_average_is_debiased_and_follows_a_step_with_the_expected_lag():
    assert exponential_moving_average([2.0] * 5) == pytest.approx([2.0] * 5)  # no pull towards 0 at the start
    smoothed = exponential_moving_average([0.0] * 50 + [1.0] * 50, smoothing=0.9)
    assert smoothed[49] == pytest.approx(0.0) and smoothed[50] == pytest.approx(0.1, rel=1e-2)
    assert smoothed[50 + 21] == pytest.approx(1 - 0.9**22, rel=1e-2)  # a step reaches 90% after ~22 points
    assert exponential_moving_average([1.0, 3.0], smoothing=0.5) == pytest.approx([1.0, 7 / 3])


def test_curves_png_is_written_with_raw_and_smoothed_losses(tmp_path):
    rows = ["epoch,step,train/hard,train/lm_loss,train/temperature"]
    rows += [f"0,{step},{float(step >= 10)},{1.0 / (1 + step) + (step % 3) * 0.1},{0.5**step}" for step in range(30)]
    (tmp_path / "metrics.csv").write_text("\n".join(rows) + "\n")
    path = plot_training_curves(
        {"run": tmp_path / "metrics.csv", "missing": tmp_path / "none.csv"},
        tmp_path / "curves.png",
        metrics=("train/lm_loss", "train/temperature"),
    )
    assert path.stat().st_size > 0
