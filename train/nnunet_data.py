"""nnU-Net v2 as the data side of pretraining: raw datasets, planning/preprocessing, dataset class, patch loader.

What comes from ``nnunetv2`` (used as a library, not re-implemented):

* the raw dataset format (``nnUNet_raw/DatasetXXX_Name/{imagesTr,labelsTr,dataset.json}``) and its integrity check;
* fingerprint extraction, experiment planning and preprocessing (``plan_and_preprocess_api`` +
  the configuration's preprocessor class: crop to non-zero, resampling to the planned spacing, normalisation,
  foreground-location sampling) - the same steps as ``nnUNetv2_plan_and_preprocess``;
* the preprocessed dataset class (``infer_dataset_class`` -> ``nnUNetDatasetBlosc2`` / ``nnUNetDatasetNumpy``),
  ``PlansManager`` / ``LabelManager`` (plans, labels, regions, ignore label);
* ``nnUNetDataLoader``: random patches with foreground oversampling (a patch centred on a voxel of a random
  foreground class, with the given probability) and nnU-Net's border padding.

What is ours: :class:`NnunetPretrainDataset` wraps one preprocessed dataset as a pretraining source (one patch per
call, drawn reproducibly from our per-rank random stream, seg padding -1 -> background as nnU-Net's
``RemoveLabelTansform`` does, ignore label -> -1 for the loss), :func:`plan_and_preprocess` runs nnU-Net's API
with explicit folders (and, for one process, inside this process), and :func:`write_phantom_raw_dataset` writes
phantom data in the raw format (tests, demos).

nnU-Net v2 is optional (``pip install --no-deps nnunetv2==2.8.1``, see ``.ci/install``); importing this module
does not import it.
"""
from __future__ import annotations

import contextlib
import json
import os
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

CONFIGURATION = "3d_fullres"
DEFAULT_PLANS = "nnUNetPlans"
PATH_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


class NnunetDataError(ValueError):
    """nnU-Net v2 is missing, or a raw/preprocessed dataset is unusable."""


def require_nnunetv2():
    """The ``nnunetv2`` package, or a clear error saying how to install it without a CUDA torch."""
    try:
        import nnunetv2  # noqa: F401
    except ImportError as exc:
        raise NnunetDataError("nnU-Net v2 datasets need the nnunetv2 package: pip install --no-deps "
                              "nnunetv2==2.8.1 acvl-utils==0.2.6 batchgenerators==0.25.5 and the 'train' extra "
                              f"(see .ci/install) ({exc})") from exc
    return nnunetv2


@contextlib.contextmanager
def nnunet_paths(raw: str | os.PathLike | None = None, preprocessed: str | os.PathLike | None = None,
                 results: str | os.PathLike | None = None) -> Iterator[None]:
    """Point nnU-Net at these folders for the duration (nnunetv2 >= 2.6 reads ``nnUNet_raw`` etc. from the
    environment when it uses them); the previous environment is restored afterwards."""
    new = dict(zip(PATH_VARIABLES, (raw, preprocessed, results)))
    old = {k: os.environ.get(k) for k in PATH_VARIABLES}
    try:
        for k, v in new.items():
            if v is not None:
                os.environ[k] = str(v)
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_POOL_MODULES = ("nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor",
                 "nnunetv2.experiment_planning.verify_dataset_integrity",
                 "nnunetv2.preprocessing.preprocessors.default_preprocessor")


@contextlib.contextmanager
def _in_process_pools() -> Iterator[None]:
    """nnU-Net starts a ``spawn`` process pool even for one worker (a fresh interpreter that re-imports torch and
    needs an ``if __name__ == '__main__'`` guard in the caller's script). For one process its workers run in a
    thread of this process instead (``multiprocessing.dummy``, same Pool API); nnU-Net's code is unchanged."""
    import importlib
    import multiprocessing.dummy

    shim = types.SimpleNamespace(get_context=lambda *_a, **_k: types.SimpleNamespace(Pool=multiprocessing.dummy.Pool))
    saved = []
    try:
        for name in _POOL_MODULES:
            mod = importlib.import_module(name)
            saved.append((mod, mod.multiprocessing))
            mod.multiprocessing = shim
        yield
    finally:
        for mod, orig in saved:
            mod.multiprocessing = orig


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """nnU-Net's folder name ``DatasetXXX_Name``."""
    if not 0 < int(dataset_id) < 1000:
        raise NnunetDataError(f"nnU-Net dataset ids are 1..999, got {dataset_id}")
    return f"Dataset{int(dataset_id):03d}_{name}"


def write_raw_dataset(raw_root: str | os.PathLike, dataset_id: int, name: str,
                      cases: Iterable[tuple[str, "object", "object"]], labels: Mapping[str, int | Sequence[int]],
                      channel_names: Mapping[str, str] | None = None, file_ending: str = ".nii.gz") -> Path:
    """Write ``(case_id, image Volume, label Volume)`` items as an nnU-Net v2 raw dataset (one channel) and
    return its folder ``raw_root/DatasetXXX_Name``."""
    from LesionLocatorLib.core.image_io import write_image

    folder = Path(raw_root) / dataset_folder_name(dataset_id, name)
    n = 0
    for case_id, image, label in cases:
        write_image(image, folder / "imagesTr" / f"{case_id}_0000{file_ending}")
        write_image(label, folder / "labelsTr" / f"{case_id}{file_ending}")
        n += 1
    if n == 0:
        raise NnunetDataError("a raw dataset needs at least one case")
    ds = {"channel_names": dict(channel_names or {"0": "CT"}), "labels": dict(labels), "numTraining": n,
          "file_ending": file_ending}
    (folder / "dataset.json").write_text(json.dumps(ds, indent=2), encoding="utf-8")
    return folder


def write_phantom_raw_dataset(raw_root: str | os.PathLike, dataset_id: int, name: str = "Phantom", n_cases: int = 3,
                              shape: Sequence[int] = (32, 48, 48), spacing: Sequence[float] = (2.5, 2.0, 2.0),
                              seed: int = 0, kind: str = "lesion", n_lesions: int = 2) -> Path:
    """Phantoms (``LesionLocatorLib.synthetic.phantom``) as an nnU-Net raw dataset. ``kind='lesion'``: labels
    {background, lesion} (all lesion instances); ``kind='organs'``: {background, lung, liver, lesion}."""
    from LesionLocatorLib.synthetic.phantom import TISSUES, make_phantom, phantom_tissue_map

    if kind not in ("lesion", "organs"):
        raise NnunetDataError(f"kind must be 'lesion' or 'organs', got {kind!r}")

    def cases():
        for i in range(int(n_cases)):
            s = int(np.random.SeedSequence([seed, i, 901]).generate_state(1)[0])
            ct, lab = make_phantom(shape, spacing, n_lesions=n_lesions, seed=s)
            les = np.asarray(lab.array) > 0
            if kind == "lesion":
                seg = les.astype(np.uint8)
            else:
                tissue = phantom_tissue_map(shape, spacing, seed=s)
                seg = np.zeros(tissue.shape, np.uint8)
                seg[np.isin(tissue, (TISSUES["lung"], TISSUES["lung_vessel"]))] = 1
                seg[tissue == TISSUES["liver"]] = 2
                seg[les] = 3
            yield f"{name.lower()}_{i:03d}", ct, lab.with_array(seg)

    labels = ({"background": 0, "lesion": 1} if kind == "lesion"
              else {"background": 0, "lung": 1, "liver": 2, "lesion": 3})
    return write_raw_dataset(raw_root, dataset_id, name, cases(), labels)


def plan_and_preprocess(dataset_id: int, raw_root: str | os.PathLike, preprocessed_root: str | os.PathLike,
                        planner: str = "ExperimentPlanner", plans_name: str | None = None,
                        target_spacing: Sequence[float] | None = None, configuration: str = CONFIGURATION,
                        num_processes: int = 1, verify: bool = False, intensity_samples: int | None = None
                        ) -> tuple[Path, str]:
    """nnU-Net's fingerprint extraction, experiment planning and preprocessing of one raw dataset (what
    ``nnUNetv2_plan_and_preprocess -d ID -c 3d_fullres -pl PLANNER [-overwrite_target_spacing ...]`` does), with
    explicit folders. ``num_processes=1`` runs nnU-Net's workers inside this process. ``intensity_samples``:
    foreground voxels drawn for the CT intensity statistics (nnU-Net: 1e8 per dataset; fewer makes tiny test
    datasets fast). Returns ``(preprocessed dataset folder, plans identifier)``."""
    require_nnunetv2()
    with nnunet_paths(raw_root, preprocessed_root):
        from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
        from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset, plan_experiments
        from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        extractor = DatasetFingerprintExtractor
        if intensity_samples:
            class extractor(DatasetFingerprintExtractor):  # noqa: N801 - nnU-Net's extractor, fewer samples
                def __init__(self, *a, **k):
                    super().__init__(*a, **k)
                    self.num_foreground_voxels_for_intensitystats = float(intensity_samples)

        pools = _in_process_pools() if int(num_processes) == 1 else contextlib.nullcontext()
        with pools:
            name = convert_id_to_dataset_name(int(dataset_id))
            extract_fingerprint_dataset(int(dataset_id), extractor, num_processes=int(num_processes),
                                        check_dataset_integrity=verify, clean=True, verbose=False,
                                        show_progress_bar=False)
            plans_id = plan_experiments([int(dataset_id)], planner, overwrite_target_spacing=target_spacing,
                                        overwrite_plans_name=plans_name)
            folder = Path(preprocessed_root) / name
            pm = PlansManager(str(folder / f"{plans_id}.json"))
            cm = pm.get_configuration(configuration)
            pre = cm.preprocessor_class(verbose=False)
            pre.show_progress_bar = False
            pre.run(int(dataset_id), configuration, plans_id, num_processes=int(num_processes))
    return folder, plans_id


def resolve_preprocessed(spec: str | os.PathLike) -> Path:
    """A preprocessed dataset folder from a path, or from a dataset id / name under ``$nnUNet_preprocessed``."""
    p = Path(spec)
    if p.is_dir():
        return p
    root = os.environ.get("nnUNet_preprocessed")
    if not root:
        raise NnunetDataError(f"{spec} is not a folder and nnUNet_preprocessed is not set")
    s = str(spec)
    cands = sorted(Path(root).glob(f"Dataset{int(s):03d}_*")) if s.isdigit() else [Path(root) / s]
    cands = [c for c in cands if c.is_dir()]
    if len(cands) != 1:
        raise NnunetDataError(f"no unique nnU-Net preprocessed dataset {spec!r} under {root}")
    return cands[0]


@dataclass(frozen=True)
class HeadClass:
    name: str
    labels: tuple[int, ...]  # label values this output channel covers (one label, or an nnU-Net region)


def _label_classes(label_dict: Mapping, label_manager) -> list[HeadClass]:
    """The dataset's foreground classes in nnU-Net's order (labels sorted, or regions as listed)."""
    if label_manager.has_regions:
        names = [k for k, r in label_dict.items() if k != "ignore"
                 and not (np.isscalar(r) and int(r) == 0)
                 and not (isinstance(r, (list, tuple)) and set(int(v) for v in r) == {0})]
        regions = label_manager.foreground_regions
        if len(names) != len(regions):
            raise NnunetDataError(f"cannot match region names {names} to regions {regions}")
        return [HeadClass(n, tuple(int(v) for v in (r if isinstance(r, (list, tuple)) else (r,))))
                for n, r in zip(names, regions)]
    by_value = {int(v): k for k, v in label_dict.items() if k != "ignore" and not isinstance(v, (list, tuple))}
    return [HeadClass(by_value.get(int(v), f"label_{int(v)}"), (int(v),)) for v in label_manager.foreground_labels]


class NnunetPretrainDataset:
    """One nnU-Net v2 preprocessed dataset (``nnUNet_preprocessed/DatasetXXX_Name``) as a pretraining source.

    Patches come from nnU-Net's own ``nnUNetDataLoader`` (batch size 1, foreground oversampling with probability
    ``foreground_prob`` per patch) over its dataset class; :meth:`sample` returns ``(image [C, z, y, x] float32,
    labels [z, y, x] int16)`` with the dataset's own label values, -1 where nnU-Net's ignore label is.
    """

    kind = "nnunet"

    def __init__(self, folder: str | os.PathLike, plans: str = DEFAULT_PLANS, configuration: str = CONFIGURATION,
                 name: str | None = None):
        require_nnunetv2()
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        self.folder = resolve_preprocessed(folder)
        plans_file = self.folder / f"{plans}.json"
        ds_file = self.folder / "dataset.json"
        for f in (plans_file, ds_file):
            if not f.is_file():
                raise NnunetDataError(f"not an nnU-Net v2 preprocessed dataset: {f} is missing "
                                      "(run nnUNetv2_plan_and_preprocess first)")
        self.plans_manager = PlansManager(str(plans_file))
        self.dataset_json = json.loads(ds_file.read_text(encoding="utf-8"))
        self.label_manager = self.plans_manager.get_label_manager(self.dataset_json)
        try:
            cm = self.plans_manager.get_configuration(configuration)
        except RuntimeError as exc:
            raise NnunetDataError(str(exc)) from exc
        self.configuration = cm
        self.data_folder = self.folder / cm.data_identifier
        if not self.data_folder.is_dir() or not any(self.data_folder.iterdir()):
            raise NnunetDataError(f"{self.data_folder} holds no preprocessed cases (run the preprocessing for "
                                  f"{configuration})")
        self.dataset = infer_dataset_class(str(self.data_folder))(str(self.data_folder))
        if not self.dataset.identifiers:
            raise NnunetDataError(f"{self.data_folder} holds no preprocessed cases")
        self.name = name or self.plans_manager.dataset_name
        self.classes = _label_classes(self.dataset_json["labels"], self.label_manager)
        if not self.classes:
            raise NnunetDataError(f"{self.folder}: dataset.json declares no foreground label")
        self.ignore_label = self.label_manager.ignore_label
        self.image_channels = len(self.dataset_json.get("channel_names", self.dataset_json.get("modality", {})))
        self.spacing = tuple(float(s) for s in cm.spacing)
        self.normalization = list(cm.normalization_schemes)
        self._loaders: dict = {}

    @property
    def num_images(self) -> int:
        return len(self.dataset.identifiers)

    def describe(self) -> dict:
        return {"source": "nnunet", "folder": str(self.folder), "plans": self.plans_manager.plans_name,
                "data_identifier": self.configuration.data_identifier, "spacing": list(self.spacing),
                "normalization": self.normalization}

    def _loader(self, patch: Sequence[int], foreground_prob: float):
        from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

        key = (tuple(int(p) for p in patch), float(foreground_prob))
        if key not in self._loaders:
            # patch_size == final_patch_size: no extra border for spatial augmentation (none is applied here)
            self._loaders[key] = nnUNetDataLoader(self.dataset, 1, list(key[0]), list(key[0]), self.label_manager,
                                                  oversample_foreground_percent=key[1],
                                                  probabilistic_oversampling=True)
        return self._loaders[key]

    def sample(self, rng: np.random.Generator, patch: Sequence[int], foreground_prob: float = 1.0 / 3.0
               ) -> tuple[np.ndarray, np.ndarray]:
        """One patch. nnU-Net's loader draws from numpy's global stream: it is seeded from ``rng`` for the call
        and restored afterwards, so sampling follows our (seed, rank, epoch) streams and leaks no state."""
        loader = self._loader(patch, foreground_prob)
        state = np.random.get_state()
        try:
            np.random.seed(int(rng.integers(2 ** 32, dtype=np.uint64)))
            batch = loader.generate_train_batch()
        finally:
            np.random.set_state(state)
        img = batch["data"][0].numpy().astype(np.float32, copy=False)
        seg = batch["target"][0, 0].numpy().astype(np.int16)
        seg[seg < 0] = 0  # nnU-Net pads the seg with -1 outside the image and trains it as background
        if self.ignore_label is not None:
            seg[seg == int(self.ignore_label)] = -1
        return img, seg


__all__ = ["NnunetDataError", "NnunetPretrainDataset", "HeadClass", "nnunet_paths", "plan_and_preprocess",
           "write_raw_dataset", "write_phantom_raw_dataset", "resolve_preprocessed", "require_nnunetv2"]
