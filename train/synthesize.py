"""Synthetic longitudinal training pairs: baseline CT + instance labels -> (baseline, follow-up) pairs.

    python -m train.synthesize --images DIR --labels DIR -o OUT --pairs-per-case N --seed S [--preview p.png]
    python -m train.synthesize --phantoms 4 -o OUT --pairs-per-case 2 --seed 0 --preview p.png

Each follow-up is the baseline after the published synthetic-data recipe (supplement, section 7):
lesion-level growth / shrinkage with amplitudes drawn from {-22, -18, 15, 25}
(:mod:`LesionLocatorLib.synthetic.longitudinal`), then the image-level augmentation of :func:`augment_pair`
(batchgeneratorsv2). Instance ids match between baseline and follow-up. Output layout::

    OUT/manifest.json
    OUT/<case>/baseline.nii.gz, baseline_labels.nii.gz
    OUT/<case>/followup_<k>.nii.gz, followup_<k>_labels.nii.gz

Everything is seeded: the same inputs and ``--seed`` give the same arrays and the same manifest.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from LesionLocatorLib.core.geometry import Volume
from LesionLocatorLib.core.image_io import IMAGE_SUFFIXES, read_image, write_image
from LesionLocatorLib.synthetic.longitudinal import GROWTH_AMPLITUDES, make_followup, random_growth
from LesionLocatorLib.synthetic.phantom import make_phantom
from LesionLocatorLib.core.files import atomic_write_text

# Published CT foreground statistics (plans.json): the intensity augmentations are specified for
# z-scored images, so HU inputs are normalised with these before and mapped back after.
CT_MEAN = -63.00682013436269
CT_STD = 282.3602283405916

# Image-level augmentation, exactly as published (supplement, section 7).
ELASTIC_P, ELASTIC_SCALE, ELASTIC_MAGNITUDE = 1.0, 0.05, 0.05
ROTATION_P, ROTATION_DEG = 1.0, 5.0
SCALING_P, SCALING_RANGE = 0.5, (0.95, 1.05)
TRANSLATION_P, TRANSLATION_VOX = 1.0, 5.0
NOISE_P, NOISE_VARIANCE = 1.0, (0.0, 0.05)
BLUR_P, BLUR_SIGMA = 0.1, (0.1, 0.2)
BRIGHTNESS_P, BRIGHTNESS_RANGE = 0.15, (0.75, 1.25)
CONTRAST_P, CONTRAST_RANGE = 0.15, (0.75, 1.25)


class SynthesizeError(ValueError):
    """Bad input for the synthesizer (no matching image/label files, mismatched grids, bad options)."""


# ---------------------------------------------------------------------------------------------------------
# image-level augmentation (batchgeneratorsv2)
# ---------------------------------------------------------------------------------------------------------
def build_augmentation(shape: Sequence[int], padding_value: float = 0.0):
    """The published image-level augmentation for a volume of ``shape`` (z, y, x), output the same shape.

    - Elastic deformation, rotation, scaling and translation are one batchgeneratorsv2
      ``SpatialTransform`` (one interpolation). Translation: the transform's random crop centre, drawn
      uniformly within +-5 voxels of the volume centre (``patch_center_dist_from_border`` = half the
      shape - 5) with the patch as large as the volume, is exactly a translation of (-5, 5) voxels, so
      no custom code is needed for it.
    - Elastic "scale and magnitude 0.05": batchgeneratorsv2 reads the scale as a fraction of the patch
      edge (smoothing sigma = 0.05 * edge) but the magnitude in voxels; a 0.05-voxel displacement would
      be no deformation at all, so the magnitude is taken as the same fraction of the edge
      (max displacement 0.05 * edge voxels, e.g. 6.4 voxels on a 128 edge).
    - Rotation angles are drawn per axis (all three) in (-5, 5) degrees; scaling is one factor for all
      axes. Rotation/scaling act in voxel space, as in nnU-Net (meant for near-isotropic grids).
    - Labels are resampled per label (batchgeneratorsv2's bilinear one-hot argmax), which keeps ids.
    """
    from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
    from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
    from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from batchgeneratorsv2.transforms.utils.random import RandomTransform

    shape = tuple(int(s) for s in shape)
    rot = np.deg2rad(ROTATION_DEG)

    def magnitude(*_args, patch_size, dim, **_kw) -> float:
        return ELASTIC_MAGNITUDE * patch_size[dim]

    spatial = SpatialTransform(
        patch_size=shape,
        # centre drawn in [s/2 - 5, s/2 + 5]: a translation of (-5, 5) voxels on every axis
        patch_center_dist_from_border=[s / 2.0 - TRANSLATION_VOX for s in shape],
        random_crop=TRANSLATION_P > 0,
        p_elastic_deform=ELASTIC_P,
        elastic_deform_scale=(ELASTIC_SCALE, ELASTIC_SCALE),
        elastic_deform_magnitude=magnitude,
        p_synchronize_def_scale_across_axes=1.0,
        p_rotation=ROTATION_P,
        rotation=(-rot, rot),
        p_scaling=SCALING_P,
        scaling=SCALING_RANGE,
        p_synchronize_scaling_across_axes=1.0,
        mode_seg="bilinear",
        padding_mode_image="constant",
        padding_value_image=float(padding_value),
        border_mode_seg="zeros",
    )
    return ComposeTransforms([
        spatial,
        RandomTransform(GaussianNoiseTransform(noise_variance=NOISE_VARIANCE, p_per_channel=1.0,
                                               synchronize_channels=False), apply_probability=NOISE_P),
        RandomTransform(GaussianBlurTransform(blur_sigma=BLUR_SIGMA, synchronize_channels=False,
                                              synchronize_axes=False, p_per_channel=1.0),
                        apply_probability=BLUR_P),
        RandomTransform(MultiplicativeBrightnessTransform(multiplier_range=BRIGHTNESS_RANGE,
                                                          synchronize_channels=False, p_per_channel=1.0),
                        apply_probability=BRIGHTNESS_P),
        RandomTransform(ContrastTransform(contrast_range=BGContrast(CONTRAST_RANGE), preserve_range=True,
                                          synchronize_channels=False, p_per_channel=1.0),
                        apply_probability=CONTRAST_P),
    ])


def augment_pair(image: Volume | np.ndarray, labels: Volume | np.ndarray, seed: int,
                 normalization: tuple[float, float] | None = (CT_MEAN, CT_STD)
                 ) -> tuple[Volume | np.ndarray, Volume | np.ndarray]:
    """Apply the published image-level augmentation to an image and its instance labels.

    ``image`` (z, y, x) in HU when ``normalization=(mean, std)`` (intensity augmentations then act on
    the z-scored image, as specified, and the result is mapped back to HU); with ``normalization=None``
    the image is taken as already normalised (training). Volumes come back as Volumes on the same grid,
    integer images are rounded back to their dtype, labels keep their dtype and ids (a lesion moved out
    of view disappears). Deterministic for ``seed``; the global numpy / torch RNG states are restored.
    """
    import torch

    img = image.array if isinstance(image, Volume) else np.asarray(image)
    lab = labels.array if isinstance(labels, Volume) else np.asarray(labels)
    if img.ndim != 3 or lab.shape != img.shape:
        raise SynthesizeError(f"augment_pair needs a 3D image and labels of the same shape, got {img.shape} "
                              f"and {lab.shape}")
    if not np.issubdtype(lab.dtype, np.integer):
        raise SynthesizeError(f"labels must be an integer instance map, got dtype {lab.dtype}")
    if int(lab.max(initial=0)) > np.iinfo(np.int32).max:
        raise SynthesizeError("label ids above 2**31 - 1 are not supported")
    work = img.astype(np.float32)
    if normalization is not None:
        mean, std = (float(v) for v in normalization)
        if not std > 0:
            raise SynthesizeError(f"normalization std must be positive, got {std}")
        work = (work - mean) / std
    pipeline = build_augmentation(work.shape, padding_value=float(work.min()))

    np_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            np.random.seed(int(seed) % (2 ** 32))
            out = pipeline(image=torch.from_numpy(work[None].copy()),
                           segmentation=torch.from_numpy(lab.astype(np.int32)[None]))
    finally:
        np.random.set_state(np_state)
    out_img = out["image"][0].numpy()
    out_lab = out["segmentation"][0].numpy().astype(lab.dtype)
    if normalization is not None:
        out_img = out_img * std + mean
    if np.issubdtype(img.dtype, np.integer):
        info = np.iinfo(img.dtype)
        out_img = np.clip(np.rint(out_img), info.min, info.max).astype(img.dtype)
    else:
        out_img = out_img.astype(np.float32)
    if isinstance(image, Volume):
        return image.with_array(out_img), image.with_array(out_lab)
    return out_img, out_lab


# ---------------------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------------------
def _strip_suffix(name: str) -> str | None:
    low = name.lower()
    for suf in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if low.endswith(suf):
            return name[: -len(suf)]
    return None


def _case_id(stem: str) -> str:
    # nnU-Net raw layout: images "<case>_0000.nii.gz", labels "<case>.nii.gz"
    return stem[:-5] if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit() else stem


def match_cases(images_dir: Path, labels_dir: Path) -> list[tuple[str, Path, Path]]:
    """(case id, image path, label path) for every image with a label file of the same name.

    Names match exactly, or after dropping an nnU-Net channel suffix (``_0000``) from the image name,
    whatever the file extension. Images without a label are reported on stderr and skipped.
    """
    if not images_dir.is_dir():
        raise SynthesizeError(f"images folder not found: {images_dir}")
    if not labels_dir.is_dir():
        raise SynthesizeError(f"labels folder not found: {labels_dir}")
    labels: dict[str, Path] = {}
    for p in sorted(labels_dir.iterdir()):
        stem = _strip_suffix(p.name)
        if stem is not None and p.is_file():
            labels.setdefault(stem, p)
    cases, unmatched = [], []
    for p in sorted(images_dir.iterdir()):
        stem = _strip_suffix(p.name)
        if stem is None or not p.is_file():
            continue
        label = labels.get(stem) or labels.get(_case_id(stem))
        if label is None:
            unmatched.append(p.name)
            continue
        cases.append((_case_id(stem), p, label))
    if unmatched:
        print(f"synthesize: no label file for {len(unmatched)} image(s), skipped: {', '.join(unmatched[:10])}",
              file=sys.stderr)
    if not cases:
        raise SynthesizeError(f"no image in {images_dir} has a label file of the same name in {labels_dir}")
    ids = [c[0] for c in cases]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise SynthesizeError(f"several images map to the same case id: {dupes}")
    return cases


def _load_case(image_path: Path, label_path: Path) -> tuple[Volume, Volume]:
    image, labels = read_image(image_path), read_image(label_path)
    if image.shape != labels.shape or not np.allclose(image.spacing, labels.spacing, atol=1e-3):
        raise SynthesizeError(f"{label_path.name} (shape {labels.shape}, spacing {labels.spacing}) does not match "
                              f"{image_path.name} (shape {image.shape}, spacing {image.spacing})")
    arr = labels.array
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.array_equal(arr, np.round(arr)) or arr.min() < 0:
            raise SynthesizeError(f"{label_path.name} is not an integer instance label map")
        arr = arr.astype(np.uint16)
    # labels are placed on the image grid (tiny origin/direction differences from export tools)
    return image, image.with_array(arr)


def _child_seed(*key: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0])


# ---------------------------------------------------------------------------------------------------------
# pairs
# ---------------------------------------------------------------------------------------------------------
def _lesion_voxels(arr: np.ndarray) -> dict[int, int]:
    counts = np.bincount(arr.ravel().astype(np.int64))
    return {int(i): int(c) for i, c in enumerate(counts) if i > 0 and c > 0}


def synthesize_pair(baseline: Volume, labels: Volume, seed: int, vanish_prob: float = 0.0,
                    shift_mm: float = 0.0, deformation_mm: float = 0.0, augment: bool = True
                    ) -> tuple[Volume, Volume, dict]:
    """One follow-up of ``baseline``: lesion growth/shrinkage (+ optional vanishing), then augmentation."""
    rng = np.random.default_rng(_child_seed(seed, 1))
    ids = sorted(_lesion_voxels(labels.array))
    growth = random_growth(ids, rng)
    vanish = [i for i in ids if rng.random() < vanish_prob]
    for i in vanish:
        growth.pop(i)
    shift = rng.uniform(-shift_mm, shift_mm, size=3) if shift_mm > 0 else np.zeros(3)
    follow, follow_lab, meta = make_followup(
        baseline, labels, seed=_child_seed(seed, 2), growth=growth, vanish=vanish, shift_mm=shift,
        smooth_deformation_mm=deformation_mm, noise_hu=0.0)  # noise comes from the augmentation
    if augment:
        follow, follow_lab = augment_pair(follow, follow_lab, _child_seed(seed, 3))
    v0, v1 = _lesion_voxels(labels.array), _lesion_voxels(follow_lab.array)
    lesions = {}
    for lid in ids:
        m = meta["lesions"][str(lid)]
        status = m["status"] if m["status"] != "present" or lid in v1 else "out_of_view"
        lesions[str(lid)] = {
            "growth_amplitude": growth.get(lid, 0.0), "status": status,
            "baseline_voxels": v0[lid], "followup_voxels": v1.get(lid, 0),
            "volume_ratio": v1.get(lid, 0) / v0[lid], "growth_volume_ratio": m["growth_volume_ratio"],
        }
    info = {"lesions": lesions, "shift_mm_lps": meta["shift_mm_lps"],
            "smooth_deformation_mm": deformation_mm, "augmented": augment}
    return follow, follow_lab, info


def synthesize(cases: Sequence[tuple[str, Volume, Volume] | tuple[str, Path, Path]], out_dir: Path,
               pairs_per_case: int, seed: int, vanish_prob: float = 0.0, shift_mm: float = 0.0,
               deformation_mm: float = 0.0, augment: bool = True, sources: dict[str, str] | None = None,
               log=print) -> dict:
    """Write baseline/follow-up pairs for ``cases`` (id, image, labels as Volumes or paths) + manifest."""
    if pairs_per_case < 1:
        raise SynthesizeError(f"--pairs-per-case must be >= 1, got {pairs_per_case}")
    if not 0.0 <= vanish_prob <= 1.0:
        raise SynthesizeError(f"--vanish-prob must be in [0, 1], got {vanish_prob}")
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = []
    for ci, (case_id, image, labels) in enumerate(cases):
        if not isinstance(image, Volume):
            image, labels = _load_case(Path(image), Path(labels))
        case_dir = out_dir / case_id
        write_image(image, case_dir / "baseline.nii.gz")
        write_image(labels, case_dir / "baseline_labels.nii.gz")
        for k in range(pairs_per_case):
            pair_seed = _child_seed(seed, ci, k)
            follow, follow_lab, info = synthesize_pair(image, labels, pair_seed, vanish_prob, shift_mm,
                                                       deformation_mm, augment)
            write_image(follow, case_dir / f"followup_{k}.nii.gz")
            write_image(follow_lab, case_dir / f"followup_{k}_labels.nii.gz")
            pairs.append({
                "id": f"{case_id}_p{k}", "case": case_id, "seed": pair_seed,
                "source": (sources or {}).get(case_id, case_id),
                "baseline": f"{case_id}/baseline.nii.gz", "baseline_labels": f"{case_id}/baseline_labels.nii.gz",
                "followup": f"{case_id}/followup_{k}.nii.gz", "followup_labels": f"{case_id}/followup_{k}_labels.nii.gz",
                **info,
            })
            log(f"{case_id} pair {k}: " + ", ".join(
                f"{lid}: A={v['growth_amplitude']:+g} x{v['volume_ratio']:.2f} {v['status']}"
                for lid, v in info["lesions"].items()))
    manifest = {
        "format": "lesionlocator-synthetic-pairs/1",
        "seed": int(seed), "pairs_per_case": int(pairs_per_case),
        "lesion_level": {"amplitudes": list(GROWTH_AMPLITUDES), "vanish_prob": vanish_prob,
                         "shift_mm": shift_mm, "deformation_mm": deformation_mm},
        "image_level": _augmentation_summary() if augment else None,
        "pairs": pairs,
    }
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def _augmentation_summary() -> dict:
    return {
        "elastic": {"p": ELASTIC_P, "scale": ELASTIC_SCALE, "magnitude_fraction_of_edge": ELASTIC_MAGNITUDE},
        "rotation": {"p": ROTATION_P, "degrees": [-ROTATION_DEG, ROTATION_DEG]},
        "scaling": {"p": SCALING_P, "range": list(SCALING_RANGE), "synchronized_axes": True},
        "translation": {"p": TRANSLATION_P, "voxels": [-TRANSLATION_VOX, TRANSLATION_VOX]},
        "gaussian_noise": {"p": NOISE_P, "variance": list(NOISE_VARIANCE), "per_channel": True},
        "gaussian_blur": {"p": BLUR_P, "sigma": list(BLUR_SIGMA), "synchronized_axes": False},
        "brightness": {"p": BRIGHTNESS_P, "range": list(BRIGHTNESS_RANGE)},
        "contrast": {"p": CONTRAST_P, "range": list(CONTRAST_RANGE), "preserve_range": True},
        "intensity_domain": {"mean": CT_MEAN, "std": CT_STD},
    }


# ---------------------------------------------------------------------------------------------------------
# preview
# ---------------------------------------------------------------------------------------------------------
def write_preview(out_dir: Path, manifest: dict, path: Path, max_pairs: int = 4) -> Path:
    """PNG: for a few pairs, axial slices through a lesion, baseline | follow-up, with label contours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for pair in manifest["pairs"]:
        both = [int(k) for k, v in pair["lesions"].items() if v["followup_voxels"] > 0]
        if both:
            rows.append((pair, max(both, key=lambda i: pair["lesions"][str(i)]["baseline_voxels"])))
        if len(rows) == max_pairs:
            break
    if not rows:
        raise SynthesizeError("no pair has a lesion present at both time points: nothing to preview")
    fig, axes = plt.subplots(len(rows), 2, figsize=(8, 4 * len(rows)), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for r, (pair, lid) in enumerate(rows):
        for c, key in enumerate(("baseline", "followup")):
            img = read_image(out_dir / pair[key])
            lab = read_image(out_dir / pair[f"{key}_labels"]).array
            z = int(round(float(np.argwhere(lab == lid)[:, 0].mean())))
            ax = axes[r, c]
            ax.imshow(img.array[z], cmap="gray", vmin=-500, vmax=300, aspect=img.spacing[1] / img.spacing[2],
                      interpolation="nearest")
            for k in sorted(set(np.unique(lab[z]).tolist()) - {0}):
                ax.contour(lab[z] == k, levels=[0.5], colors=[cmap((k - 1) % 10)], linewidths=1.0)
            les = pair["lesions"][str(lid)]
            title = f"{pair['id']} baseline z={z}" if c == 0 else (
                f"follow-up z={z}  A={les['growth_amplitude']:+g}  growth x{les['growth_volume_ratio']:.2f}"
                f"  (augmented x{les['volume_ratio']:.2f})")
            ax.set_title(f"{title}\nlesion {lid}", fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("input (a folder pair or phantoms)")
    src.add_argument("--images", type=Path, help="folder of CT images (NIfTI/NRRD/MHA)")
    src.add_argument("--labels", type=Path, help="folder of instance label maps, matched to images by file name")
    src.add_argument("--phantoms", type=int, default=0, help="generate this many phantom cases instead")
    src.add_argument("--phantom-shape", type=int, nargs=3, default=(64, 128, 128), metavar=("Z", "Y", "X"))
    src.add_argument("--phantom-spacing", type=float, nargs=3, default=(2.0, 1.5, 1.5), metavar=("Z", "Y", "X"))
    src.add_argument("--phantom-lesions", type=int, default=3, help="lesions per phantom")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    parser.add_argument("--pairs-per-case", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vanish-prob", type=float, default=0.0, help="probability that a lesion vanishes")
    parser.add_argument("--shift-mm", type=float, default=0.0,
                        help="extra rigid shift, uniform in +-this per LPS axis (the augmentation already translates)")
    parser.add_argument("--deformation-mm", type=float, default=0.0, help="extra smooth deformation (max mm)")
    parser.add_argument("--no-augment", action="store_true", help="lesion-level changes only")
    parser.add_argument("--preview", type=Path, help="write a PNG preview of a few pairs")


def run(args: argparse.Namespace) -> int:
    try:
        if args.phantoms and (args.images or args.labels):
            raise SynthesizeError("give either --phantoms or --images/--labels, not both")
        sources: dict[str, str] = {}
        if args.phantoms:
            if args.phantoms < 0:
                raise SynthesizeError(f"--phantoms must be positive, got {args.phantoms}")
            cases: list = []
            for i in range(args.phantoms):
                ps = _child_seed(args.seed, i, 999)
                ct, lab = make_phantom(tuple(args.phantom_shape), tuple(args.phantom_spacing),
                                       n_lesions=args.phantom_lesions, seed=ps)
                cases.append((f"phantom_{i:03d}", ct, lab))
                sources[f"phantom_{i:03d}"] = f"make_phantom(seed={ps})"
        else:
            if not args.images or not args.labels:
                raise SynthesizeError("give --images and --labels folders, or --phantoms N")
            matched = match_cases(args.images, args.labels)
            cases = [(cid, ip, lp) for cid, ip, lp in matched]
            sources = {cid: ip.name for cid, ip, _ in matched}
        manifest = synthesize(cases, args.output, args.pairs_per_case, args.seed, args.vanish_prob,
                              args.shift_mm, args.deformation_mm, not args.no_augment, sources)
        if args.preview:
            write_preview(args.output, manifest, args.preview)
            print(f"preview: {args.preview}")
        print(f"{len(manifest['pairs'])} pairs written to {args.output}")
        return 0
    except (ValueError, OSError) as exc:
        print(f"synthesize: error: {exc}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.synthesize", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
