"""Tests for onnxq.data: input specs, every source form, checking, batching and limits."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxq import data
from onnxq.data import Feeds, InputSpec, input_specs, load_feeds
from onnxq.errors import OnnxqError

# A dynamic-batch model: image-like x and token ids with a variable sequence length S.
DYNAMIC_TEXT = """
<ir_version: 10, opset_import: ["" : 17]>
dyn (float[N,3,4,4] x, int64[N,S] ids) => (float[N,3,4,4] y, int64[N,S] z) {
    y = Identity(x)
    z = Identity(ids)
}
"""

# Fixed batch 1 and a scalar input; w is an initializer, not a feed.
FIXED_TEXT = """
<ir_version: 10, opset_import: ["" : 17]>
fixed (float[1,2] fb, float s, float w) => (float[1,2] y) <float w = {2.0}> {
    t = Mul(fb, s)
    y = Mul(t, w)
}
"""

# Unknown rank, unknown dim, bool and uint8 inputs.
MISC_TEXT = """
<ir_version: 10, opset_import: ["" : 17]>
misc (float[] u, float16[?,5] h, bool[N,2] m, uint8[N] b) => (float[] y) {
    y = Identity(u)
}
"""


def _proto(text: str) -> onnx.ModelProto:
    return onnx.parser.parse_model(text)


def _specs(text: str) -> list[InputSpec]:
    return input_specs(ir.from_proto(_proto(text)))


@pytest.fixture
def dyn_specs() -> list[InputSpec]:
    return _specs(DYNAMIC_TEXT)


@pytest.fixture
def fixed_specs() -> list[InputSpec]:
    return _specs(FIXED_TEXT)


def _dyn_sample(rng: np.random.Generator, seq: int = 7) -> dict[str, np.ndarray]:
    return {
        "x": rng.standard_normal((1, 3, 4, 4)).astype(np.float32),
        "ids": rng.integers(0, 100, size=(1, seq)).astype(np.int64),
    }


def _assert_feed_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name])


def _raises(match: str) -> Any:
    return pytest.raises(OnnxqError, match=match)


# ---------------------------------------------------------------------------------------------------
# input_specs


def test_input_specs_dynamic(dyn_specs: list[InputSpec]) -> None:
    assert [s.name for s in dyn_specs] == ["x", "ids"]
    x, ids = dyn_specs
    assert x.dtype == np.float32 and x.shape == ("N", 3, 4, 4)
    assert ids.dtype == np.int64 and ids.shape == ("N", "S")
    assert x.batch_axis_dynamic and ids.batch_axis_dynamic
    assert x.describe() == "float32[N,3,4,4]"


def test_input_specs_skip_initializers_and_scalars(fixed_specs: list[InputSpec]) -> None:
    assert [s.name for s in fixed_specs] == ["fb", "s"]
    fb, s = fixed_specs
    assert fb.shape == (1, 2) and not fb.batch_axis_dynamic
    assert s.shape == () and not s.batch_axis_dynamic


def test_input_specs_unknown_rank_and_dims() -> None:
    u, h, m, b = _specs(MISC_TEXT)
    assert u.shape is None and not u.batch_axis_dynamic
    assert u.describe() == "float32[?...]"
    assert h.dtype == np.float16 and h.shape == (None, 5) and h.batch_axis_dynamic
    assert m.dtype == np.bool_ and b.dtype == np.uint8


def test_input_specs_no_element_type() -> None:
    model = ir.from_proto(_proto(DYNAMIC_TEXT))
    model.graph.inputs[0].dtype = None
    with _raises("'x' has no element type"):
        input_specs(model)


# ---------------------------------------------------------------------------------------------------
# A single .npz file


def test_npz_stacked(tmp_path: Path, dyn_specs: list[InputSpec]) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 1, 3, 4, 4)).astype(np.float32)
    ids = rng.integers(0, 9, size=(5, 1, 7))
    path = tmp_path / "calib.npz"
    np.savez(path, x=x, ids=ids)
    feeds = load_feeds(path, dyn_specs)
    assert feeds.num_samples == 5 and feeds.num_batches == 5 and len(feeds) == 5
    assert feeds.samples_per_batch == 1 and not feeds.is_random
    got = list(feeds)
    assert len(got) == 5
    for i, feed in enumerate(got):
        _assert_feed_equal(feed, {"x": x[i], "ids": ids[i].astype(np.int64)})
    # Re-iterable: a second pass yields the same feeds.
    for a, b in zip(got, feeds, strict=True):
        _assert_feed_equal(a, b)


def test_npz_split_along_dynamic_axis(tmp_path: Path, dyn_specs: list[InputSpec]) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 3, 4, 4)).astype(np.float32)
    ids = rng.integers(0, 9, size=(4, 6)).astype(np.int64)
    path = tmp_path / "calib.npz"
    np.savez(path, x=x, ids=ids)
    got = list(load_feeds(str(path), dyn_specs))
    assert len(got) == 4
    for i, feed in enumerate(got):
        assert feed["x"].shape == (1, 3, 4, 4) and feed["ids"].shape == (1, 6)
        _assert_feed_equal(feed, {"x": x[i : i + 1], "ids": ids[i : i + 1]})
        assert feed["x"].flags.writeable


def test_npz_mixed_layouts_compressed(tmp_path: Path, dyn_specs: list[InputSpec]) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 1, 3, 4, 4)).astype(np.float32)  # stacked
    ids = rng.integers(0, 9, size=(3, 5)).astype(np.int64)  # split
    path = tmp_path / "calib.npz"
    np.savez_compressed(path, x=x, ids=ids)
    got = list(load_feeds(path, dyn_specs))
    for i, feed in enumerate(got):
        _assert_feed_equal(feed, {"x": x[i], "ids": ids[i : i + 1]})


def test_npz_fortran_order(tmp_path: Path, dyn_specs: list[InputSpec]) -> None:
    x = np.asfortranarray(np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4))
    ids = np.ones((2, 1, 3), dtype=np.int64)
    path = tmp_path / "calib.npz"
    np.savez(path, x=x, ids=ids)
    got = list(load_feeds(path, dyn_specs))
    np.testing.assert_array_equal(got[1]["x"], x[1:2])


def test_npz_fixed_batch_and_scalar_stacked(tmp_path: Path, fixed_specs: list[InputSpec]) -> None:
    fb = np.arange(6, dtype=np.float32).reshape(3, 1, 2)
    s = np.array([1.0, 2.0, 3.0], dtype=np.float64)  # float64 is cast to float32
    path = tmp_path / "calib.npz"
    np.savez(path, fb=fb, s=s)
    got = list(load_feeds(path, fixed_specs))
    assert len(got) == 3
    assert got[2]["fb"].shape == (1, 2) and got[2]["s"].shape == ()
    assert got[2]["s"].dtype == np.float32 and float(got[2]["s"]) == 3.0


def test_npz_casts_within_kind(tmp_path: Path, dyn_specs: list[InputSpec]) -> None:
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.zeros((2, 3, 4, 4), np.float64), ids=np.ones((2, 4), np.int32))
    feed = next(iter(load_feeds(path, dyn_specs)))
    assert feed["x"].dtype == np.float32 and feed["ids"].dtype == np.int64


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        pytest.param(
            {"x": np.zeros((5, 3, 4, 4), np.float32), "ids": np.zeros((4, 2), np.int64)},
            r"'x' has 5 samples but input 'ids' has 4",
            id="count-mismatch",
        ),
        pytest.param(
            {"x": np.zeros((2, 3, 4, 4), np.float32)},
            r"calib\.npz: missing input 'ids'",
            id="missing-input",
        ),
        pytest.param(
            {"x": np.zeros((2, 3, 4, 4), np.float32), "ids": np.zeros((2, 2)), "mask": np.zeros(2)},
            r"unknown input 'mask'; the model's inputs are 'x', 'ids'",
            id="unknown-input",
        ),
        pytest.param(
            {"x": np.zeros((2, 4, 4), np.float32), "ids": np.zeros((2, 2), np.int64)},
            r"calib\.npz: input 'x' expects float32\[N,3,4,4\]: an array of rank 5 .*got shape \(2, 4, 4\)",
            id="rank",
        ),
        pytest.param(
            {"x": np.zeros((2, 3, 5, 4), np.float32), "ids": np.zeros((2, 2), np.int64)},
            r"input 'x' axis 2 must be 4, got 5",
            id="fixed-dim",
        ),
        pytest.param(
            {"x": np.zeros((2, 3, 4, 4), np.float32), "ids": np.zeros((2, 2), np.float32)},
            r"input 'ids' expects int64, got float32",
            id="dtype",
        ),
        pytest.param(
            {"x": np.zeros((2, 3, 4, 4), np.int64), "ids": np.zeros((2, 2), np.int64)},
            r"input 'x' expects float32, got int64",
            id="int-for-float",
        ),
        pytest.param(
            {"x": np.zeros((0, 3, 4, 4), np.float32), "ids": np.zeros((0, 2), np.int64)},
            r"holds no samples",
            id="empty",
        ),
        pytest.param({}, r"holds no arrays", id="no-arrays"),
    ],
)
def test_npz_errors(
    tmp_path: Path, dyn_specs: list[InputSpec], arrays: dict[str, np.ndarray], match: str
) -> None:
    path = tmp_path / "calib.npz"
    np.savez(path, **arrays)
    with _raises(match):
        load_feeds(path, dyn_specs)


def test_npz_fixed_batch_needs_stacked_form(tmp_path: Path, fixed_specs: list[InputSpec]) -> None:
    path = tmp_path / "calib.npz"
    np.savez(path, fb=np.zeros((3, 2), np.float32), s=np.zeros(3, np.float32))
    with _raises(r"input 'fb' float32\[1,2\] has axis 0 fixed at 1, so its samples must be stacked"):
        load_feeds(path, fixed_specs)
    np.savez(path, fb=np.zeros((3, 1, 2), np.float32), s=np.float32(1.0))
    with _raises(r"input 's' float32\[\] is a scalar, so its samples must be stacked.*got shape \(\)"):
        load_feeds(path, fixed_specs)


def test_npz_unknown_rank_uses_stacked_form(tmp_path: Path) -> None:
    specs = [InputSpec("u", np.dtype(np.float32), None)]
    path = tmp_path / "calib.npz"
    np.savez(path, u=np.arange(6, dtype=np.float32).reshape(3, 2))
    got = list(load_feeds(path, specs))
    assert [f["u"].shape for f in got] == [(2,)] * 3
    np.savez(path, u=np.float32(1.0))
    with _raises("'u' has an unknown rank"):
        load_feeds(path, specs)


def test_npz_integer_range_checked(tmp_path: Path) -> None:
    specs = [InputSpec("b", np.dtype(np.uint8), ("N",))]
    path = tmp_path / "calib.npz"
    np.savez(path, b=np.array([1, 200, 255], np.int64))
    got = list(load_feeds(path, specs))
    assert got[1]["b"].dtype == np.uint8 and int(got[1]["b"][0]) == 200
    np.savez(path, b=np.array([1, 300], np.int64))
    with _raises(r"calib\.npz \(sample 1\): input 'b' expects uint8, got int64 values in \[300, 300\]"):
        list(load_feeds(path, specs))


def test_npz_object_array(tmp_path: Path, dyn_specs: list[InputSpec]) -> None:
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object), ids=np.zeros((1, 2), np.int64))
    with _raises(r"calib\.npz: array 'x' holds Python objects"):
        load_feeds(path, dyn_specs)


def test_missing_path(tmp_path: Path, dyn_specs: list[InputSpec]) -> None:
    missing = tmp_path / "nope.npz"
    with _raises(f"^calibration data not found: {missing}$"):
        load_feeds(missing, dyn_specs)
    with _raises(f"^evaluation data not found: {missing}$"):
        load_feeds(str(missing), dyn_specs, what="evaluation")
    with _raises(f"^evaluation data not found: {missing}$"):
        load_feeds(str(missing), dyn_specs, what="evaluation data")


def test_corrupt_and_foreign_files(tmp_path: Path, dyn_specs: list[InputSpec]) -> None:
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip archive")
    with _raises(r"garbage\.npz is not an \.npz archive"):
        load_feeds(garbage, dyn_specs)
    npy = tmp_path / "single.npy"
    np.save(npy, np.zeros((2, 3, 4, 4), np.float32))
    with _raises(r"single\.npy is not an \.npz archive"):
        load_feeds(npy, dyn_specs)


def test_corrupt_member(tmp_path: Path, dyn_specs: list[InputSpec]) -> None:
    import zipfile

    path = tmp_path / "broken.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", b"not an npy header at all")
        archive.writestr("ids.npy", b"")
    with _raises(r"broken\.npz is not a readable \.npz archive"):
        load_feeds(path, dyn_specs)


def test_truncated_member(tmp_path: Path, dyn_specs: list[InputSpec]) -> None:
    import io
    import zipfile

    def npy_bytes(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, array)
        return buffer.getvalue()

    path = tmp_path / "short.npz"
    full = npy_bytes(np.zeros((3, 3, 4, 4), np.float32))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", full[:-10])
        archive.writestr("ids.npy", npy_bytes(np.zeros((3, 2), np.int64)))
    feeds = load_feeds(path, dyn_specs)  # headers are fine
    with _raises(r"short\.npz: array 'x' is truncated"):
        list(feeds)


def test_npz_streams_rows(
    tmp_path: Path, dyn_specs: list[InputSpec], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A C-order archive is read row by row, never loaded whole with np.load."""
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.zeros((3, 3, 4, 4), np.float32), ids=np.zeros((3, 2), np.int64))

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("np.load must not be called for a streamable archive")

    monkeypatch.setattr(np, "load", no_load)
    assert len(list(load_feeds(path, dyn_specs))) == 3


# ---------------------------------------------------------------------------------------------------
# A directory of .npz files


def _write_dir(root: Path, names_and_seq: list[tuple[str, int]]) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(4)
    root.mkdir(exist_ok=True)
    written = {}
    for name, seq in names_and_seq:
        feed = _dyn_sample(rng, seq)
        np.savez(root / name, **feed)
        written[name] = feed
    return written


def test_directory_sorted_with_varying_length(tmp_path: Path, dyn_specs: list[InputSpec]) -> None:
    root = tmp_path / "feeds"
    written = _write_dir(root, [("b.npz", 5), ("a.npz", 3), ("c.npz", 9)])
    (root / "README.txt").write_text("ignored")
    (root / "sub.npz").mkdir()  # a directory named like an archive is ignored too
    feeds = load_feeds(root, dyn_specs)
    assert feeds.num_samples == 3
    got = list(feeds)
    for feed, name in zip(got, ["a.npz", "b.npz", "c.npz"], strict=True):
        _assert_feed_equal(feed, written[name])
    assert [f["ids"].shape[1] for f in got] == [3, 5, 9]


def test_directory_is_read_lazily(
    tmp_path: Path, dyn_specs: list[InputSpec], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "feeds"
    _write_dir(root, [(f"{i:03d}.npz", 4) for i in range(4)])
    loaded: list[str] = []
    real_load = np.load

    def counting_load(file: Any, *args: Any, **kwargs: Any) -> Any:
        loaded.append(Path(file).name)
        return real_load(file, *args, **kwargs)

    monkeypatch.setattr(np, "load", counting_load)
    feeds = load_feeds(root, dyn_specs)
    assert loaded == []
    iterator = iter(feeds)
    next(iterator)
    assert loaded == ["000.npz"]
    next(iterator)
    assert loaded == ["000.npz", "001.npz"]


def test_directory_empty(tmp_path: Path, dyn_specs: list[InputSpec]) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    with _raises(r"^calibration data directory .*empty holds no \.npz files$"):
        load_feeds(root, dyn_specs)
    (root / "notes.txt").write_text("x")
    with _raises("holds no .npz files"):
        load_feeds(root, dyn_specs)


def test_directory_bad_file_named(tmp_path: Path, dyn_specs: list[InputSpec]) -> None:
    root = tmp_path / "feeds"
    _write_dir(root, [("000.npz", 4)])
    (root / "001.npz").write_bytes(b"garbage")
    feeds = load_feeds(root, dyn_specs)
    with _raises(r"001\.npz is not an \.npz archive"):
        list(feeds)


def test_directory_rank_mismatch_names_file_and_input(tmp_path: Path, dyn_specs: list[InputSpec]) -> None:
    root = tmp_path / "feeds"
    _write_dir(root, [("000.npz", 4)])
    # A stacked layout is not accepted in a directory: each file is one feed of the input's rank.
    np.savez(root / "001.npz", x=np.zeros((1, 1, 3, 4, 4), np.float32), ids=np.zeros((1, 4), np.int64))
    with _raises(r"001\.npz: input 'x' expects rank 4 float32\[N,3,4,4\], got rank 5"):
        list(load_feeds(root, dyn_specs))


def test_directory_batching(
    tmp_path: Path, dyn_specs: list[InputSpec], caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "same"
    written = _write_dir(root, [(f"{i:03d}.npz", 4) for i in range(5)])
    feeds = load_feeds(root, dyn_specs, batch_size=2)
    assert feeds.samples_per_batch == 2 and feeds.num_batches == 3
    got = list(feeds)
    assert [f["x"].shape[0] for f in got] == [2, 2, 1]
    expected_ids = np.concatenate([written[n]["ids"] for n in sorted(written)])
    np.testing.assert_array_equal(np.concatenate([f["ids"] for f in got]), expected_ids)

    varying = tmp_path / "varying"
    _write_dir(varying, [("0.npz", 3), ("1.npz", 3), ("2.npz", 5)])
    with caplog.at_level(logging.WARNING, logger="onnxq.data"):
        feeds = load_feeds(varying, dyn_specs, batch_size=2)
    assert feeds.samples_per_batch == 1 and feeds.num_batches == 3
    assert "input 'ids' changes shape between samples" in caplog.text
    assert [f["ids"].shape for f in feeds] == [(1, 3), (1, 3), (1, 5)]


# ---------------------------------------------------------------------------------------------------
# Iterables


def test_list_and_tuple(dyn_specs: list[InputSpec]) -> None:
    rng = np.random.default_rng(5)
    samples = [_dyn_sample(rng, seq) for seq in (2, 3, 4)]
    for source in (samples, tuple(samples)):
        feeds = load_feeds(source, dyn_specs)
        assert feeds.num_samples == 3 and len(feeds) == 3
        first, second = list(feeds), list(feeds)
        for a, b, c in zip(first, second, samples, strict=True):
            _assert_feed_equal(a, c)
            _assert_feed_equal(b, c)


def test_array_likes_and_casts(dyn_specs: list[InputSpec]) -> None:
    source = [{"x": np.zeros((1, 3, 4, 4)).tolist(), "ids": [[1, 2, 3]]}]
    feed = next(iter(load_feeds(source, dyn_specs)))
    assert feed["x"].dtype == np.float32 and feed["ids"].dtype == np.int64


class _Reiterable:
    def __init__(self, samples: list[dict[str, np.ndarray]]) -> None:
        self.samples = samples
        self.passes = 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        self.passes += 1
        return iter(self.samples)


def test_reiterable_without_len(dyn_specs: list[InputSpec]) -> None:
    rng = np.random.default_rng(6)
    source = _Reiterable([_dyn_sample(rng) for _ in range(3)])
    feeds = load_feeds(source, dyn_specs)
    assert feeds.num_samples is None and feeds.num_batches is None
    assert bool(feeds)
    with pytest.raises(TypeError):
        len(feeds)
    assert len(list(feeds)) == 3 and len(list(feeds)) == 3
    assert source.passes == 2


def test_generator_cached_for_second_pass(dyn_specs: list[InputSpec]) -> None:
    rng = np.random.default_rng(7)
    samples = [_dyn_sample(rng, seq) for seq in (2, 5, 3)]
    pulled: list[int] = []

    def gen() -> Iterator[dict[str, np.ndarray]]:
        for i, sample in enumerate(samples):
            pulled.append(i)
            yield sample

    feeds = load_feeds(gen(), dyn_specs)
    assert feeds.num_samples is None
    first = list(feeds)
    second = list(feeds)
    assert pulled == [0, 1, 2]
    for a, b, c in zip(first, second, samples, strict=True):
        _assert_feed_equal(a, c)
        _assert_feed_equal(b, c)


def test_generator_limit_then_full(dyn_specs: list[InputSpec]) -> None:
    rng = np.random.default_rng(8)
    samples = [_dyn_sample(rng) for _ in range(5)]
    feeds = load_feeds(iter(samples), dyn_specs)
    assert len(list(feeds.limit(2))) == 2
    rest = list(feeds)
    assert len(rest) == 5
    for a, c in zip(rest, samples, strict=True):
        _assert_feed_equal(a, c)


def test_generator_cache_bound(dyn_specs: list[InputSpec]) -> None:
    limit = data.ONE_SHOT_CACHE_LIMIT
    sample = _dyn_sample(np.random.default_rng(9))
    at_bound = load_feeds((sample for _ in range(limit)), dyn_specs)
    assert len(list(at_bound)) == limit and len(list(at_bound)) == limit

    past_bound = load_feeds((sample for _ in range(limit + 1)), dyn_specs)
    assert len(list(past_bound)) == limit + 1
    with _raises(r"one-shot iterator with more than 256 samples and was iterated twice; pass a list"):
        list(past_bound)


@pytest.mark.parametrize(
    ("item", "match"),
    [
        pytest.param([1, 2], r"^calibration data item 1: expected a mapping .* got list$", id="not-mapping"),
        pytest.param({"x": np.zeros((1, 3, 4, 4), np.float32)}, r"item 1: missing input 'ids'", id="missing"),
        pytest.param(
            {"x": np.zeros((1, 3, 4, 4), np.float32), "ids": np.zeros((1, 2), np.int64), "y": 1},
            r"item 1: unknown input 'y'; the model's inputs are 'x', 'ids'",
            id="unknown",
        ),
        pytest.param(
            {"x": np.zeros((3, 4, 4), np.float32), "ids": np.zeros((1, 2), np.int64)},
            r"item 1: input 'x' expects rank 4 float32\[N,3,4,4\], got rank 3 with shape \(3, 4, 4\)",
            id="rank",
        ),
        pytest.param(
            {"x": np.zeros((1, 2, 4, 4), np.float32), "ids": np.zeros((1, 2), np.int64)},
            r"item 1: input 'x' axis 1 must be 3, got 2",
            id="fixed-dim",
        ),
        pytest.param(
            {"x": np.zeros((1, 3, 4, 4), np.float32), "ids": np.zeros((1, 2), np.float32)},
            r"item 1: input 'ids' expects int64, got float32$",
            id="dtype",
        ),
        pytest.param(
            {"x": [[1.0], [1.0, 2.0]], "ids": np.zeros((1, 2), np.int64)},
            r"item 1: input 'x' is not an array",
            id="ragged",
        ),
    ],
)
@pytest.mark.parametrize("one_shot", [False, True], ids=["list", "generator"])
def test_iterable_errors(dyn_specs: list[InputSpec], item: Any, match: str, one_shot: bool) -> None:
    good = _dyn_sample(np.random.default_rng(10))
    items = [good, item]
    feeds = load_feeds(iter(items) if one_shot else items, dyn_specs)
    with _raises(match):
        list(feeds)


@pytest.mark.parametrize(
    ("source", "match"),
    [
        pytest.param({"x": np.zeros(1)}, "single mapping; pass an iterable of feeds", id="mapping"),
        pytest.param(5, "must be a path, 'random' or an iterable of feeds .* got int", id="int"),
        pytest.param(np.zeros((2, 3)), "got ndarray", id="ndarray"),
        pytest.param(b"random", "got bytes", id="bytes"),
        pytest.param(None, "no calibration data given", id="none"),
        pytest.param([], "calibration data is empty", id="empty-list"),
    ],
)
def test_unsupported_sources(dyn_specs: list[InputSpec], source: Any, match: str) -> None:
    with _raises(match):
        load_feeds(source, dyn_specs)


def test_empty_generator(dyn_specs: list[InputSpec]) -> None:
    feeds = load_feeds(iter([]), dyn_specs, what="evaluation")
    with _raises("evaluation data is empty"):
        list(feeds)


# ---------------------------------------------------------------------------------------------------
# Random data


def test_random(dyn_specs: list[InputSpec], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="onnxq.data"):
        feeds = load_feeds("random", dyn_specs, random_samples=5, seed=3)
    assert "RANDOM calibration data" in caplog.text and "smoke tests only" in caplog.text
    assert feeds.is_random and feeds.num_samples == 5
    got = list(feeds)
    assert len(got) == 5
    assert got[0]["x"].shape == (1, 3, 4, 4) and got[0]["x"].dtype == np.float32
    assert got[0]["ids"].shape == (1, 16) and got[0]["ids"].dtype == np.int64
    assert set(np.unique(np.concatenate([f["ids"] for f in got]))) <= {0, 1}
    # Deterministic for a seed, re-iterable, and different for another seed.
    for a, b in zip(got, load_feeds("random", dyn_specs, random_samples=5, seed=3), strict=True):
        _assert_feed_equal(a, b)
    for a, b in zip(got, feeds, strict=True):
        _assert_feed_equal(a, b)
    other = next(iter(load_feeds("random", dyn_specs, random_samples=5, seed=4)))
    assert not np.array_equal(other["x"], got[0]["x"])


def test_random_dtypes_and_symbols() -> None:
    specs = [
        InputSpec("h", np.dtype(np.float16), (None, 5)),
        InputSpec("m", np.dtype(np.bool_), ("B", "T")),
        InputSpec("b", np.dtype(np.uint8), ("T", 2)),  # T is axis 0 here, so 1 everywhere
        InputSpec("fb", np.dtype(np.float32), (1, 2)),
    ]
    feed = next(iter(load_feeds("random", specs, random_samples=1)))
    assert feed["h"].shape == (1, 5) and feed["h"].dtype == np.float16
    assert feed["m"].shape == (1, 1) and feed["m"].dtype == np.bool_
    assert feed["b"].shape == (1, 2) and feed["b"].dtype == np.uint8
    assert feed["fb"].shape == (1, 2)


def test_random_errors() -> None:
    specs = [InputSpec("u", np.dtype(np.float32), None)]
    with _raises("'u' has an unknown rank.*pass real data"):
        load_feeds("random", specs)
    with _raises("'s' has type string.*pass real data"):
        load_feeds("random", [InputSpec("s", np.dtype(object), ("N",))])
    with _raises("at least 1, got 0"):
        load_feeds("random", [InputSpec("x", np.dtype(np.float32), ("N",))], random_samples=0)


# ---------------------------------------------------------------------------------------------------
# Batching and limits


def test_batching_npz_order_and_sizes(tmp_path: Path, dyn_specs: list[InputSpec]) -> None:
    x = np.arange(5 * 3 * 4 * 4, dtype=np.float32).reshape(5, 3, 4, 4)
    ids = np.arange(10, dtype=np.int64).reshape(5, 2)
    path = tmp_path / "calib.npz"
    np.savez(path, x=x, ids=ids)
    feeds = load_feeds(path, dyn_specs, batch_size=2)
    assert feeds.samples_per_batch == 2 and feeds.num_batches == 3 and len(feeds) == 3
    got = list(feeds)
    assert [f["x"].shape[0] for f in got] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in got]), x)
    np.testing.assert_array_equal(got[1]["ids"], ids[2:4])


def test_batching_larger_than_data(dyn_specs: list[InputSpec]) -> None:
    rng = np.random.default_rng(11)
    feeds = load_feeds([_dyn_sample(rng) for _ in range(3)], dyn_specs, batch_size=8)
    assert feeds.num_batches == 1
    (batch,) = list(feeds)
    assert batch["x"].shape == (3, 3, 4, 4)


def test_batching_random_matches_unbatched(dyn_specs: list[InputSpec]) -> None:
    single = list(load_feeds("random", dyn_specs, random_samples=10))
    batched = load_feeds("random", dyn_specs, random_samples=10, batch_size=4)
    got = list(batched)
    assert [f["x"].shape[0] for f in got] == [4, 4, 2]
    for name in ("x", "ids"):
        np.testing.assert_array_equal(
            np.concatenate([f[name] for f in got]), np.concatenate([f[name] for f in single])
        )


def test_batching_falls_back_for_fixed_batch(
    tmp_path: Path, fixed_specs: list[InputSpec], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "calib.npz"
    np.savez(path, fb=np.zeros((5, 1, 2), np.float32), s=np.zeros(5, np.float32))
    with caplog.at_level(logging.WARNING, logger="onnxq.data"):
        feeds = load_feeds(path, fixed_specs, batch_size=4)
    assert feeds.samples_per_batch == 1 and feeds.num_batches == 5
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "batch_size 4 ignored" in caplog.text and "'fb'" in caplog.text
    assert all(f["fb"].shape == (1, 2) for f in feeds)


def test_batching_falls_back_for_varying_list(
    dyn_specs: list[InputSpec], caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(12)
    samples = [_dyn_sample(rng, seq) for seq in (3, 3, 4)]
    with caplog.at_level(logging.WARNING, logger="onnxq.data"):
        feeds = load_feeds(samples, dyn_specs, batch_size=2)
    assert feeds.samples_per_batch == 1 and len(feeds) == 3
    assert "'ids' changes shape between samples ((1, 3) vs (1, 4))" in caplog.text


def test_batching_falls_back_lazily_for_generator(
    dyn_specs: list[InputSpec], caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(13)
    samples = [_dyn_sample(rng, seq) for seq in (3, 3, 3, 4, 4)]
    feeds = load_feeds(iter(samples), dyn_specs, batch_size=2)
    assert feeds.samples_per_batch == 2  # not known before iterating
    with caplog.at_level(logging.WARNING, logger="onnxq.data"):
        got = list(feeds)
    # The first batch was already complete; afterwards batch size 1, order preserved.
    assert [f["ids"].shape for f in got] == [(2, 3), (1, 3), (1, 4), (1, 4)]
    np.testing.assert_array_equal(got[0]["ids"], np.concatenate([samples[0]["ids"], samples[1]["ids"]]))
    np.testing.assert_array_equal(got[1]["ids"], samples[2]["ids"])
    assert feeds.samples_per_batch == 1
    assert caplog.text.count("using batch size 1") == 1


def test_batch_size_invalid(dyn_specs: list[InputSpec]) -> None:
    with _raises("batch size must be at least 1, got 0"):
        load_feeds("random", dyn_specs, batch_size=0)


def test_limit(tmp_path: Path, dyn_specs: list[InputSpec]) -> None:
    path = tmp_path / "calib.npz"
    x = np.arange(7 * 48, dtype=np.float32).reshape(7, 3, 4, 4)
    np.savez(path, x=x, ids=np.zeros((7, 2), np.int64))
    feeds = load_feeds(path, dyn_specs, batch_size=2)
    limited = feeds.limit(5)
    assert isinstance(limited, Feeds)
    assert limited.num_samples == 5 and limited.num_batches == 3 and limited.samples_per_batch == 2
    got = list(limited)
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in got]), x[:5])
    assert limited.limit(9).num_samples == 5
    assert feeds.limit(100).num_samples == 7
    assert feeds.num_samples == 7
    with _raises("at least 1, got 0"):
        feeds.limit(0)


def test_limit_random_and_unknown_length(dyn_specs: list[InputSpec]) -> None:
    assert len(list(load_feeds("random", dyn_specs, random_samples=8).limit(3))) == 3
    rng = np.random.default_rng(14)
    feeds = load_feeds(_Reiterable([_dyn_sample(rng) for _ in range(4)]), dyn_specs).limit(2)
    assert feeds.num_samples is None
    assert len(list(feeds)) == 2


# ---------------------------------------------------------------------------------------------------
# The feeds run in ONNX Runtime


@pytest.mark.parametrize("batch_size", [1, 3])
def test_feeds_run_in_onnxruntime(tmp_path: Path, dyn_specs: list[InputSpec], batch_size: int) -> None:
    rng = np.random.default_rng(15)
    path = tmp_path / "calib.npz"
    np.savez(
        path, x=rng.standard_normal((4, 3, 4, 4)), ids=rng.integers(0, 5, size=(4, 1, 6)).astype(np.int32)
    )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        _proto(DYNAMIC_TEXT).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    runs = 0
    for feed in load_feeds(path, dyn_specs, batch_size=batch_size):
        y, z = session.run(None, feed)
        np.testing.assert_array_equal(y, feed["x"])
        np.testing.assert_array_equal(z, feed["ids"])
        runs += 1
    assert runs == (4 if batch_size == 1 else 2)


# ---------------------------------------------------------------------------------------------------
# Values and types the data must not hold


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (np.nan, r"input 'x' holds NaN \(1 of 48 values\); pass finite data$"),
        (-np.inf, r"input 'x' holds inf \(1 of 48 values\); pass finite data \(for a mask"),
    ],
)
def test_non_finite_float_values_are_refused(dyn_specs: list[InputSpec], bad: float, match: str) -> None:
    rng = np.random.default_rng(0)
    samples = [_dyn_sample(rng) for _ in range(3)]
    samples[2]["x"][0, 1, 2, 3] = bad
    feeds = load_feeds(samples, dyn_specs)
    with _raises(r"calibration data item 2: " + match):
        list(feeds)


def test_integer_inputs_are_not_checked_for_finiteness(dyn_specs: list[InputSpec]) -> None:
    rng = np.random.default_rng(0)
    sample = _dyn_sample(rng)
    assert len(list(load_feeds([sample], dyn_specs))) == 1


def test_types_onnxruntime_cannot_take_from_numpy_are_refused_up_front() -> None:
    """float8/bfloat16/int4 inputs (ml_dtypes) cannot be fed from Python: say so before any data is read."""
    for dtype in (ir.DataType.BFLOAT16, ir.DataType.FLOAT8E5M2, ir.DataType.INT4):
        specs = [InputSpec("x", np.dtype(dtype.numpy()), ("N", 4))]
        name = np.dtype(dtype.numpy()).name
        with _raises(f"input 'x' has type {name}, which onnxruntime cannot take from numpy"):
            load_feeds("random", specs)


def test_quiet_random_data_logs_nothing(dyn_specs: list[InputSpec], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="onnxq.data"):
        load_feeds("random", dyn_specs, quiet=True)
    assert caplog.text == ""


def test_fingerprint_is_the_datas_and_not_the_batching(dyn_specs: list[InputSpec]) -> None:
    rng = np.random.default_rng(0)
    samples = [_dyn_sample(rng) for _ in range(4)]

    def fingerprint(feeds: Feeds) -> str:
        fp = data.FeedFingerprint()
        for feed in feeds:
            fp.update(feed)
        return fp.hexdigest()

    one = fingerprint(load_feeds(samples, dyn_specs))
    assert one == fingerprint(load_feeds(samples, dyn_specs, batch_size=2))
    assert one.startswith("sha256:") and len(one) == 7 + 64
    samples[3]["x"] = samples[3]["x"] + 1e-3
    assert fingerprint(load_feeds(samples, dyn_specs)) != one


def test_symbolic_dims_are_hints_not_constraints() -> None:
    """Paddle2ONNX names every unknown dim ``?``; ONNX Runtime runs such a model with different sizes."""
    specs = [InputSpec("x", np.dtype(np.float32), ("?", 3, "?", "?"))]
    feed = {"x": np.zeros((1, 3, 48, 192), np.float32)}
    assert [f["x"].shape for f in load_feeds([feed], specs)] == [(1, 3, 48, 192)]
    named = [InputSpec("a", np.dtype(np.float32), ("N", 4)), InputSpec("b", np.dtype(np.float32), ("N", 4))]
    pair = {"a": np.zeros((2, 4), np.float32), "b": np.zeros((3, 4), np.float32)}
    assert len(list(load_feeds([pair], named))) == 1


def test_a_model_with_many_inputs_gets_a_short_message(tmp_path: Path) -> None:
    """An ONNX Runtime-saved IR-3 model can declare hundreds of inputs: the error names a few and counts."""
    specs = [InputSpec(f"in{i}", np.dtype(np.float32), (1,)) for i in range(30)]
    path = tmp_path / "calib.npz"
    np.savez(path, in0=np.zeros((2, 1), np.float32))
    with pytest.raises(OnnxqError) as caught:
        list(load_feeds(path, specs))
    message = str(caught.value)
    assert "missing input 'in1', 'in2'" in message and "'in8' and 21 more" in message
    assert "(the model's inputs are 'in0'," in message and "'in7' and 22 more)" in message
    assert "in29" not in message
