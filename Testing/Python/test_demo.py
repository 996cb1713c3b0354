"""`lesionlocator demo` works out of the box with the bundled model and writes everything it promises."""
import json

import pytest

from LesionLocatorLib.model.bundled import BundledModelMissing, default_checkpoint
from LesionLocatorLib.cli.main import main
from LesionLocatorLib.core.image_io import read_image


def test_demo_end_to_end(tmp_path, capsys):
    try:
        default_checkpoint()
    except BundledModelMissing as exc:
        pytest.skip(str(exc))
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out)]) == 0
    for name in ("baseline_ct.nii.gz", "followup_ct.nii.gz", "baseline_lesions.nii.gz", "followup_lesions.nii.gz",
                 "report.json", "report.csv", "overview.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["timepoints"] == ["baseline", "followup"]
    ids = {m["lesion_id"] for m in report["lesions"]}
    assert ids and all(any(m["lesion_id"] == i and m["timepoint_index"] == 1 for m in report["lesions"]) for i in ids)
    assert read_image(out / "followup_lesions.nii.gz").same_grid(read_image(out / "followup_ct.nii.gz"))
    text = capsys.readouterr().out
    assert "RECIST" in text and "overview.png" in text
