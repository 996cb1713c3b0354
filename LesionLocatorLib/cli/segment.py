"""``lesionlocator segment``: one image + prompts -> one mask per lesion, locally or on a server."""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_backend_arguments, backend_from_args, load_prompts, make_progress, write_result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Segment lesions in one image from prompts. Prompts: a JSON file in the published format "
        '({"1": {"point": [z, y, x]}} or {"1": {"box": [z0, z1, y0, y1, x0, x1]}}, voxel indices of the '
        'image array, half-open boxes; world variants "point_lps"/"point_ras": [x, y, z] mm and '
        '"box_lps"/"box_ras": [[x, y, z], [x, y, z]]; several prompts of one lesion as a list: a box replaces '
        "its points, points are united), or an instance label map image (mask prompts). Writes "
        "<case>_lesion_<id>.nii.gz per lesion, the merged map <case>_lesions.nii.gz and <case>_summary.json."
    )
    p.add_argument("-i", "--image", required=True, help="CT image (.nii/.nii.gz/.nrrd/.mha) or DICOM series folder")
    p.add_argument("-p", "--prompts", required=True, help="prompt JSON or instance label map image")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--prompt-type", choices=["point", "box", "mask"], default=None,
                   help="check that the file holds only these prompts (default: any)")
    p.add_argument("--save-probabilities", action="store_true", help="also write float foreground probabilities")
    add_backend_arguments(p)


def run(args: argparse.Namespace) -> int:
    from ..core.files import case_name
    from ..core.image_io import read_image

    image = read_image(args.image)
    prompts = load_prompts(args.prompts, image, args.prompt_type)
    case = case_name(args.image)
    with backend_from_args(args) as backend:
        session = backend.session()
        session.set_image(image)
        result = session.segment(prompts, return_probabilities=args.save_probabilities,
                                 progress=make_progress(f"segment {case}"))
    written = write_result(result, Path(args.output), case, args.save_probabilities)
    for lid, les in sorted(result.lesions.items()):
        print(f"lesion {lid}: {les.status}, {les.voxels} voxels, {les.voxels * image.voxel_volume_ml():.2f} ml")
    print(f"wrote {len(written)} files to {args.output}")
    return 0
