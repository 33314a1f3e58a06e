"""The `glm5` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import json
import sys


def _info(args: argparse.Namespace) -> int:
    import glm5

    info = glm5.build_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if key == "ops":
            continue
        print(f"{key:<{width}}  {value}")
    if "ops" in info:
        print("ops:")
        for op, backends in info["ops"].items():
            print(f"  glm5::{op:<24} {', '.join(backends) or 'no kernel'}")
    return 0


    return dsa.main(args.rest)


def _pretrain(args: argparse.Namespace) -> int:
    from .train.pretrain import main_from_args

    return main_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm5", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="what glm5 was built with and which kernels are registered")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_info)

    p = sub.add_parser("pretrain", help="pretrain a GLM-5 model through its stages (default: the debug preset on the stdlib)")
    from .train.pretrain import add_arguments

    add_arguments(p)
    p.set_defaults(func=_pretrain)

    from . import cli_generate

    cli_generate.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
