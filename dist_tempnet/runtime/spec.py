"""The driver → worker hand-off: everything a worker needs besides the code, as one typed value.

Ray Train passes it to every worker as `train_loop_config` (a plain dict, so `to_dict` / `from_dict`);
without Ray the standalone entry point builds it in the process.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class WorkerSpec:
    config: dict[str, Any]  # the resolved, validated Config as a dict (Config.to_dict())
    tracking_uri: str = ""  # MLflow tracking URI; "" with mlflow_run_id "" means no tracking
    mlflow_run_id: str = ""  # the MLflow run rank 0 logs into (opened by the driver)
    resume_from: str = ""  # an explicit checkpoint to continue from (`train --resume`)
    under_ray: bool = False  # checkpoints go through Ray Train (RaySink) instead of a local directory
    standalone: bool = False  # no driver: rank 0 prepares the data, and closes the MLflow run

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkerSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"worker spec: unknown keys {unknown} (known: {sorted(known)})")
        return cls(**d)
