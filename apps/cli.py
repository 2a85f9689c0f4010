"""The `mlx-sd` command: one entry point, one subcommand per job.

User errors (a missing file, a bad size, an unknown sampler) print one line naming the problem and the fix,
and exit with status 2; tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import json
import sys

import mlx_sd  # first: loads OpenBLAS before mlx.core

from . import convert, generate, server, upscale
from .errors import UserError


def _version(args) -> None:
    print(json.dumps({"mlx_sd": mlx_sd.__version__, **mlx_sd.backend.describe()}, indent=2))


def _samplers(args) -> None:
    from mlx_sd.samplers import sampler_table
    from mlx_sd.schedules import SCHEDULE_TYPES

    rows = sampler_table()
    if args.json:
        schedules = [{"name": s.name, "label": s.label, "aliases": list(s.aliases)} for s in SCHEDULE_TYPES.values()]
        print(json.dumps({"samplers": rows, "schedule_types": schedules}, indent=2))
        return
    print(f"{'sampler':<18} {'stochastic':<10} {'calls':<5} {'Automatic':<11} {'SD3':<4} follows")
    for r in rows:
        sd3 = "yes" if r["rectified_flow"] else "no"
        print(f"{r['name']:<18} {'yes' if r['stochastic'] else 'no':<10} {r['model_calls_per_step']:<5} "
              f"{r['default_schedule'] or '-':<11} {sd3:<4} {r['follows']}")  # fmt: skip
    print("\nschedule types: Automatic, " + ", ".join(s.label for s in SCHEDULE_TYPES.values()))
    print('legacy names such as "DPM++ 2M Karras" combine a sampler with a schedule type; aliases: --json')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-sd", description="Stable Diffusion in MLX")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    version = sub.add_parser("version", help="show the mlx-sd version and the backend it runs on")
    version.set_defaults(run=_version)
    generate.add_parsers(sub)
    upscale.add_parser(sub)
    convert.add_parser(sub)
    server.add_parser(sub)
    samplers = sub.add_parser("samplers", help="list the samplers and schedule types")
    samplers.add_argument("--json", action="store_true", help="machine-readable, with aliases and options")
    samplers.set_defaults(run=_samplers)
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
