"""A checkpoint save that runs out of space names the path and leaves no staging directory."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import resource, signal, sys
    from pathlib import Path
    import torch
    from dist_tempnet.runtime.checkpoint import LocalSink
    from dist_tempnet.runtime.checkpoint.sinks import CheckpointWriteError

    class Engine:  # writes like DeepSpeed: torch.save of the model states
        def save_checkpoint(self, directory, tag, save_latest):
            d = Path(directory) / tag
            d.mkdir(parents=True, exist_ok=True)
            torch.save({"w": torch.zeros(size)}, d / "mp_rank_00_model_states.pt")

    root = Path(sys.argv[1])
    sink = LocalSink(root, keep_last=2)
    size = 10
    sink.save(Engine(), 1, {"data": None}, {}, {"step": 1}, {})
    size = 1_000_000  # 4 MB: more than the file-size limit below, like a full disk
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then writes fail with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))
    try:
        sink.save(Engine(), 2, {"data": None}, {}, {"step": 2}, {})
    except CheckpointWriteError as exc:
        print("ERROR:", exc)
    """
)


def test_disk_full_names_the_path_and_cleans_up(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ERROR:" in out.stdout and str(tmp_path / ".tmp-step_00000002") in out.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"], "no staging or partial step left"
