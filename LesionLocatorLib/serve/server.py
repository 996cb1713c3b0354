"""``python -m LesionLocatorLib.serve.server ...``: the same as ``lesionlocator serve ...``."""
from __future__ import annotations

import sys

if __name__ == "__main__":
    from ..cli.serve import main

    sys.exit(main())
