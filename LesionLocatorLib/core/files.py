"""Atomic output files and output names: one writer for every file the project writes.

A temp file in the target folder + ``os.replace`` means readers never see half a file. ``mkstemp`` creates
files with mode 0600; outputs get the usual ``0666 & ~umask`` instead, so a colleague can read a shared
results folder.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Optional, Union

PathLike = Union[str, os.PathLike]
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")  # what read_image reads


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: PathLike, write: Callable[[str], None], suffix: str = "") -> Path:
    """Call ``write(temp_path)``, then move the temp file onto ``path`` with the umask's permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    return atomic_write(path, write)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def case_name(path: PathLike) -> str:
    """``/data/ct_001.nii.gz`` -> ``ct_001`` (image suffixes removed; folders such as DICOM series keep their name)."""
    name = Path(str(path).rstrip("/")).name
    return strip_image_suffix(name) or name


def strip_image_suffix(name: str) -> Optional[str]:
    """``ct.nii.gz`` -> ``ct``; None when ``name`` has no image suffix."""
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None
