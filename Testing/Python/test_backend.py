"""open_backend: one call chooses the backend; the remote one works where torch is not installed."""
import subprocess
import sys

import pytest

from LesionLocatorLib.backend import LocalBackend, open_backend


def test_remote_backend_imports_no_torch():
    """A Slicer that only talks to a server has no torch: the client side must not import it."""
    code = ("import sys; import LesionLocatorLib; from LesionLocatorLib.backend import open_backend; "
            "import LesionLocatorLib.serve.client, LesionLocatorLib.core.prompts, LesionLocatorLib.track.checks; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr or "torch was imported"


def test_local_backend_describes_its_settings():
    with open_backend(device="cpu", folds=None, tta=True, grow=False) as backend:
        assert isinstance(backend, LocalBackend) and not backend.remote
        info = backend.describe()
        assert info["backend"] == "local" and info["tta"] is True and info["grow"] is False
        assert "point" in info["kinds"] and info["checkpoint"] == "bundled"


def test_empty_server_url_is_refused():
    with pytest.raises(ValueError, match="empty"):
        open_backend(server="  ")
