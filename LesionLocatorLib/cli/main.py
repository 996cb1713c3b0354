"""The ``lesionlocator`` command line: segment, track, serve, demo, evaluate, report, register.

Argument parsing lives only in this package; each subcommand module has ``add_arguments(parser)`` and
``run(args) -> exit code`` and is imported only when used (fast ``--help``, optional dependencies).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Dict, Optional, Sequence, Tuple

from .common import USER_ERRORS

COMMANDS: Dict[str, Tuple[str, str]] = {
    "segment": ("segment", "segment lesions in one image from point/box/mask prompts"),
    "track": ("track", "track lesions from a baseline into follow-up scans"),
    "serve": ("serve", "run the LesionLocator inference server"),
    "demo": ("demo", "phantom baseline + follow-up: segment, track, report (no download needed)"),
    "evaluate": ("evaluate", "score predictions against ground-truth instance maps"),
    "report": ("report", "longitudinal report (volumes, diameters, RECIST) from label maps"),
    "register": ("register", "warp a baseline mask onto a follow-up by classical registration"),
}


def _module(command: str):
    return importlib.import_module(f".{COMMANDS[command][0]}", __package__)


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (none for the top-level --help)."""
    from .. import __version__

    parser = argparse.ArgumentParser(prog="lesionlocator", description=(
        "LesionLocator: promptable 3D lesion segmentation and longitudinal tracking in CT."))
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    parser.add_argument("--version", action="version", version=f"lesionlocator {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if command == name:
            _module(name).add_arguments(p)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(_module(args.command).run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
