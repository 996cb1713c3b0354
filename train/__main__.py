"""``python -m train {segment,track,pretrain,synthesize,default-model}`` (also under ``torchrun -m train ...``)."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

COMMANDS = {
    "segment": (".trainer_segment", "promptable segmentation fine-tuning (LesionLocatorTrainerSegment)"),
    "track": (".trainer_track", "joint registration + segmentation training (LesionLocatorTrainerTrack)"),
    "pretrain": (".pretrain", "multi-dataset supervised pretraining (1/sqrt dataset sampling)"),
    "synthesize": (".synthesize", "synthetic longitudinal pairs (baseline -> follow-up)"),
    "default-model": (".make_default_model", "train the small bundled default model"),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description="LesionLocator training")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_) in COMMANDS.items():
        # modules are imported only for the chosen command (torch/icon imports are slow)
        if argv is None and len(sys.argv) > 1 and sys.argv[1] != name:
            sub.add_parser(name, help=help_)
            continue
        if argv is not None and (not argv or argv[0] != name):
            sub.add_parser(name, help=help_)
            continue
        p = sub.add_parser(name, help=help_)
        importlib.import_module(module, __package__).add_arguments(p)
    args = parser.parse_args(argv)
    return int(importlib.import_module(COMMANDS[args.command][0], __package__).run(args))


if __name__ == "__main__":
    sys.exit(main())
