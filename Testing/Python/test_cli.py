"""The lesionlocator command line: outputs, help, and one clear line + non-zero exit for bad input."""
import json
import subprocess
import sys

import numpy as np
import pytest

from LesionLocatorLib.cli.main import main
from LesionLocatorLib.core.geometry import Volume
from LesionLocatorLib.core.image_io import read_image, write_image
from LesionLocatorLib.synthetic.longitudinal import make_followup
from LesionLocatorLib.synthetic.phantom import make_phantom
from LesionLocatorLib.model.tiny_model import write_random_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    ck = write_random_checkpoint(d / "ck", patch_size=(32, 48, 48))
    ct, lab = make_phantom(shape=(40, 80, 80), spacing=(2.5, 1.5, 1.5), n_lesions=2, seed=2)
    write_image(ct, d / "ct.nii.gz")
    write_image(lab, d / "lab.nii.gz")
    c = [int(v) for v in np.argwhere(lab.array == 1).mean(0).round()]
    (d / "pts.json").write_text(json.dumps({"1": {"point": c}, "300": {"point": [20, 40, 40]}}))
    return d, ck, ct


def test_segment_writes_masks_with_input_geometry(setup, capsys):
    d, ck, ct = setup
    rc = main(["segment", "-i", str(d / "ct.nii.gz"), "-p", str(d / "pts.json"), "-o", str(d / "out"),
               "-m", str(ck), "--device", "cpu", "--save-probabilities"])
    assert rc == 0
    out = d / "out"
    for name in ("ct_lesion_1.nii.gz", "ct_lesion_300.nii.gz", "ct_lesions.nii.gz", "ct_lesion_1_prob.nii.gz",
                 "ct_summary.json"):
        assert (out / name).is_file(), name
    merged = read_image(out / "ct_lesions.nii.gz")
    assert merged.same_grid(ct)
    assert set(np.unique(merged.array)) <= {0, 1, 300}
    summary = json.loads((out / "ct_summary.json").read_text())
    assert set(summary["lesions"]) == {"1", "300"}
    assert "lesion 300" in capsys.readouterr().out


def test_mask_prompts_from_label_map(setup):
    d, ck, _ = setup
    assert main(["segment", "-i", str(d / "ct.nii.gz"), "-p", str(d / "lab.nii.gz"), "-o", str(d / "outm"),
                 "-m", str(ck), "--device", "cpu"]) == 0
    assert (d / "outm" / "ct_lesion_2.nii.gz").is_file()


@pytest.mark.parametrize("case, msg", [
    ("missing_image", "image not found"),
    ("outside", "outside the image"),
    ("bad_json", "not valid JSON"),
    ("wrong_type", "--prompt-type box"),
    ("missing_fold", "fold"),
    ("no_checkpoint", "checkpoint not found"),
    ("label_grid", "not on the image grid"),
])
def test_bad_input_exits_with_message(setup, case, msg, capsys):
    d, ck, ct = setup
    args = {"-i": str(d / "ct.nii.gz"), "-p": str(d / "pts.json"), "-o": str(d / "bad"), "-m": str(ck)}
    extra = []
    if case == "missing_image":
        args["-i"] = str(d / "nope.nii.gz")
    elif case == "outside":
        (d / "out.json").write_text(json.dumps({"1": {"point": [400, 1, 1]}}))
        args["-p"] = str(d / "out.json")
    elif case == "bad_json":
        (d / "b.json").write_text("{oops")
        args["-p"] = str(d / "b.json")
    elif case == "wrong_type":
        extra = ["--prompt-type", "box"]
    elif case == "missing_fold":
        extra = ["--folds", "3"]
    elif case == "no_checkpoint":
        args["-m"] = str(d / "missing_ck")
    elif case == "label_grid":
        write_image(Volume(np.ones((5, 5, 5), np.uint8)), d / "small_lab.nii.gz")
        args["-p"] = str(d / "small_lab.nii.gz")
    argv = ["segment", "--device", "cpu"] + [x for kv in args.items() for x in kv] + extra
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
    assert not (d / "bad").exists() or not any((d / "bad").iterdir())


def test_track_command_writes_every_timepoint_and_report(setup):
    d, ck, ct = setup
    lab = read_image(d / "lab.nii.gz")
    fu, _, _ = make_followup(ct, lab, seed=1, shift_mm=(4, 0, 0))
    write_image(fu, d / "fu.nii.gz")
    rc = main(["track", "-bl", str(d / "ct.nii.gz"), "-fu", str(d / "fu.nii.gz"), "-p", str(d / "lab.nii.gz"),
               "-o", str(d / "trk"), "-m", str(ck), "--propagation", "classical", "--refine", "none",
               "--device", "cpu"])
    assert rc == 0
    names = {p.name for p in (d / "trk").iterdir()}
    assert {"report.json", "report.csv", "ct_lesions.nii.gz", "fu_lesions.nii.gz"} <= names
    report = json.loads((d / "trk" / "report.json").read_text())
    assert {m["lesion_id"] for m in report["lesions"]} == {1, 2}
    # an unreadable follow-up fails before anything is written
    (d / "broken.nii.gz").write_bytes(b"nope")
    rc = main(["track", "-bl", str(d / "ct.nii.gz"), "-fu", str(d / "broken.nii.gz"), "-p", str(d / "lab.nii.gz"),
               "-o", str(d / "trk2"), "-m", str(ck), "--propagation", "classical", "--refine", "none"])
    assert rc == 2 and not (d / "trk2").exists()


def test_help_documents_every_command():
    for cmd in ("segment", "track", "evaluate", "serve", "demo"):
        r = subprocess.run([sys.executable, "-m", "LesionLocatorLib.cli.main", cmd, "--help"], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "usage:" in r.stdout
    r = subprocess.run([sys.executable, "-m", "LesionLocatorLib.cli.main", "segment", "--help"], capture_output=True,
                       text=True, timeout=120)
    for flag in ("--prompt-type", "--folds", "--tta", "--device", "--server", "point_lps"):
        assert flag in r.stdout


def test_help_states_each_default_once():
    r = subprocess.run([sys.executable, "-m", "LesionLocatorLib.cli.main", "track", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert text.count("(default: the bundled demo model)") == 1
    import re

    assert not re.search(r"\(default:[^)]*\)\s*\(default:", text)


@pytest.mark.parametrize("extra, msg", [
    (["--server", ""], "--server is empty"),
    (["--server", "http://127.0.0.1:9", "-m", "x"], "cannot be used with --server"),
    (["--server", "http://127.0.0.1:9", "--device", "cpu"], "cannot be used with --server"),
    (["--token", "abc"], "only used with --server"),
])
def test_contradicting_backend_options_are_refused(setup, extra, msg, capsys):
    d, ck, _ = setup
    argv = ["segment", "-i", str(d / "ct.nii.gz"), "-p", str(d / "pts.json"), "-o", str(d / "contra")] + extra
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
    assert not (d / "contra").exists()


def test_outputs_get_the_usual_permissions(setup):
    """Atomic writes go through mkstemp (mode 0600); outputs must still be readable by colleagues (umask)."""
    import os

    d, ck, _ = setup
    old = os.umask(0o022)
    try:
        assert main(["segment", "-i", str(d / "ct.nii.gz"), "-p", str(d / "pts.json"), "-o", str(d / "perm"),
                     "-m", str(ck), "--device", "cpu"]) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (d / "perm").iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes


def test_cuda_requested_without_gpu(setup, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    d, ck, _ = setup
    rc = main(["segment", "-i", str(d / "ct.nii.gz"), "-p", str(d / "pts.json"), "-o", str(d / "gpu"),
               "-m", str(ck), "--device", "cuda"])
    err = capsys.readouterr().err
    assert rc != 0 and "no CUDA GPU" in err and "Traceback" not in err
