"""Run a function on several local gloo processes (torch.multiprocessing spawn), for tests.

    results = run_distributed(fn, world_size, *args, timeout=120.0)

`fn(rank, world_size, *args)` must be a module-level function (spawn pickles it by name). Each child
initializes a gloo process group on 127.0.0.1 with a free port and uses one CPU thread. Whatever `fn`
returns (tensors, dicts, numbers: anything torch.save can write) comes back as `results[rank]`.
A child's exception is re-raised in the parent with the child's traceback; if the processes are not
done after `timeout` seconds they are terminated and TimeoutError is raised, so a lost collective
never hangs the test run.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child(
    rank: int, fn: Callable, world_size: int, port: int, result_dir: str, args: tuple, timeout: float
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout),
    )
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(result_dir, f"rank{rank}.pt"))
        # A rank that leaves early closes its gloo connections while others may still be connecting
        # or in a last collective; on failure there is no barrier (the parent stops the others).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _stop(processes: list) -> None:
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    for proc in processes:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo processes; return each rank's result."""
    with tempfile.TemporaryDirectory(prefix="dist_test_") as result_dir:
        context = mp.start_processes(
            _child,
            args=(fn, world_size, _free_port(), result_dir, args, timeout),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            # join() re-raises a failed child's exception (with its traceback) and stops the others.
            while not context.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"{getattr(fn, '__name__', fn)} on {world_size} processes timed out after {timeout}s"
                    )
        finally:
            _stop(context.processes)
        return [
            torch.load(os.path.join(result_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)
        ]
