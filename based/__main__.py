"""Command line: ``python -m based <command>``; ``python -m based --help`` lists them."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _cmd_info(args) -> int:
    import based

    info = based.build_info()
    info["cuda_available"] = based.cuda_available()
    print(json.dumps(info, indent=2))
    return 0


def _cmd_demo(args) -> int:
    from . import demo

    return demo.run(args)


def _cmd_generate(args) -> int:
    from . import demo

    return demo.run_generate(args)


def build_parser() -> argparse.ArgumentParser:
    from . import demo

    prog = "python -m based" if os.path.basename(sys.argv[0]) in ("__main__.py", "-c", "") else \
        os.path.basename(sys.argv[0])
    parser = argparse.ArgumentParser(prog=prog, description="based: BASED attention kernels.")
    sub = parser.add_subparsers(dest="command", metavar="command")
    d = sub.add_parser("demo", help="generate Shakespeare with the bundled BASED model through based's kernels",
                       description=demo.__doc__.replace("``", ""),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_arguments(d)
    d.set_defaults(func=_cmd_demo)
    g = sub.add_parser("generate", help="generate from a model directory (ours or a released BASED checkpoint)",
                       description=demo.GENERATE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_generate_arguments(g)
    g.set_defaults(func=_cmd_generate)
    info = sub.add_parser("info", help="print how this build of based was made (CUDA, OpenMP, version)")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except BrokenPipeError:  # e.g. `python -m based demo | head`: the reader left, stop quietly
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
