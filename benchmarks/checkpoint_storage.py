"""Checkpoint save and restore time: an S3-compatible object store (moto on 127.0.0.1) vs local disk.

Takes a real checkpoint directory of the tiny CLIP job (`--checkpoint`, e.g. a `step_*` dir under
`<output_dir>/ray/<name>`) and times what Ray Train does with it at a save (copy the rank's directory
to the storage path with pyarrow) and what a restore does (copy it back to a local directory), with
the storage path on local disk and on the object store.

    python benchmarks/checkpoint_storage.py --checkpoint runs/ray/<name>/step_00000004 --repeat 5
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _time(fn, repeat: int) -> float:
    times = []
    for i in range(repeat):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()

    import boto3
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto logs every request
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bench")
    from dist_tempnet.runtime.storage import filesystem

    s3, _ = filesystem("s3://bench")
    local = pafs.LocalFileSystem()
    src = str(args.checkpoint.resolve())
    size = sum(f.stat().st_size for f in args.checkpoint.rglob("*") if f.is_file())
    with tempfile.TemporaryDirectory() as tmp:

        def save_local(i: int) -> None:
            pafs.copy_files(src, f"{tmp}/store/{i}", source_filesystem=local, destination_filesystem=local)

        def save_s3(i: int) -> None:
            pafs.copy_files(src, f"bench/ckpt/{i}", source_filesystem=local, destination_filesystem=s3)

        def restore_local(i: int) -> None:
            dest = f"{tmp}/restore-local/{i}"
            pafs.copy_files(f"{tmp}/store/{i}", dest, source_filesystem=local, destination_filesystem=local)

        def restore_s3(i: int) -> None:
            dest = f"{tmp}/restore-s3/{i}"
            pafs.copy_files(f"bench/ckpt/{i}", dest, source_filesystem=s3, destination_filesystem=local)

        rows = [
            ("save", _time(save_local, args.repeat), _time(save_s3, args.repeat)),
            ("restore", _time(restore_local, args.repeat), _time(restore_s3, args.repeat)),
        ]
        shutil.rmtree(tmp, ignore_errors=True)
    server.stop()
    print(f"checkpoint {args.checkpoint} ({size / 2**20:.2f} MiB), median of {args.repeat}")
    print(f"{'':8} {'local disk':>11} {'S3 (moto)':>11} {'ratio':>7}")
    for name, t_local, t_s3 in rows:
        print(f"{name:8} {t_local * 1e3:9.1f}ms {t_s3 * 1e3:9.1f}ms {t_s3 / t_local:6.1f}x")


if __name__ == "__main__":
    main()
