"""τ statistics (spread, bounds, rank correlation, tail accuracy) and the τ histogram never failing a run."""

from __future__ import annotations

import math

import pytest
import torch

from dist_tempnet.tau_stats import (
    RecentSamples,
    accuracy_on_classes,
    average_ranks,
    bound_shares,
    rarest_classes,
    spearman,
    spread_metrics,
)


def test_average_ranks_share_ties():
    assert average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0])).tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]


def test_spearman_known_values():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    # Hand computed with average ranks: ranks y = [1.5, 1.5, 3, 4, 5] → ρ = 0.9746794...
    assert spearman(x, torch.tensor([0.0, 0.0, 1.0, 5.0, 9.0])) == pytest.approx(0.9746794344808963)
    assert math.isnan(spearman(x, torch.full((5,), 0.02742)))  # constant τ: undefined, not 0
    with pytest.raises(ValueError, match="equally many"):
        spearman(x, x[:3])


def test_spread_and_bound_shares():
    tau = torch.tensor([0.005, 0.005, 0.0050001, 0.02, 0.05, 0.03])
    low, high = bound_shares(tau, 0.005, 0.05)
    assert low == pytest.approx(0.5) and high == pytest.approx(1 / 6)
    stats = spread_metrics(tau, "tau/image", 0.005, 0.05)
    assert stats["tau/image_p50"] == pytest.approx(0.0125, rel=1e-5)
    assert stats["tau/image_at_min"] == pytest.approx(0.5)
    assert set(spread_metrics(tau, "x")) == {"x_p10", "x_p50", "x_p90"}


def test_rarest_third_and_its_accuracy():
    freq = [0.3, 0.01, 0.2, 0.02, 0.4, 0.07]
    assert rarest_classes(freq) == [1, 3]
    assert rarest_classes([-f for f in freq]) == [4, 0]  # the most frequent third
    labels = torch.tensor([1, 1, 3, 0, 4, 3])
    correct = torch.tensor([True, False, True, True, False, False])
    assert accuracy_on_classes(correct, labels, [1, 3]) == pytest.approx(0.5)
    assert math.isnan(accuracy_on_classes(correct, labels, [5]))


def test_recent_samples_keep_the_last():
    recent = RecentSamples(4)
    recent.add(tau=torch.tensor([1.0, 2.0, 3.0]), label=torch.tensor([0, 1, 2]))
    recent.add(tau=torch.tensor([4.0, 5.0]), label=torch.tensor([3, 4]))
    assert len(recent) == 4
    assert recent.columns["tau"].tolist() == [2.0, 3.0, 4.0, 5.0]
    assert recent.columns["label"].tolist() == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="equally long"):
        recent.add(tau=torch.ones(2), label=torch.ones(3))


def test_tau_histogram_of_collapsed_tau_is_logged_not_raised(tmp_path):
    """All τ within float resolution made numpy raise 'Too many bins' and failed a finished run."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from dist_tempnet.runtime.tracking import Tracker, histogram_range, log_tau_histogram

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("hist")).info.run_id
    tau = torch.full((512,), 0.02742)
    tau[::2] = torch.nextafter(torch.tensor(0.02742), torch.tensor(1.0))  # one ulp apart
    low, high = histogram_range(tau)
    assert low < 0.02742 < high and high - low > 1e-6
    log_tau_histogram(Tracker(uri, run_id), {"image τ": tau, "text τ": tau.clone()}, "τ", "samples")
    assert [a.path for a in client.list_artifacts(run_id)] == ["tau_histogram.png"]


def test_tau_health_flags_a_still_tau_and_a_collapse_once():
    from dist_tempnet.tau_stats import TauHealth

    def logged(p10, p50, p90, at_min=0.0, at_max=0.0):
        return {"tau/image_p10": p10, "tau/image_p50": p50, "tau/image_p90": p90,
                "tau/image_at_min": at_min, "tau/image_at_max": at_max}  # fmt: skip

    health = TauHealth(["tau/image"], 0.005, 0.05, warmup_steps=20)
    health.start(logged(0.0275, 0.0275, 0.0275))
    assert health.check(10, logged(0.0275, 0.0275, 0.0275)) == []  # still warming up
    [still] = health.check(30, logged(0.0274, 0.0274, 0.0275))
    assert "has not moved" in still and "step 30" in still
    assert health.check(40, logged(0.0274, 0.0274, 0.0275)) == []  # once
    [collapsed] = health.check(50, logged(0.005, 0.005, 0.005, at_min=0.97))
    assert "collapsed onto tau_min=0.005 for 97%" in collapsed

    moving = TauHealth(["tau/image"], 0.005, 0.05, warmup_steps=0)
    moving.start(logged(0.0275, 0.0275, 0.0275))
    assert moving.check(5, logged(0.010, 0.020, 0.040)) == []  # spread out: healthy
    assert moving.check(6, logged(0.0300, 0.0301, 0.0302)) == []  # moved as a whole: not "still"


def test_rho_at_or_above_log_candidates_is_flagged():
    from dist_tempnet.tau_stats import rho_floor_warning

    # The shipped tiny configs had rho = 8: above log(127) = 4.84 (CLIP, n = 128) and log(2048) = 7.62 (LM).
    assert "every tau is pushed down to loss.tau_min" in rho_floor_warning(8.0, 127, "negatives per anchor")
    assert "log(vocabulary size = 2048) = 7.62" in rho_floor_warning(8.0, 2048, "vocabulary size")
    assert rho_floor_warning(1.0, 127, "negatives per anchor") is None
    assert rho_floor_warning(8.0, 32000, "vocabulary size") is None  # the paper's LLaMA setting
