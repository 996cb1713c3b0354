"""The ``lesionlocator`` command line: segment, track, evaluate, serve, demo."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

log = logging.getLogger("lesionlocator")

# Errors that are the user's input, not a bug: printed as one line, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, IOError, FileNotFoundError)


def _case_name(path: str) -> str:
    name = Path(path.rstrip("/")).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def resolve_checkpoint_arg(value: str | None) -> str:
    """-m given -> that path; none -> the bundled demo model (clearly named as such)."""
    if value:
        return value
    try:
        from ..model.bundled import default_checkpoint
    except ImportError as exc:  # pragma: no cover - only when the package is incomplete
        raise ValueError("no checkpoint given (-m) and no bundled default model is installed") from exc
    path = default_checkpoint()
    log.warning("no -m given: using the bundled DEMO model %s (small, trained on synthetic + few real CTs); "
                "for clinical-quality results download the published LesionLocatorModel.zip and pass -m", path)
    return str(path)


def _folds_arg(value: str | None):
    if value is None:
        return None
    if value == "all":
        return "all"
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--folds takes 'all' or comma-separated fold numbers, got {value!r}") from None


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", metavar="CHECKPOINT",
                   help="LesionLocatorModel.zip, its extracted folder, or one model folder "
                        "(default: the bundled demo model)")
    p.add_argument("--folds", type=_folds_arg, default=None,
                   help="folds to ensemble: 'all' or e.g. '0,1' (default: the first fold, for speed)")
    p.add_argument("--tta", action="store_true", help="mirroring test-time augmentation (8 passes per fold)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (CUDA only; slow first click)")
    p.add_argument("--server", metavar="URL", help="run on a LesionLocator server instead of in this process")
    p.add_argument("--token", help="bearer token for --server (or env LESIONLOCATOR_TOKEN)")


# -- segment -----------------------------------------------------------------------------------

def add_segment_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Segment lesions in one image from prompts. Prompts: a JSON file in the published format "
        '({"1": {"point": [z, y, x]}} or {"1": {"box": [z0, z1, y0, y1, x0, x1]}}, voxel indices of the '
        'image array, half-open boxes; world variants "point_lps"/"point_ras": [x, y, z] mm and '
        '"box_lps"/"box_ras": [[x, y, z], [x, y, z]]), or an instance label map image (mask prompts). '
        "Writes <case>_lesion_<id>.nii.gz per lesion, the merged map <case>_lesions.nii.gz and <case>_summary.json."
    )
    p.add_argument("-i", "--image", required=True, help="CT image (.nii/.nii.gz/.nrrd/.mha) or DICOM series folder")
    p.add_argument("-p", "--prompts", required=True, help="prompt JSON or instance label map image")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--prompt-type", choices=["point", "box", "mask"], default=None,
                   help="which prompts the file holds (default: from the file)")
    p.add_argument("--save-probabilities", action="store_true", help="also write float foreground probabilities")
    add_model_arguments(p)


def _load_prompts(path: str, image, prompt_type: str | None):
    from ..core.image_io import read_image
    from ..core.prompts import Point, PromptError, load_prompt_json, prompts_from_label_map

    if path.lower().endswith(".json"):
        prompts = load_prompt_json(path, image)
        kinds = {"point" if isinstance(p, Point) else "box" for p in prompts.values()}
        if prompt_type == "mask":
            raise PromptError("--prompt-type mask needs a label map image, not a JSON file")
        if prompt_type and kinds != {prompt_type}:
            raise PromptError(f"--prompt-type {prompt_type} but the file holds {sorted(kinds)} prompts")
        return prompts, sorted(kinds)
    labels = read_image(path)
    if not labels.same_grid(image):
        raise PromptError(f"label map {path} is not on the image grid (shape/spacing/origin/direction differ)")
    if prompt_type not in (None, "mask"):
        raise PromptError(f"--prompt-type {prompt_type} but {path} is a label map (mask prompts)")
    prompts = prompts_from_label_map(labels.array)
    if not prompts:
        raise PromptError(f"label map {path} holds no lesion (all zero)")
    return prompts, []


def write_result(result, outdir: Path, case: str, save_probabilities: bool = False) -> list[Path]:
    """Per-lesion masks, merged label map and a JSON summary, each written atomically."""
    from ..core.image_io import write_image
    from ..measure.report import atomic_write_text

    outdir.mkdir(parents=True, exist_ok=True)
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
            str(lid): {"status": les.status, "voxels": les.voxels,
                       "volume_ml": les.voxels * img.voxel_volume_ml(), "bbox_zyx": list(les.bbox)}
            for lid, les in sorted(result.lesions.items())
        },
    }
    atomic_write_text(outdir / f"{case}_summary.json", json.dumps(summary, indent=2))
    written.append(outdir / f"{case}_summary.json")
    return written


def make_progress(desc: str):
    from tqdm import tqdm

    bar = tqdm(total=100, desc=desc, unit="%", leave=False, file=sys.stderr, disable=None)

    def update(fraction: float, message: str) -> None:
        bar.set_postfix_str(message)
        bar.n = int(round(100 * fraction))
        bar.refresh()
        if fraction >= 1.0:
            bar.close()

    return update


def run_segment(args: argparse.Namespace) -> int:
    from ..core.image_io import read_image

    image = read_image(args.image)
    prompts, kinds = _load_prompts(args.prompts, image, args.prompt_type)
    case = _case_name(args.image)
    if args.server:
        from ..serve.client import LesionLocatorClient

        client = LesionLocatorClient(args.server, token=args.token or os.environ.get("LESIONLOCATOR_TOKEN"))
        client.set_image(image)
        result = client.segment_prompts(prompts)
    else:
        from ..segment.segmenter import LesionSegmenter

        seg = LesionSegmenter.from_checkpoint(resolve_checkpoint_arg(args.model), kinds,
                                              device=args.device, folds=args.folds, tta=args.tta,
                                              compile=args.compile)
        seg.set_image(image)
        result = seg.segment_prompts(prompts, return_probabilities=args.save_probabilities,
                                     progress=make_progress(f"segment {case}"))
    written = write_result(result, Path(args.output), case, args.save_probabilities)
    for lid, les in sorted(result.lesions.items()):
        vol = les.voxels * image.voxel_volume_ml()
        print(f"lesion {lid}: {les.status}, {les.voxels} voxels, {vol:.2f} ml")
    print(f"wrote {len(written)} files to {args.output}")
    return 0


# -- registry ----------------------------------------------------------------------------------

def _lazy(module: str, add: str = "add_arguments", run: str = "run"):
    """Subcommands implemented in other modules, imported only when used (fast --help, optional deps)."""

    def add_fn(p: argparse.ArgumentParser) -> None:
        getattr(importlib.import_module(f"LesionLocatorLib.{module}"), add)(p)

    def run_fn(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(f"LesionLocatorLib.{module}"), run)(args)

    return add_fn, run_fn


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "segment": ("segment lesions in one image from point/box/mask prompts", add_segment_arguments, run_segment),
}


def _register_optional() -> None:
    for name, module, help_text in (
        ("track", "cli.track", "track lesions from a baseline into follow-up scans"),
        ("evaluate", "measure.evaluate", "score predictions against ground-truth instance maps"),
        ("serve", "serve.server", "run the LesionLocator inference server"),
        ("demo", "cli.demo", "phantom baseline + follow-up: segment, track, report (no download needed)"),
        ("report", "measure.report", "longitudinal report (volumes, diameters, RECIST) from label maps"),
        ("register", "track.classical_registration", "warp a baseline mask onto a follow-up by classical registration"),
    ):
        if importlib.util.find_spec(f"LesionLocatorLib.{module}") is not None:
            COMMANDS[name] = (help_text, *_lazy(module))


def build_parser() -> argparse.ArgumentParser:
    _register_optional()
    parser = argparse.ArgumentParser(prog="lesionlocator", description=(
        "LesionLocator: promptable 3D lesion segmentation and longitudinal tracking in CT."))
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"lesionlocator {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_fn, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_fn(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    _, _, run = COMMANDS[args.command]
    try:
        return int(run(args) or 0)
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
