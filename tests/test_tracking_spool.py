"""MLflow outages never stop a run: bounded calls, a local spool, replay when the server is back.

Against a real `mlflow server` on 127.0.0.1 (SQLite) that the tests kill and restart.
"""

from __future__ import annotations

import time

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from dist_tempnet.runtime.tracking import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    PENDING_PREFIX,
    Spool,
    Tracker,
    bounded_http_env,
    replay_spool,
)
from tests._mlflow_server import MlflowServer


@pytest.fixture(autouse=True)
def _bounded_http(monkeypatch):
    for key, value in bounded_http_env().items():
        monkeypatch.setenv(key, value)
    # Bounded, but generous: a server on a busy CI machine can take seconds per call.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def test_server_down_at_start_then_killed_and_restarted(tmp_path):
    server = MlflowServer(tmp_path / "server")
    spool = tmp_path / "run" / "mlflow-spool.jsonl"
    try:
        # Down at start: the run gets a placeholder id at once instead of minutes of retries.
        tracker = Tracker(server.uri, "", spool=spool, backoff_s=0.0)
        t0 = time.monotonic()
        run_id = tracker.create_run("outage", {"mlflow.runName": "r"})
        tracker.log_params({"train.lr": 0.1})
        for step in (1, 2):
            tracker.log_metrics({"loss": 1.0 / step}, step)
        assert time.monotonic() - t0 < 10, "an unreachable server costs seconds, not minutes"
        assert run_id.startswith(PENDING_PREFIX) and spool.is_file()
        assert "2 metric values" in tracker.not_recorded() and "mlflow-replay" in tracker.not_recorded()

        # The server comes up: the next call creates the run from the spool, then logs in order.
        server.start()
        tracker.log_metrics({"loss": 0.3}, 3)
        real = tracker.resolved_run_id()
        assert not real.startswith(PENDING_PREFIX) and tracker.pending == 0
        client = MlflowClient(server.uri)
        assert client.get_run(real).data.params == {"train.lr": "0.1"}
        exp = client.get_experiment(client.get_run(real).info.experiment_id)
        assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND

        # Killed mid-run: calls are spooled (fast); after a restart the next call replays them.
        server.stop()
        t0 = time.monotonic()
        for step in (4, 5):
            tracker.log_metrics({"loss": 0.1 * step}, step)
        tracker.set_tags({"checkpoint_uri": "/ckpt/step_5"})
        assert time.monotonic() - t0 < 10 and tracker.pending == 3
        server.start()
        tracker.terminate("FINISHED", "finished")
        run = client.get_run(real)
        assert sorted(m.step for m in client.get_metric_history(real, "loss")) == [1, 2, 3, 4, 5]
        assert run.data.tags["checkpoint_uri"] == "/ckpt/step_5"
        assert run.data.tags["status_detail"] == "finished" and run.info.status == "FINISHED"
        assert tracker.not_recorded() == "" and not spool.read_text()
    finally:
        server.stop()


def test_replay_later_keeps_what_it_cannot_send(tmp_path):
    """`replay_spool` (the `mlflow-replay` command) stops at the first failure and keeps the rest."""
    server = MlflowServer(tmp_path / "server")
    spool_file = tmp_path / "mlflow-spool.jsonl"
    tracker = Tracker(server.uri, "", spool=spool_file)
    tracker.create_run("later", {})
    tracker.log_metrics({"loss": 1.0}, 1)
    tracker.terminate("FINISHED", "finished")
    assert len(Spool(spool_file)) == 4  # create_run, metrics, status_detail tag, status
    with pytest.raises(MlflowException, match="Connection refused"):
        replay_spool(spool_file)
    assert len(Spool(spool_file)) == 4, "nothing is lost while the server is still down"
    try:
        server.start()
        assert replay_spool(spool_file) == (4, 0)
        (real,) = Spool(spool_file).run_ids().values()
        assert MlflowClient(server.uri).get_run(real).info.status == "FINISHED"
    finally:
        server.stop()
