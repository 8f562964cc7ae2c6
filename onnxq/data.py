"""Calibration and evaluation data: *feeds* for ONNX Runtime.

A feed is ``dict[str, np.ndarray]``, the inputs of one ONNX Runtime run. :func:`load_feeds` turns what
the user gave (an ``.npz`` file, a directory of ``.npz`` files, an iterable of mappings or the string
``"random"``) into a :class:`Feeds`: a re-iterable stream of feeds that have been checked against the
model's graph inputs (:func:`input_specs`) and optionally batched.

Terms used here:

* a *sample* is one unit of user data: one entry along the stacking axis of an ``.npz`` file, one row of
  an array split along its dynamic axis 0, one file of a directory, one item of an iterable, or one
  generated random feed;
* a *batch* is what one ONNX Runtime run gets: ``samples_per_batch`` consecutive samples concatenated
  along axis 0 (the last batch may hold fewer).

Memory stays bounded by one batch: ``.npz`` files are streamed sample by sample from the archive,
directories are read one file at a time, and one-shot iterators are cached only up to
:data:`ONE_SHOT_CACHE_LIMIT` samples. Every mistake in the data raises :class:`~onnxq.errors.OnnxqError`
with one line naming the file or item, the input, and what was expected.
"""

from __future__ import annotations

import logging
import math
import os
import zipfile
import zlib
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import numpy.lib.format as npy_format

from onnxq.errors import OnnxqError

if TYPE_CHECKING:
    import onnx_ir as ir

__all__ = [
    "ONE_SHOT_CACHE_LIMIT",
    "DataSource",
    "Feed",
    "FeedFingerprint",
    "FeedSource",
    "Feeds",
    "InputSpec",
    "input_specs",
    "load_feeds",
]

logger = logging.getLogger(__name__)

Feed: TypeAlias = "dict[str, np.ndarray]"
FeedSource: TypeAlias = "str | os.PathLike[str] | Iterable[Mapping[str, Any]]"
#: What the library accepts as calibration or evaluation data: a source for :func:`load_feeds`, or feeds.
DataSource: TypeAlias = "str | os.PathLike[str] | Iterable[Mapping[str, Any]] | Feeds"
Dim: TypeAlias = "int | str | None"

#: How many samples of a one-shot iterator (a generator) are kept so that it can be iterated again.
ONE_SHOT_CACHE_LIMIT = 256

# Sizes given to symbolic or unknown dimensions of random data.
_RANDOM_BATCH_DIM = 1
_RANDOM_OTHER_DIM = 16


def random_data_hint() -> str:
    """What to tell a user whose model fails on ``--calib random`` (the float model fails there too)."""
    return (
        f"the float model fails on random data itself (batch axes set to {_RANDOM_BATCH_DIM}, other "
        f"symbolic dimensions to {_RANDOM_OTHER_DIM}, integers to 0/1): pass real inputs with --calib DATA"
    )


# Errors that reading a damaged or foreign file can raise from zipfile / numpy.
_READ_ERRORS = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error, KeyError)


# ---------------------------------------------------------------------------------------------------
# Graph inputs


@dataclass(frozen=True)
class InputSpec:
    """One graph input: its name, numpy dtype and declared shape.

    ``shape`` holds an ``int`` for a fixed dimension, a ``str`` for a named symbolic dimension and
    ``None`` for an unknown one; ``shape`` itself is ``None`` when even the rank is unknown.
    """

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...] | None

    @property
    def batch_axis_dynamic(self) -> bool:
        """Whether the input has an axis 0 whose size may change between runs."""
        return self.shape is not None and len(self.shape) >= 1 and not isinstance(self.shape[0], int)

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    def describe(self) -> str:
        """``float32[N,3,224,224]``; ``?`` marks an unknown dimension, ``[?...]`` an unknown rank."""
        return f"{_dtype_name(self.dtype)}{_format_dims(self.shape)}"


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The graph inputs of ``model`` that a feed must provide (initializers excluded), in order.

    Negative fixed dimensions (which some exporters write for "unknown") are treated as unknown.
    """
    import onnx_ir as ir

    specs: list[InputSpec] = []
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        name = value.name or ""
        if value.dtype is None:
            raise OnnxqError(f"graph input {name!r} has no element type; the model cannot be fed")
        try:
            dtype = np.dtype(value.dtype.numpy())
        except TypeError as err:
            raise OnnxqError(
                f"graph input {name!r} has type {value.dtype.name}, which numpy cannot represent"
            ) from err
        shape: tuple[Dim, ...] | None = None
        if value.shape is not None:
            dims: list[Dim] = []
            for dim in value.shape:
                if isinstance(dim, ir.SymbolicDim):
                    dims.append(dim.value)
                else:
                    dims.append(int(dim) if int(dim) >= 0 else None)
            shape = tuple(dims)
        specs.append(InputSpec(name=name, dtype=dtype, shape=shape))
    return specs


# ---------------------------------------------------------------------------------------------------
# Formatting helpers


#: Names listed in one error message; a model with hundreds of inputs gets a count for the rest.
_NAMES_LISTED = 8


def _some_names(names: list[str]) -> str:
    """``'a', 'b', …`` for at most :data:`_NAMES_LISTED` names, then how many more there are."""
    shown = ", ".join(repr(n) for n in names[:_NAMES_LISTED])
    rest = len(names) - _NAMES_LISTED
    return f"{shown} and {rest} more" if rest > 0 else shown


def _dtype_name(dtype: np.dtype) -> str:
    if dtype.kind in "USO":
        return "string"
    return dtype.name


def _format_dims(shape: Sequence[Dim] | None) -> str:
    if shape is None:
        return "[?...]"
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def _format_shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _dtype_kind(dtype: np.dtype) -> str:
    """A coarse kind: casts are allowed between dtypes of the same kind only."""
    if dtype.kind == "b":
        return "bool"
    if dtype.kind in "iu":
        return "int"
    if dtype.kind == "f":
        return "float"
    if dtype.kind == "c":
        return "complex"
    if dtype.kind in "USO":
        return "string"
    # ml_dtypes (bfloat16, float8_*, int4, ...) report kind "V".
    if dtype.name.startswith(("bfloat", "float")):
        return "float"
    if dtype.name.startswith(("int", "uint")):
        return "int"
    return dtype.kind


# ---------------------------------------------------------------------------------------------------
# Checking feeds against the graph inputs


class _Checker:
    """Checks and converts feeds against the graph inputs; ``label`` starts every message."""

    def __init__(self, specs: Sequence[InputSpec], label: str) -> None:
        for spec in specs:
            if spec.dtype.isbuiltin != 1:  # ml_dtypes (bfloat16, float8, int4): ORT takes none from numpy
                raise OnnxqError(
                    f"input {spec.name!r} has type {_dtype_name(spec.dtype)}, which onnxruntime cannot take "
                    "from numpy: the model cannot be fed data from Python"
                )
        self.specs = list(specs)
        self.by_name = {s.name: s for s in self.specs}
        self.label = label

    def fail(self, where: str, message: str) -> OnnxqError:
        prefix = f"{self.label} {where}" if where else self.label
        return OnnxqError(f"{prefix}: {message}")

    def expected_names(self) -> str:
        return _some_names([s.name for s in self.specs]) or "none"

    def check_names(self, names: Iterable[str], where: str) -> None:
        present = list(names)
        for name in present:
            if name not in self.by_name:
                raise self.fail(
                    where, f"unknown input {name!r}; the model's inputs are {self.expected_names()}"
                )
        missing = [s.name for s in self.specs if s.name not in present]
        if missing:
            listed = _some_names(missing)
            raise self.fail(where, f"missing input {listed} (the model's inputs are {self.expected_names()})")

    def check_dtype(self, spec: InputSpec, dtype: np.dtype, where: str) -> None:
        """Fail unless ``dtype`` equals the input's dtype or is of the same kind."""
        if dtype == spec.dtype or _dtype_kind(dtype) == _dtype_kind(spec.dtype):
            return
        raise self.fail(
            where, f"input {spec.name!r} expects {_dtype_name(spec.dtype)}, got {_dtype_name(dtype)}"
        )

    def check_shape(self, spec: InputSpec, shape: Sequence[int], where: str) -> None:
        """Fail on a rank mismatch or a fixed dimension of another size."""
        if spec.shape is None:
            return
        if len(shape) != len(spec.shape):
            raise self.fail(
                where,
                f"input {spec.name!r} expects rank {len(spec.shape)} {spec.describe()}, "
                f"got rank {len(shape)} with shape {_format_shape(shape)}",
            )
        for axis, (want, got) in enumerate(zip(spec.shape, shape, strict=True)):
            if isinstance(want, int) and want != got:
                raise self.fail(
                    where,
                    f"input {spec.name!r} axis {axis} must be {want}, got {got} "
                    f"(shape {_format_shape(shape)}, expected {spec.describe()})",
                )

    def convert(self, spec: InputSpec, value: Any, where: str) -> np.ndarray:
        """``value`` as an array of the input's dtype and a shape that fits the input."""
        if isinstance(value, np.ndarray):
            array = value
        else:
            try:
                array = np.asarray(value)
            except (ValueError, TypeError) as err:
                raise self.fail(
                    where, f"input {spec.name!r} is not an array ({type(value).__name__})"
                ) from err
        self.check_shape(spec, array.shape, where)
        self.check_dtype(spec, array.dtype, where)
        if array.dtype == spec.dtype:
            return array
        kind = _dtype_kind(spec.dtype)
        if kind == "int" and array.size and not np.can_cast(array.dtype, spec.dtype, "safe"):
            self._check_int_range(spec, array, where)
        if kind == "string":
            return array.astype(object)
        return array.astype(spec.dtype)

    def _check_int_range(self, spec: InputSpec, array: np.ndarray, where: str) -> None:
        try:
            info = np.iinfo(spec.dtype)
        except ValueError:
            return
        low, high = array.min(), array.max()
        if low < info.min or high > info.max:
            raise self.fail(
                where,
                f"input {spec.name!r} expects {_dtype_name(spec.dtype)}, got {_dtype_name(array.dtype)} "
                f"values in [{low}, {high}] outside its range [{info.min}, {info.max}]",
            )

    def feed(self, raw: object, where: str) -> Feed:
        """A checked, converted feed from one user-supplied mapping."""
        if not isinstance(raw, Mapping):
            raise self.fail(where, f"expected a mapping of input name to array, got {type(raw).__name__}")
        names = list(raw.keys())
        for name in names:
            if not isinstance(name, str):
                raise self.fail(where, f"input names must be strings, got {name!r}")
        self.check_names(names, where)
        feed = {spec.name: self.convert(spec, raw[spec.name], where) for spec in self.specs}
        self.check_finite(feed, where)
        return feed

    def check_finite(self, feed: Mapping[str, np.ndarray], where: str) -> None:
        """Fail on NaN or ±inf in a float input: a range or an accuracy figure computed from it is void."""
        for name, array in feed.items():
            if array.dtype.kind != "f" or not array.size:
                continue
            finite = np.isfinite(array)
            if finite.all():
                continue
            bad = int(array.size - np.count_nonzero(finite))
            kinds = " and ".join(
                kind
                for kind, present in (
                    ("NaN", bool(np.isnan(array).any())),
                    ("inf", bool(np.isinf(array).any())),
                )
                if present
            )
            hint = " (for a mask, use a large finite value such as -1e9)" if "inf" in kinds else ""
            raise self.fail(
                where,
                f"input {name!r} holds {kinds} ({bad} of {array.size} values); pass finite data{hint}",
            )


# ---------------------------------------------------------------------------------------------------
# Reading .npy headers and rows out of .npz archives


@dataclass(frozen=True)
class _Member:
    """One array of an ``.npz`` archive, known from its header only."""

    key: str
    member: str
    shape: tuple[int, ...]
    dtype: np.dtype
    streamable: bool  # C order and a header version we can parse: rows can be read one at a time


def _read_header(stream: Any) -> tuple[tuple[int, ...], np.dtype, bool]:
    """(shape, dtype, streamable) of the ``.npy`` data at the start of ``stream``."""
    version = npy_format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = npy_format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran, dtype = npy_format.read_array_header_2_0(stream)
    else:
        return (), np.dtype(np.uint8), False
    return tuple(int(d) for d in shape), np.dtype(dtype), not fortran


def _npz_members(path: Path, label: str) -> dict[str, _Member]:
    """The arrays of the archive at ``path`` by key, from their headers; the data is not read."""
    members: dict[str, _Member] = {}
    try:
        if not zipfile.is_zipfile(path):
            raise OnnxqError(f"{label} {path} is not an .npz archive (expected one array per input)")
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                key = member.removesuffix(".npy")
                with archive.open(member) as stream:
                    shape, dtype, streamable = _read_header(stream)
                if not streamable:
                    # Fortran order or an unusual header version: numpy reads it whole when iterating.
                    with np.load(path, allow_pickle=False) as npz:
                        array = npz[key]
                    shape, dtype = array.shape, array.dtype
                if dtype.hasobject:
                    raise OnnxqError(
                        f"{label} {path}: array {key!r} holds Python objects; save plain numeric arrays"
                    )
                members[key] = _Member(key, member, shape, dtype, streamable)
    except OnnxqError:
        raise
    except _READ_ERRORS as err:
        raise OnnxqError(f"{label} {path} is not a readable .npz archive: {err}") from err
    return members


def _read_exact(stream: Any, out: np.ndarray) -> bool:
    """Fill ``out`` (C-contiguous) from ``stream``; False at a premature end of data."""
    view = out.reshape(-1).view(np.uint8).data
    filled = 0
    while filled < len(view):
        count = stream.readinto(view[filled:])
        if not count:
            return False
        filled += count
    return True


def _iter_rows(archive: zipfile.ZipFile, path: Path, member: _Member, label: str) -> Iterator[np.ndarray]:
    """The entries of ``member`` along axis 0, read one at a time."""
    if not member.streamable:
        with np.load(path, allow_pickle=False) as npz:
            array = npz[member.key]
        yield from array
        return
    with archive.open(member.member) as stream:
        _read_header(stream)
        for _ in range(member.shape[0]):
            row = np.empty(member.shape[1:], dtype=member.dtype)
            if not _read_exact(stream, row):
                raise OnnxqError(f"{label} {path}: array {member.key!r} is truncated")
            yield row


# ---------------------------------------------------------------------------------------------------
# Sources of samples


class _Source:
    """Where samples come from. ``samples()`` yields checked feeds, one per sample, in order."""

    num_samples: int | None = None

    def samples(self) -> Iterator[Feed]:
        raise NotImplementedError

    def sample_shapes(self) -> Iterable[Mapping[str, tuple[int, ...]]] | None:
        """Every sample's shapes, cheaply, when they can vary and be known up front; else None."""
        return None

    def uniform(self) -> bool | None:
        """True if all samples are known to have the same shapes; None if unknown without reading."""
        return None


class _NpzFileSource(_Source):
    """One ``.npz`` archive holding every sample: stacked on a new axis 0, or split along axis 0."""

    def __init__(self, path: Path, checker: _Checker) -> None:
        self.path = path
        self.checker = checker
        label = checker.label
        members = _npz_members(path, label)
        if not members:
            raise OnnxqError(f"{label} {path} holds no arrays")
        checker.check_names(members, str(path))
        self.members: list[tuple[InputSpec, _Member, bool]] = []  # (spec, member, stacked)
        counts: list[tuple[str, int]] = []
        for spec in checker.specs:
            member = members[spec.name]
            stacked = self._layout(spec, member)
            sample_shape = member.shape[1:] if stacked else (1, *member.shape[1:])
            checker.check_shape(spec, sample_shape, str(path))
            checker.check_dtype(spec, member.dtype, str(path))
            self.members.append((spec, member, stacked))
            counts.append((spec.name, member.shape[0]))
        first_name, first_count = counts[0] if counts else ("", 0)
        for name, count in counts[1:]:
            if count != first_count:
                raise OnnxqError(
                    f"{label} {path}: input {first_name!r} has {first_count} samples "
                    f"but input {name!r} has {count}"
                )
        if counts and first_count == 0:
            raise OnnxqError(f"{label} {path} holds no samples (axis 0 of every array is empty)")
        self.num_samples = first_count

    def _layout(self, spec: InputSpec, member: _Member) -> bool:
        """True when samples are stacked on a new axis 0, False when axis 0 is split into batch 1."""
        ndim = len(member.shape)
        shape_text = _format_shape(member.shape)
        where = f"{self.checker.label} {self.path}"
        if spec.shape is None:
            if ndim == 0:
                raise OnnxqError(
                    f"{where}: input {spec.name!r} has an unknown rank; stack its samples on a new "
                    f"axis 0, got a scalar"
                )
            return True
        rank = len(spec.shape)
        if ndim == rank + 1:
            return True
        if ndim == rank and spec.batch_axis_dynamic:
            return False
        if ndim == rank:
            reason = "is a scalar" if rank == 0 else f"has axis 0 fixed at {spec.shape[0]}"
            raise OnnxqError(
                f"{where}: input {spec.name!r} {spec.describe()} {reason}, so its samples must be "
                f"stacked on a new leading axis (rank {rank + 1}); got shape {shape_text}"
            )
        split = f" or rank {rank} split along its dynamic axis 0" if spec.batch_axis_dynamic else ""
        raise OnnxqError(
            f"{where}: input {spec.name!r} expects {spec.describe()}: an array of rank {rank + 1} "
            f"(samples stacked on a new leading axis){split}; got shape {shape_text}"
        )

    def uniform(self) -> bool | None:
        return True

    def samples(self) -> Iterator[Feed]:
        label = self.checker.label
        try:
            with zipfile.ZipFile(self.path) as archive:
                readers = [_iter_rows(archive, self.path, m, label) for _, m, _ in self.members]
                for index, rows in enumerate(zip(*readers, strict=True)):
                    raw = {
                        spec.name: row if stacked else row[np.newaxis]
                        for (spec, _, stacked), row in zip(self.members, rows, strict=True)
                    }
                    yield self.checker.feed(raw, f"{self.path} (sample {index})")
        except OnnxqError:
            raise
        except _READ_ERRORS as err:
            raise OnnxqError(f"{label} {self.path} could not be read: {err}") from err


class _NpzDirSource(_Source):
    """A directory of ``.npz`` files, one sample each, read one file at a time in file-name order."""

    def __init__(self, path: Path, checker: _Checker) -> None:
        self.path = path
        self.checker = checker
        self.files = sorted(
            (p for p in path.iterdir() if p.suffix == ".npz" and p.is_file()), key=lambda p: p.name
        )
        if not self.files:
            raise OnnxqError(f"{checker.label} directory {path} holds no .npz files")
        self.num_samples = len(self.files)

    def _load(self, file: Path) -> dict[str, np.ndarray]:
        label = self.checker.label
        if not zipfile.is_zipfile(file):
            raise OnnxqError(f"{label} {file} is not an .npz archive")
        try:
            with np.load(file, allow_pickle=False) as npz:
                return {key: npz[key] for key in npz.files}
        except _READ_ERRORS as err:
            raise OnnxqError(f"{label} {file} is not a readable .npz archive: {err}") from err

    def samples(self) -> Iterator[Feed]:
        for file in self.files:
            yield self.checker.feed(self._load(file), str(file))

    def sample_shapes(self) -> Iterable[Mapping[str, tuple[int, ...]]] | None:
        return ({k: m.shape for k, m in _npz_members(f, self.checker.label).items()} for f in self.files)


class _IterableSource(_Source):
    """A re-iterable (list, tuple, or any object whose ``__iter__`` starts afresh) of mappings."""

    def __init__(self, items: Iterable[Any], checker: _Checker) -> None:
        self.items = items
        self.checker = checker
        try:
            self.num_samples = len(items)  # type: ignore[arg-type]
        except TypeError:
            self.num_samples = None
        if self.num_samples == 0:
            raise OnnxqError(f"{checker.label} is empty")

    def samples(self) -> Iterator[Feed]:
        count = 0
        for index, raw in enumerate(self.items):
            count += 1
            yield self.checker.feed(raw, f"item {index}")
        if count == 0:
            raise OnnxqError(f"{self.checker.label} is empty")

    def sample_shapes(self) -> Iterable[Mapping[str, tuple[int, ...]]] | None:
        if not isinstance(self.items, (list, tuple)):
            return None  # iterating an arbitrary re-iterable may be as costly as reading it
        shapes = []
        for index, raw in enumerate(self.items):
            if not isinstance(raw, Mapping):
                raise self.checker.fail(
                    f"item {index}", f"expected a mapping of input name to array, got {type(raw).__name__}"
                )
            shapes.append({str(k): tuple(np.shape(v)) for k, v in raw.items()})
        return shapes


class _OneShotSource(_Source):
    """A one-shot iterator (a generator), cached up to ``limit`` samples so it can be replayed.

    Iterations share the underlying iterator: one that is behind replays the cache, the one in front
    pulls new samples. Once more than ``limit`` samples were pulled the cache is dropped, and any
    iteration that needs a dropped sample fails.
    """

    def __init__(self, iterator: Iterator[Any], checker: _Checker, limit: int) -> None:
        self.iterator = iterator
        self.checker = checker
        self.limit = limit
        self.cache: list[Feed] = []
        self.pulled = 0
        self.exhausted = False
        self.dropped = False

    def samples(self) -> Iterator[Feed]:
        index = 0
        while True:
            if not self.dropped and index < len(self.cache):
                feed = self.cache[index]
            elif index == self.pulled:
                if self.exhausted:
                    break
                try:
                    raw = next(self.iterator)
                except StopIteration:
                    self.exhausted = True
                    break
                feed = self.checker.feed(raw, f"item {index}")
                self.pulled += 1
                if not self.dropped:
                    if self.pulled <= self.limit:
                        self.cache.append(feed)
                    else:
                        self.dropped = True
                        self.cache = []
            else:
                raise OnnxqError(
                    f"{self.checker.label} is a one-shot iterator with more than {self.limit} samples "
                    f"and was iterated twice; pass a list or a re-iterable object instead"
                )
            yield feed
            index += 1
        if index == 0:
            raise OnnxqError(f"{self.checker.label} is empty")


class _RandomSource(_Source):
    """``count`` random feeds from the declared shapes and dtypes; the same feeds on every iteration."""

    def __init__(self, checker: _Checker, count: int, seed: int) -> None:
        self.checker = checker
        self.num_samples = count
        self.seed = seed
        batch_symbols = {
            spec.shape[0] for spec in checker.specs if spec.shape and isinstance(spec.shape[0], str)
        }
        self.shapes: dict[str, tuple[int, ...]] = {}
        for spec in checker.specs:
            if spec.shape is None:
                raise OnnxqError(
                    f"input {spec.name!r} has an unknown rank, so random {checker.label} cannot be "
                    f"generated for it; pass real data (an .npz file or directory)"
                )
            if _dtype_kind(spec.dtype) not in ("float", "int", "bool", "complex"):
                raise OnnxqError(
                    f"input {spec.name!r} has type {_dtype_name(spec.dtype)}, for which random "
                    f"{checker.label} cannot be generated; pass real data"
                )
            dims: list[int] = []
            for axis, dim in enumerate(spec.shape):
                if isinstance(dim, int):
                    dims.append(dim)
                elif (dim is None and axis == 0) or (dim is not None and dim in batch_symbols):
                    dims.append(_RANDOM_BATCH_DIM)
                else:
                    dims.append(_RANDOM_OTHER_DIM)
            self.shapes[spec.name] = tuple(dims)

    def uniform(self) -> bool | None:
        return True

    def samples(self) -> Iterator[Feed]:
        rng = np.random.default_rng(self.seed)
        for _ in range(self.num_samples or 0):
            feed: Feed = {}
            for spec in self.checker.specs:
                shape = self.shapes[spec.name]
                kind = _dtype_kind(spec.dtype)
                if kind in ("float", "complex"):
                    feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
                elif kind == "bool":
                    feed[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
                else:
                    feed[spec.name] = rng.integers(0, 2, size=shape).astype(spec.dtype)
            yield feed


# ---------------------------------------------------------------------------------------------------
# Feeds


class Feeds:
    """A re-iterable source of checked feeds, ``samples_per_batch`` samples per feed.

    ``len()`` is the number of ONNX Runtime runs (batches) when it is known and raises ``TypeError``
    otherwise; :attr:`num_batches` returns ``None`` instead. Build one with :func:`load_feeds`.
    """

    def __init__(
        self,
        source: _Source,
        checker: _Checker,
        *,
        samples_per_batch: int,
        is_random: bool,
        max_samples: int | None = None,
        requested_batch_size: int | None = None,
    ) -> None:
        self._source = source
        self._checker = checker
        self._samples_per_batch = samples_per_batch
        self._requested = requested_batch_size if requested_batch_size is not None else samples_per_batch
        self._is_random = is_random
        self._max_samples = max_samples
        self._warned = False

    @property
    def specs(self) -> list[InputSpec]:
        return list(self._checker.specs)

    @property
    def num_samples(self) -> int | None:
        """How many samples one iteration yields, when known before iterating."""
        total = self._source.num_samples
        if total is None:
            return None
        return total if self._max_samples is None else min(total, self._max_samples)

    @property
    def num_batches(self) -> int | None:
        """How many feeds (ONNX Runtime runs) one iteration yields, when known before iterating."""
        samples = self.num_samples
        return None if samples is None else math.ceil(samples / self._samples_per_batch)

    @property
    def samples_per_batch(self) -> int:
        """The batch size in use; the last batch may hold fewer samples."""
        return self._samples_per_batch

    @property
    def is_random(self) -> bool:
        """Whether the feeds are generated random data (good for smoke tests only)."""
        return self._is_random

    def limit(self, max_samples: int) -> Feeds:
        """The same feeds, restricted to the first ``max_samples`` samples."""
        if max_samples < 1:
            label = self._checker.label
            raise OnnxqError(f"the number of {label} samples must be at least 1, got {max_samples}")
        current = self._max_samples
        return Feeds(
            self._source,
            self._checker,
            samples_per_batch=self._samples_per_batch,
            is_random=self._is_random,
            max_samples=max_samples if current is None else min(current, max_samples),
            requested_batch_size=self._requested,
        )

    def __len__(self) -> int:
        batches = self.num_batches
        if batches is None:
            raise TypeError("the number of batches is not known before iterating")
        return batches

    def __bool__(self) -> bool:
        return True

    def __repr__(self) -> str:
        return (
            f"Feeds(num_samples={self.num_samples}, samples_per_batch={self._samples_per_batch}, "
            f"is_random={self._is_random})"
        )

    def __iter__(self) -> Iterator[Feed]:
        samples = self._source.samples()
        try:
            limited: Iterator[Feed] = (
                samples if self._max_samples is None else islice(samples, self._max_samples)
            )
            if self._samples_per_batch == 1:
                yield from limited
            else:
                yield from self._batches(limited)
        finally:
            if isinstance(samples, Generator):
                samples.close()

    def _batches(self, samples: Iterator[Feed]) -> Iterator[Feed]:
        pending: list[Feed] = []
        for sample in samples:
            if self._samples_per_batch == 1:
                yield sample
                continue
            if pending and not _same_trailing_dims(pending[0], sample):
                # Only sources whose shapes cannot be checked up front (generators) get here.
                self._fall_back(_varying_input(pending[0], sample))
                yield from pending
                pending = []
                yield sample
                continue
            pending.append(sample)
            if len(pending) == self._samples_per_batch:
                yield _concat(pending)
                pending = []
        if pending:
            yield _concat(pending)

    def _fall_back(self, input_name: str) -> None:
        if not self._warned:
            logger.warning(
                "batch_size %d needs every sample to have the same shape apart from axis 0, but input %r "
                "changes shape between samples of %s; using batch size 1",
                self._requested,
                input_name,
                self._checker.label,
            )
            self._warned = True
        self._samples_per_batch = 1


def _same_trailing_dims(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    return all(a[name].shape[1:] == b[name].shape[1:] for name in a)


def _varying_input(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> str:
    return next(name for name in a if a[name].shape[1:] != b[name].shape[1:])


def _concat(samples: Sequence[Feed]) -> Feed:
    if len(samples) == 1:
        return samples[0]
    return {name: np.concatenate([s[name] for s in samples], axis=0) for name in samples[0]}


class FeedFingerprint:
    """A fingerprint of the data fed to a model: ``sha256:<hex>`` over every input's bytes, in order.

    Each input is hashed as one stream of its values, so the fingerprint does not depend on how the
    samples were batched (a batch's bytes are its samples' bytes, concatenated along axis 0).
    """

    def __init__(self) -> None:
        self._hashes: dict[str, Any] = {}
        self._dtypes: dict[str, str] = {}

    def update(self, feed: Mapping[str, np.ndarray]) -> None:
        import hashlib

        for name, array in feed.items():
            data = np.ascontiguousarray(array)
            self._dtypes.setdefault(name, data.dtype.str)
            hasher = self._hashes.setdefault(name, hashlib.sha256())
            if data.dtype.hasobject:
                hasher.update(repr(data.tolist()).encode())
            else:
                hasher.update(data.reshape(-1).view(np.uint8).data)

    def hexdigest(self) -> str:
        import hashlib

        total = hashlib.sha256()
        for name in sorted(self._hashes):
            total.update(f"{name}:{self._dtypes[name]}:{self._hashes[name].hexdigest()};".encode())
        return "sha256:" + total.hexdigest()


# ---------------------------------------------------------------------------------------------------
# load_feeds


def load_feeds(
    source: FeedSource,
    specs: Sequence[InputSpec],
    *,
    batch_size: int = 1,
    random_samples: int = 16,
    seed: int = 0,
    what: str = "calibration",
    quiet: bool = False,
) -> Feeds:
    """Feeds for the graph inputs ``specs`` from ``source``.

    ``source`` is one of:

    * a path to an ``.npz`` archive with one array per input: either the samples stacked on a new
      leading axis (``array[i]`` is sample ``i``; works for every input), or, for an input whose axis
      0 is dynamic, an array of the input's own rank split along axis 0 into samples of batch 1;
    * a path to a directory of ``.npz`` files, one sample each with arrays of the inputs' own ranks
      (so shapes may vary between samples); files are read in file-name order, one at a time;
    * an iterable of mappings from input name to array, one sample each; a one-shot iterator is
      cached up to :data:`ONE_SHOT_CACHE_LIMIT` samples so that it can be iterated again;
    * the string ``"random"``: ``random_samples`` feeds drawn with ``numpy.random.default_rng(seed)``
      (symbolic dimensions get 1 on axis 0 and 16 elsewhere). For smoke tests only.

    Arrays are cast within their kind (float64 to float32, int32 to int64); anything else that does
    not fit an input raises :class:`OnnxqError`. With ``batch_size > 1`` consecutive samples are
    concatenated along axis 0, which needs every input to have a dynamic axis 0 and samples of equal
    shape otherwise; if not, a warning is logged and batch size 1 is used. ``what`` names the data in
    messages (``"calibration"``, ``"evaluation"``; a trailing ``" data"`` is not repeated). ``quiet``
    drops the warning about random data (for internal smoke runs, whose figures nobody reads).
    """
    label = what if what.endswith(" data") else f"{what} data"  # "evaluation data" is accepted too
    if batch_size < 1:
        raise OnnxqError(f"batch size must be at least 1, got {batch_size}")
    checker = _Checker(specs, label)
    is_random = False

    src: _Source
    if isinstance(source, str) and source == "random":
        if random_samples < 1:
            raise OnnxqError(f"the number of random samples must be at least 1, got {random_samples}")
        src = _RandomSource(checker, random_samples, seed)
        is_random = True
        if not quiet:
            logger.warning(
                "using RANDOM %s: for smoke tests only. Activation ranges and accuracy figures computed "
                "from it are meaningless; pass real data (--calib/--eval DATA) for a usable result",
                label,
            )
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise OnnxqError(f"{label} not found: {path}")
        src = _NpzDirSource(path, checker) if path.is_dir() else _NpzFileSource(path, checker)
    elif source is None:
        raise OnnxqError(f"no {label} given")
    elif isinstance(source, (bytes, bytearray, np.ndarray)):
        raise OnnxqError(
            f"{label} must be a path, 'random' or an iterable of feeds (mappings of input name to "
            f"array), got {type(source).__name__}"
        )
    elif isinstance(source, Mapping):
        raise OnnxqError(
            f"{label} is a single mapping; pass an iterable of feeds instead, e.g. a list [feed]"
        )
    elif isinstance(source, Iterable):
        if isinstance(source, Iterator):
            src = _OneShotSource(source, checker, ONE_SHOT_CACHE_LIMIT)
        else:
            src = _IterableSource(source, checker)
    else:
        raise OnnxqError(
            f"{label} must be a path, 'random' or an iterable of feeds (mappings of input name to "
            f"array), got {type(source).__name__}"
        )

    used = batch_size
    if batch_size > 1:
        used = _decide_batch_size(src, checker, batch_size)
    return Feeds(src, checker, samples_per_batch=used, is_random=is_random, requested_batch_size=batch_size)


def _decide_batch_size(source: _Source, checker: _Checker, batch_size: int) -> int:
    """``batch_size`` if samples can be concatenated along axis 0 (as far as known up front), else 1."""
    fixed = [s for s in checker.specs if not s.batch_axis_dynamic]
    if fixed:
        spec = fixed[0]
        if spec.shape is None:
            reason = "has an unknown rank"
        elif not spec.shape:
            reason = "is a scalar"
        else:
            reason = f"has a fixed axis 0 of size {spec.shape[0]}"
        logger.warning(
            "batch_size %d ignored for %s: input %r %s %s, so samples cannot be concatenated along "
            "axis 0; using batch size 1",
            batch_size,
            checker.label,
            spec.name,
            spec.describe(),
            reason,
        )
        return 1
    if source.uniform():
        return batch_size
    shapes = source.sample_shapes()
    if shapes is None:
        return batch_size  # checked batch by batch while iterating
    first: Mapping[str, tuple[int, ...]] | None = None
    for sample in shapes:
        if first is None:
            first = sample
            continue
        for name, shape in sample.items():
            if name in first and first[name][1:] != shape[1:]:
                logger.warning(
                    "batch_size %d ignored for %s: input %r changes shape between samples (%s vs %s); "
                    "using batch size 1",
                    batch_size,
                    checker.label,
                    name,
                    _format_shape(first[name]),
                    _format_shape(shape),
                )
                return 1
    return batch_size
