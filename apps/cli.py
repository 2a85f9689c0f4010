"""The `mlx-sd` command: one entry point, one subcommand per job.

User errors (a missing file, a bad size, an unknown sampler) print one line naming the problem and the fix,
and exit with status 2; tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import json
import sys

import mlx_sd  # first: loads OpenBLAS before mlx.core

from . import generate, server
from .errors import UserError


def _version(args) -> None:
    print(json.dumps({"mlx_sd": mlx_sd.__version__, **mlx_sd.backend.describe()}, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-sd", description="Stable Diffusion in MLX")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    version = sub.add_parser("version", help="show the mlx-sd version and the backend it runs on")
    version.set_defaults(run=_version)
    generate.add_parsers(sub)
    server.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except UserError as e:
        print(f"mlx-sd {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
