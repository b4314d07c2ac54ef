"""`dist-tempnet` command line: one module per verb in this package, each with `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import sys

from dist_tempnet.config import CheckpointError, ConfigError
from dist_tempnet.runtime.logs import configure_logging

# The verbs, in the order `--help` lists them; each module defines `register(subparsers)`.
COMMAND_MODULES = (
    "train",
    "make_shards",
    "index_shards",
    "eval",
    "export",
    "generate",
    "compare",
    "sweep",
    "plan",
    "submit",
    "mlflow_replay",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dist-tempnet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"dist_tempnet.commands.{name}").register(sub)
    # `submit` validates a dist-tempnet entrypoint with this same parser.
    parser.set_defaults(root_parser=parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args) or 0
    except ConfigError as exc:
        print(f"dist-tempnet: config error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, CheckpointError) as exc:
        print(f"dist-tempnet: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
