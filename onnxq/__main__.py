"""``python -m onnxq``: see :mod:`onnxq.cli`."""

from __future__ import annotations

import sys

from onnxq.cli import main

if __name__ == "__main__":
    sys.exit(main())
