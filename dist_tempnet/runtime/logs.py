"""Rank-aware logging: rank 0 speaks at INFO, other ranks only warn; libraries stay quiet.

Every message of the package goes through the `dist_tempnet` logger (modules use
`logging.getLogger(__name__)`), formatted as `[dist-tempnet] ...` on stderr; on ranks other than 0
the prefix names the rank.
"""

from __future__ import annotations

import logging
import sys

ROOT = "dist_tempnet"


def configure_logging(rank: int = 0) -> None:
    root = logging.getLogger(ROOT)
    prefix = "[dist-tempnet]" if rank == 0 else f"[dist-tempnet rank {rank}]"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prefix} %(message)s"))
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    # Our own handler is the only one: no duplicates through the root logger (Ray's or pytest's).
    root.propagate = False
