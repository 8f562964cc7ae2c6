"""Shared fixtures: a tiny float model on disk and calibration data that fits it.

The model is :func:`builders.conv_relu_model` (input ``x: float[N,3,8,8]``). Calibration data is an
``.npz`` in the stacked form: ``x`` has shape ``[samples, 1, 3, 8, 8]``, so ``x[i]`` is one whole feed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import builders
import numpy as np
import pytest

# The latency guard's choices follow timings: tests turn it on explicitly where they test it. Set at
# import, before test modules build their configurations (and inherited by CLI subprocesses).
os.environ["ONNXQ_LATENCY_GUARD"] = "off"


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    """The tiny Conv → Relu model written to ``<tmp>/models/conv.onnx``."""
    folder = tmp_path / "models"
    folder.mkdir()
    return builders.save(builders.conv_relu_model(), folder / "conv.onnx")


@pytest.fixture
def calib_npz(tmp_path: Path) -> Path:
    """Calibration data for :func:`model_path` at ``<tmp>/data/calib.npz`` (stacked form)."""
    folder = tmp_path / "data"
    folder.mkdir(exist_ok=True)
    path = folder / "calib.npz"
    np.savez(path, x=builders.conv_calibration())
    return path


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    """An empty folder for outputs, separate from inputs so that leftovers are easy to spot."""
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


@pytest.fixture
def write_npz(tmp_path: Path) -> Callable[..., Path]:
    """``write_npz("name.npz", x=array, ...)`` writes ``<tmp>/data/name.npz`` and returns its path."""

    def write(name: str, **arrays: np.ndarray) -> Path:
        folder = tmp_path / "data"
        folder.mkdir(exist_ok=True)
        path = folder / name
        np.savez(path, **arrays)  # type: ignore[arg-type]
        return path

    return write
