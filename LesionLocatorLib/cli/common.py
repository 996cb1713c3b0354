"""What several subcommands share: backend options, prompt files, result files, progress bars."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

log = logging.getLogger("lesionlocator")

# Errors that are the user's input, not a bug: printed as one line, exit code 2.
USER_ERRORS: Tuple[type, ...] = (ValueError, IOError, FileNotFoundError)
TOKEN_ENV = "LESIONLOCATOR_TOKEN"


class UsageError(ValueError):
    """Options that contradict each other."""


def parse_folds(value: str) -> Any:
    """--folds: 'all' or comma-separated fold numbers."""
    from ..model.checkpoint import parse_folds as parse

    try:
        return parse(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_backend_arguments(p: argparse.ArgumentParser, device_default: str = "auto") -> None:
    g = p.add_argument_group("model and backend")
    g.add_argument("-m", "--model", metavar="CHECKPOINT",
                   help="LesionLocatorModel.zip, its extracted folder, or one model folder (default: the bundled "
                        "demo model)")
    g.add_argument("--folds", type=parse_folds, default=None,
                   help="folds to ensemble: 'all' or e.g. '0,1' (default: the first fold, for speed)")
    g.add_argument("--tta", action="store_true", help="mirroring test-time augmentation (8 passes per fold)")
    g.add_argument("--no-grow", dest="grow", action="store_false",
                   help="predict each lesion in its published patch only; by default a lesion that touches an "
                        "open patch face is followed into neighbouring tiles")
    g.add_argument("--device", default=None, help=f"auto, cpu, cuda, cuda:N or mps (default: {device_default})")
    g.add_argument("--compile", action="store_true", help="torch.compile the network (CUDA only; slow first click)")
    g.add_argument("--server", metavar="URL", help="run on a LesionLocator server instead of in this process "
                                                   "(the server's model and device; --folds, --tta and --no-grow are sent)")
    g.add_argument("--token", help=f"bearer token for --server (default: the environment variable {TOKEN_ENV})")
    p.set_defaults(device_default=device_default)


def backend_from_args(args: argparse.Namespace):
    """The one place the CLI chooses a backend (local model or server)."""
    from ..backend import open_backend

    if args.server is not None:
        if not args.server.strip():
            raise UsageError("--server is empty: give the server URL, e.g. http://127.0.0.1:8765")
        refused = [opt for opt, given in (("-m/--model", args.model), ("--device", args.device),
                                          ("--compile", args.compile)) if given]
        if refused:
            raise UsageError(f"{', '.join(refused)} cannot be used with --server: the server's own model and "
                             "device run the request (start the server with them)")
        return open_backend(server=args.server, token=args.token or os.environ.get(TOKEN_ENV),
                            folds=args.folds, tta=args.tta, grow=args.grow)
    if args.token:
        raise UsageError("--token is only used with --server")
    if not args.model:
        log.warning("no -m given: using the bundled DEMO model (small); for the published quality download "
                    "LesionLocatorModel.zip and pass -m")
    return open_backend(model=args.model, device=args.device or args.device_default, folds=args.folds,
                        tta=args.tta, compile=args.compile, grow=args.grow)


def load_prompts(path: str, image, prompt_type: Optional[str]):
    """A prompt JSON (published format and extensions) or an instance label map on the image grid."""
    from ..core.image_io import read_image
    from ..core.prompts import Box, Point, PromptError, load_prompt_json, prompts_from_label_map

    if path.lower().endswith(".json"):
        if prompt_type == "mask":
            raise PromptError("--prompt-type mask needs a label map image, not a JSON file")
        prompts = load_prompt_json(path, image)
        kinds = {"point" if isinstance(p, Point) else "box" if isinstance(p, Box) else "mask"
                 for items in prompts.values() for p in items}
        if prompt_type and kinds != {prompt_type}:
            raise PromptError(f"--prompt-type {prompt_type} but the file holds {sorted(kinds)} prompts")
        return prompts
    labels = read_image(path)
    if not labels.same_grid(image):
        raise PromptError(f"label map {path} is not on the image grid (shape/spacing/origin/direction differ)")
    if prompt_type not in (None, "mask"):
        raise PromptError(f"--prompt-type {prompt_type} but {path} is a label map (mask prompts)")
    prompts = prompts_from_label_map(labels.array)
    if not prompts:
        raise PromptError(f"label map {path} holds no lesion (all zero)")
    return prompts


def write_result(result, outdir: Path, case: str, save_probabilities: bool = False) -> List[Path]:
    """Per-lesion masks, merged label map and a JSON summary, each written atomically."""
    from ..core.files import atomic_write_text
    from ..core.image_io import write_image

    written = []
    img = result.image
    for lid, les in sorted(result.lesions.items()):
        written.append(write_image(img.with_array(les.full(img.shape)), outdir / f"{case}_lesion_{lid}.nii.gz"))
        if save_probabilities and les.probability is not None:
            written.append(write_image(img.with_array(les.full_probability(img.shape)),
                                       outdir / f"{case}_lesion_{lid}_prob.nii.gz"))
    written.append(write_image(result.label_volume(), outdir / f"{case}_lesions.nii.gz"))
    summary = {
        "case": case,
        "lesions": {
            str(lid): {"status": str(les.status), "voxels": les.voxels,
                       "volume_ml": les.voxels * img.voxel_volume_ml(), "bbox_zyx": list(les.bbox)}
            for lid, les in sorted(result.lesions.items())
        },
    }
    written.append(atomic_write_text(outdir / f"{case}_summary.json", json.dumps(summary, indent=2)))
    return written


def make_progress(desc: str) -> Callable[[float, str], None]:
    from tqdm import tqdm

    bar = tqdm(total=100, desc=desc, unit="%", leave=False, file=sys.stderr, disable=None)

    def update(fraction: float, message: str) -> None:
        bar.set_postfix_str(message)
        bar.n = int(round(100 * fraction))
        bar.refresh()
        if fraction >= 1.0:
            bar.close()

    return update


def unique_names(paths: Sequence[str]) -> List[str]:
    from ..core.files import case_name

    names = [case_name(p) for p in paths]
    if len(set(names)) != len(names):
        names = [f"t{k}_{n}" for k, n in enumerate(names)]
    return names
