"""Reliability sweep: run ``onnxq optimize`` on every ONNX backend node test model and classify the outcome.

Why: the ONNX backend node tests are a few thousand one-node models covering every op of every opset,
including the awkward parts (opsets newer than onnxruntime supports, strings, sequences, optional
values, bfloat16/float8/int4, training and ``ai.onnx.preview`` ops). None of them is a realistic model
to quantize; the point is that onnxq must treat each one *cleanly*: quantize it, say there is nothing
to quantize, or refuse with one line on stderr -- never a traceback, a hang, or an output that
onnxruntime then refuses.

What: the installed ``onnx`` wheel ships the case *generators*, not the node models, so the models and
their inputs are regenerated with ``onnx.backend.test.case.node.collect_testcases(None)``. Every case is
written to a temporary folder as ``model.onnx`` plus ``calib.npz`` (one array per graph input that is
not an initializer, the case's inputs stacked on a new leading axis: one sample), and the CLI runs in a
subprocess with a per-run timeout, once per mode:

- ``static``:    ``python -m onnxq optimize model.onnx -o out.onnx --calib calib.npz --runs 2``
- ``qoperator``: the same plus ``--format qoperator``
- ``dynamic``:   ``python -m onnxq optimize model.onnx -o out.onnx --mode dynamic --eval calib.npz --runs 2``

When the inputs cannot be stored in an ``.npz`` readable without pickle (sequences, optional/None
values, bfloat16/float8/int4 arrays, models without graph inputs), static and qoperator use
``--calib random`` and dynamic runs without ``--eval``; the record says so (``calib: random``).

Each (case, mode) run lands in exactly one class:

- ``quantized``: exit 0 and ``out.onnx`` written, *and* the output loads and runs in onnxruntime at
  ``ORT_ENABLE_ALL`` on the case's own inputs (checked in a separate subprocess, so that an
  onnxruntime crash cannot take the sweep down);
- ``unusable output``: exit 0 but the output is missing, refused by onnxruntime or fails on the
  case's inputs (first line of the error recorded). When the run used ``--calib random`` and the
  *input* model fails on the same feeds too, the feeds are to blame, not the output: the run stays
  ``quantized`` and the record's ``check`` says the check was inconclusive;
- ``nothing to quantize``: exit 2 and the last stderr line says "nothing to quantize";
- ``clean error``: any other exit 2 with exactly one stderr line starting with ``onnxq: error:``
  (user-facing refusals, listed grouped by message prefix);
- ``traceback``: exit 1 (``onnxq: internal error: ...``), a "Traceback" on stderr, or a crash
  (killed by a signal, or an exit status onnxq never uses);
- ``timeout``: the run (or the onnxruntime check of its output) exceeded ``--timeout`` seconds;
- ``other exit``: anything else (exit 2 without a single ``onnxq: error:`` line, e.g. an argparse
  usage error; exit 3), and ``sweep error``: this tool failed to prepare or run the case. Both should
  stay at zero; they exist so that no case is ever dropped silently.

Two flags are counted next to the classes: ``noisy stderr`` (more than one stderr line, or
onnxruntime's own log lines such as ``[E:onnxruntime:``/``[W:onnxruntime:``) and ``output left behind
on failure`` (exit status not 0 but ``out.onnx`` exists).

How to run (from the repository root, with onnxq installed, e.g. ``pip install -e .``)::

    python tools/sweep_onnx_backend.py                                  # everything, ~33 min on 2 cores
    python tools/sweep_onnx_backend.py --filter _conv --modes static    # a subset
    python tools/sweep_onnx_backend.py --limit 50 --jobs 2 --timeout 60 --json sweep.json \\
        --keep-failures /tmp/sweep-failures                             # keep inputs of failing runs

The output is a table of counts (rows: class and flags, columns: modes), then the failures grouped by
message with example case names. ``--json PATH`` writes every per-run record. The exit status is 0
when there are no tracebacks, unusable outputs, timeouts, other exits or sweep errors, else 1.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import io
import json
import os
import pickle
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np

MODES = ("static", "qoperator", "dynamic")
QUANTIZED = "quantized"
NOTHING = "nothing to quantize"
CLEAN_ERROR = "clean error"
TRACEBACK = "traceback"
TIMEOUT = "timeout"
UNUSABLE = "unusable output"
OTHER_EXIT = "other exit"
SWEEP_ERROR = "sweep error"
CLASSES = (QUANTIZED, NOTHING, CLEAN_ERROR, TRACEBACK, TIMEOUT, UNUSABLE, OTHER_EXIT, SWEEP_ERROR)
#: Classes that make the sweep fail (exit status 1).
FAILING = (TRACEBACK, TIMEOUT, UNUSABLE, OTHER_EXIT, SWEEP_ERROR)
NOISY = "noisy stderr"
LEFT_BEHIND = "output left behind on failure"
RANDOM_CALIB = "calib random (inputs not storable in .npz)"
FLAGS = (NOISY, LEFT_BEHIND, RANDOM_CALIB)

ORT_LOG_LINE = re.compile(r"\[[VIWEF]:onnxruntime:")
STDERR_KEEP = 4000  # characters of stderr kept per record (head and tail)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every run of one sweep shares."""

    modes: tuple[str, ...]
    timeout: float
    runs: int
    workdir: str | None
    keep_failures: str | None


@dataclasses.dataclass(frozen=True)
class Task:
    """One backend test case, in a form that pickles into a pool worker."""

    name: str
    model_bytes: bytes
    input_names: tuple[str, ...]
    inputs: tuple[Any, ...]
    note: str  # problems found while preparing the case ("" if none)


# --------------------------------------------------------------------------------------------------
# collecting cases


def collect_cases(name_filter: str | None, limit: int | None) -> list[Task]:
    """Regenerate the backend node test cases from the installed onnx wheel, sorted by name."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings(), np.errstate(all="ignore"), contextlib.redirect_stdout(io.StringIO()):
        # The generators compute expected outputs with numpy (overflowing casts, log(0), ...).
        warnings.simplefilter("ignore")
        cases = collect_testcases(None)
    cases = sorted(cases, key=lambda c: c.name)
    if name_filter:
        wanted = [part for part in name_filter.split(",") if part]
        cases = [c for c in cases if any(part in c.name for part in wanted)]
    if limit is not None:
        cases = cases[:limit]
    return [make_task(case) for case in cases]


def make_task(case: Any) -> Task:
    """Turn one ``onnx`` test case into a :class:`Task` (never raises: problems go into ``note``)."""
    notes: list[str] = []
    try:
        model_bytes = case.model.SerializeToString()
    except Exception as exc:  # e.g. a model over 2 GB: counted as a sweep error later
        return Task(case.name, b"", (), (), f"cannot serialize the model: {first_line(exc)}")
    graph = case.model.graph
    initializers = {init.name for init in graph.initializer}
    names = tuple(i.name for i in graph.input if i.name not in initializers)
    inputs: tuple[Any, ...] = ()
    if case.data_sets:
        if len(case.data_sets) > 1:
            notes.append(f"{len(case.data_sets)} data sets, the first one used")
        inputs = tuple(to_feed_value(v) for v in case.data_sets[0][0])
    else:
        notes.append("no data sets")
    if len(inputs) != len(names):
        notes.append(f"{len(inputs)} input values for {len(names)} graph inputs")
    return Task(case.name, model_bytes, names, inputs, "; ".join(notes))


def to_feed_value(value: Any) -> Any:
    """A test case input as onnxruntime takes it: TensorProto and numpy scalars become arrays."""
    import onnx
    from onnx import numpy_helper

    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, np.generic):
        return np.asarray(value)
    return value


def npz_arrays(names: Sequence[str], inputs: Sequence[Any]) -> tuple[dict[str, np.ndarray] | None, str]:
    """The calibration arrays (one sample each), or ``None`` and why the inputs cannot go in an .npz."""
    if not names:
        return None, "model has no graph inputs"
    if len(inputs) < len(names):
        return None, f"no value for graph input(s) {', '.join(repr(n) for n in names[len(inputs) :])}"
    arrays: dict[str, np.ndarray] = {}
    for name, value in zip(names, inputs, strict=False):
        if not isinstance(value, np.ndarray):
            return None, f"input {name!r} is a {type(value).__name__}, not an array"
        if value.dtype == object:
            if all(isinstance(v, str) for v in value.flat):
                value = value.astype(str)
            else:
                return None, f"input {name!r} is an object array that is not all str"
        arrays[name] = value[None]
    buffer = io.BytesIO()
    try:
        np.savez(buffer, **arrays)
        buffer.seek(0)
        with np.load(buffer, allow_pickle=False) as loaded:
            for name, array in arrays.items():
                back = loaded[name]
                if back.dtype != array.dtype or back.shape != array.shape:
                    return None, f"input {name!r} ({array.dtype}) does not survive .npz ({back.dtype})"
    except Exception as exc:
        return None, f"cannot store the inputs in .npz: {first_line(exc)}"
    return arrays, ""


# --------------------------------------------------------------------------------------------------
# running one case (in a pool worker)


def command_for(mode: str, calib: str | None, runs: int = 2) -> list[str]:
    """The ``onnxq optimize`` arguments for one mode (paths relative to the case folder)."""
    args = ["optimize", "model.onnx", "-o", "out.onnx"]
    if mode == "dynamic":
        args += ["--mode", "dynamic"]
        if calib is not None:
            args += ["--eval", calib]
    else:
        args += ["--calib", calib if calib is not None else "random"]
        if mode == "qoperator":
            args += ["--format", "qoperator"]
    return [*args, "--runs", str(runs)]


def run_subprocess(argv: list[str], cwd: Path, timeout: float) -> tuple[int | None, str, str, float]:
    """Run ``argv`` in its own process group; ``None`` as exit status on timeout (group killed)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        rc = None
    seconds = time.perf_counter() - start
    return rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), seconds


def run_task(task: Task, settings: Settings) -> list[dict[str, Any]]:
    """Run every mode on one case; never raises (tool-side problems become ``sweep error`` records)."""
    try:
        return _run_task(task, settings)
    except Exception as exc:
        return [
            sweep_error(task, mode, f"{type(exc).__name__}: {first_line(exc)}") for mode in settings.modes
        ]


def sweep_error(task: Task, mode: str, message: str) -> dict[str, Any]:
    return {
        "case": task.name,
        "mode": mode,
        "class": SWEEP_ERROR,
        "message": message,
        "flags": [],
        "exit": None,
        "seconds": 0.0,
        "calib": None,
        "note": task.note,
    }


def _run_task(task: Task, settings: Settings) -> list[dict[str, Any]]:
    if not task.model_bytes:
        return [sweep_error(task, mode, task.note) for mode in settings.modes]
    records = []
    with tempfile.TemporaryDirectory(prefix="onnxq-sweep-", dir=settings.workdir) as tmp:
        folder = Path(tmp)
        (folder / "model.onnx").write_bytes(task.model_bytes)
        arrays, why_not = npz_arrays(task.input_names, task.inputs)
        calib: str | None = None
        if arrays is not None:
            np.savez(folder / "calib.npz", **arrays)
            calib = "calib.npz"
        feeds = dict(zip(task.input_names, task.inputs, strict=False))
        with (folder / "feeds.pkl").open("wb") as f:
            pickle.dump(feeds, f)
        keep = False
        for mode in settings.modes:
            record = run_mode(task, mode, folder, calib, why_not, settings)
            records.append(record)
            if record["class"] in FAILING or LEFT_BEHIND in record["flags"]:
                keep = True
                if settings.keep_failures and (folder / "out.onnx").exists():
                    dest = Path(settings.keep_failures) / task.name
                    dest.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(folder / "out.onnx", dest / f"out.{mode}.onnx")
            with contextlib.suppress(FileNotFoundError):
                (folder / "out.onnx").unlink()
        if keep and settings.keep_failures:
            dest = Path(settings.keep_failures) / task.name
            dest.mkdir(parents=True, exist_ok=True)
            for name in ("model.onnx", "calib.npz", "feeds.pkl"):
                if (folder / name).exists():
                    shutil.copy2(folder / name, dest / name)
    return records


def run_mode(
    task: Task, mode: str, folder: Path, calib: str | None, why_not: str, settings: Settings
) -> dict[str, Any]:
    """Run one mode on a prepared case folder and classify it."""
    args = command_for(mode, calib, settings.runs)
    rc, _stdout, stderr, seconds = run_subprocess(
        [sys.executable, "-m", "onnxq", *args], folder, settings.timeout
    )
    out_exists = (folder / "out.onnx").exists()
    klass, message = classify(rc, stderr, out_exists, settings.timeout)
    flags = []
    if is_noisy(stderr):
        flags.append(NOISY)
    if rc != 0 and out_exists:
        flags.append(LEFT_BEHIND)
    if calib is None:
        flags.append(RANDOM_CALIB)
    record: dict[str, Any] = {
        "case": task.name,
        "mode": mode,
        "class": klass,
        "message": message,
        "flags": flags,
        "exit": rc,
        "seconds": round(seconds, 3),
        "calib": "npz" if calib is not None else f"random: {why_not}",
        "note": task.note,
        "command": "python -m onnxq " + " ".join(args),
        "stderr": clip(stderr),
        "noise": noise_line(stderr, message) if NOISY in flags else None,
    }
    if klass == QUANTIZED:
        check = check_in_subprocess(folder, settings.timeout)
        record["check"] = check
        if check.get("timeout"):
            record["class"], record["message"] = TIMEOUT, check["error"]
        elif not check["ok"]:
            if calib is None and check.get("input_model_error"):
                check["inconclusive"] = True  # random calibration; the case's feeds fail on the input too
            else:
                record["class"], record["message"] = UNUSABLE, check["error"]
    return record


def classify(rc: int | None, stderr: str, out_exists: bool, timeout: float) -> tuple[str, str]:
    """The class of one CLI run and its message (first relevant stderr line)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    if rc is None:
        return TIMEOUT, f"no exit after {timeout:g} s"
    internal = [line for line in lines if line.startswith("onnxq: internal error:")]
    if rc == 1 or rc < 0 or rc not in (0, 2, 3) or "Traceback" in stderr:
        if internal:
            return TRACEBACK, internal[0]
        if rc < 0:
            with contextlib.suppress(ValueError):
                return TRACEBACK, f"killed by {signal.Signals(-rc).name}"
            return TRACEBACK, f"killed by signal {-rc}"
        if "Traceback" in stderr and lines:
            return TRACEBACK, lines[-1]
        return TRACEBACK, f"exit {rc}: {lines[-1] if lines else '(empty stderr)'}"
    if rc == 0:
        if out_exists:
            return QUANTIZED, ""
        return UNUSABLE, "exit 0 but no output file written"
    if rc == 2 and lines and "nothing to quantize" in lines[-1]:
        return NOTHING, lines[-1]
    errors = [line for line in lines if line.startswith("onnxq: error:")]
    if rc == 2 and len(errors) == 1:
        return CLEAN_ERROR, errors[0]
    return OTHER_EXIT, f"exit {rc}: {lines[-1] if lines else '(empty stderr)'}"


def is_noisy(stderr: str) -> bool:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return len(lines) > 1 or bool(ORT_LOG_LINE.search(stderr))


def noise_line(stderr: str, message: str) -> str:
    """The stderr line that makes a run noisy: an onnxruntime log line, else the first extra line."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if ORT_LOG_LINE.search(line):
            return line
    for line in lines:
        if line != message:
            return line
    return lines[0] if lines else ""


def check_in_subprocess(folder: Path, timeout: float) -> dict[str, Any]:
    """Load and run ``out.onnx`` at ORT_ENABLE_ALL on the case's inputs, in a child process."""
    argv = [sys.executable, os.path.abspath(__file__), "--_check", str(folder)]
    rc, stdout, stderr, _ = run_subprocess(argv, folder, timeout)
    if rc is None:
        return {"ok": False, "timeout": True, "error": f"onnxruntime check: no answer after {timeout:g} s"}
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                result: dict[str, Any] = json.loads(line)
                return result
    if rc < 0:
        with contextlib.suppress(ValueError):
            return {"ok": False, "error": f"onnxruntime crashed: {signal.Signals(-rc).name}"}
    tail = [line for line in stderr.splitlines() if line.strip()]
    return {"ok": False, "error": f"onnxruntime check exited {rc}: {tail[-1] if tail else ''}"}


def check_output(folder: Path) -> dict[str, Any]:
    """The ``--_check`` child: does the output load and run in onnxruntime at ORT_ENABLE_ALL?"""
    import onnxruntime as ort

    ort.set_default_logger_severity(4)
    with (folder / "feeds.pkl").open("rb") as f:
        feeds: dict[str, Any] = pickle.load(f)

    def run(path: Path) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 4
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        missing = [n for n in names if n not in feeds]
        if missing:
            raise RuntimeError(f"no value for input(s) {missing} (the input model declares {list(feeds)})")
        session.run(None, {n: feeds[n] for n in names})

    try:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 4
        ort.InferenceSession(str(folder / "out.onnx"), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        return {"ok": False, "stage": "load", "error": f"load: {first_line(exc)}"}
    try:
        run(folder / "out.onnx")
    except Exception as exc:
        result: dict[str, Any] = {"ok": False, "stage": "run", "error": f"run: {first_line(exc)}"}
        try:
            run(folder / "model.onnx")
        except Exception as input_exc:
            result["input_model_error"] = first_line(input_exc)
        return result
    return {"ok": True}


# --------------------------------------------------------------------------------------------------
# the sweep and its report


def first_line(exc: BaseException | str) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def clip(text: str) -> str:
    if len(text) <= STDERR_KEEP:
        return text
    half = STDERR_KEEP // 2
    return text[:half] + "\n[...]\n" + text[-half:]


def sweep(tasks: list[Task], settings: Settings, jobs: int, progress_every: int) -> list[dict[str, Any]]:
    """Run all tasks in a process pool; a broken pool is replaced and its unfinished tasks rerun once."""
    records: list[dict[str, Any]] = []
    pending = list(tasks)
    retried: set[str] = set()
    done = 0
    start = time.perf_counter()
    counts: collections.Counter[str] = collections.Counter()
    while pending:
        broken: list[Task] = []
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures: dict[Future[list[dict[str, Any]]], Task] = {
                pool.submit(run_task, task, settings): task for task in pending
            }
            for future in as_completed(futures):
                task = futures[future]
                try:
                    result = future.result()
                except BrokenProcessPool:
                    if task.name in retried:
                        result = [sweep_error(task, m, "pool worker died twice") for m in settings.modes]
                    else:
                        retried.add(task.name)
                        broken.append(task)
                        continue
                except Exception as exc:
                    result = [sweep_error(task, m, first_line(exc)) for m in settings.modes]
                records.extend(result)
                counts.update(r["class"] for r in result)
                done += 1
                if progress_every and (done % progress_every == 0 or done == len(tasks)):
                    elapsed = time.perf_counter() - start
                    summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                    print(
                        f"[{done}/{len(tasks)} cases, {elapsed:.0f} s] {summary}", file=sys.stderr, flush=True
                    )
        pending = broken
    order = {m: i for i, m in enumerate(settings.modes)}
    records.sort(key=lambda r: (r["case"], order.get(r["mode"], 0)))
    return records


def normalize(message: str) -> str:
    """A grouping key: quoted names, numbers and shapes replaced, so one bug is one group."""
    text = message.removeprefix("onnxq: error: ").removeprefix("onnxq: internal error: ")
    text = re.sub(r"'[^']*'", "'…'", text)
    text = re.sub(r'"[^"]*"', '"…"', text)
    text = re.sub(r"\b\d+(\.\d+)?\b", "N", text)
    text = re.sub(r"\([^()]*\)", "(…)", text)
    text = re.sub(r"<(?:->|[^<>])*>", "<…>", text)  # node labels such as <Adam -> X_new>
    return text


def clean_error_prefix(message: str, width: int = 80) -> str:
    """Clean errors grouped by what they say: normalized, the leading ': '-separated parts (>= 30 chars)."""
    text = normalize(message).removeprefix("model.onnx: ")
    head = ""
    for part in text.split(": "):
        head = f"{head}: {part}" if head else part
        if len(head) >= 30:
            break
    return head if len(head) <= width else head[: width - 1] + "…"


def group(records: Iterable[dict[str, Any]], key: Any) -> list[tuple[str, list[dict[str, Any]]]]:
    groups: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for record in records:
        groups[key(record)].append(record)
    return sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))


def format_summary(records: list[dict[str, Any]], modes: Sequence[str]) -> str:
    from tabulate import SEPARATING_LINE, tabulate

    rows: list[Any] = []
    for name in CLASSES:
        counts = [sum(1 for r in records if r["class"] == name and r["mode"] == m) for m in modes]
        if name in (OTHER_EXIT, SWEEP_ERROR) and not any(counts):
            continue
        rows.append([name, *counts, sum(counts)])
    rows.append(
        [f"runs ({len({r['case'] for r in records})} cases)"]
        + [sum(1 for r in records if r["mode"] == m) for m in modes]
        + [len(records)]
    )
    rows.append(SEPARATING_LINE)
    for flag in FLAGS:
        counts = [sum(1 for r in records if flag in r["flags"] and r["mode"] == m) for m in modes]
        rows.append([f"flag: {flag}", *counts, sum(counts)])
    return tabulate(rows, headers=["class", *modes, "total"], tablefmt="simple")


def format_groups(records: list[dict[str, Any]], examples: int, max_groups: int) -> str:
    out: list[str] = []

    def section(title: str, selected: list[dict[str, Any]], key: Any, show_raw: bool = True) -> None:
        if not selected:
            return
        groups = group(selected, key)
        out.append(f"\n== {title}: {len(selected)} runs, {len(groups)} groups")
        for name, members in groups[:max_groups]:
            modes = collections.Counter(r["mode"] for r in members)
            mode_text = ", ".join(f"{m} {n}" for m, n in modes.items())
            out.append(f"{len(members):5d}  {name}   [{mode_text}]")
            if show_raw and members[0]["message"] != name:
                out.append(f"       e.g. {members[0]['message'][:300]}")
            cases = sorted({r["case"] for r in members})
            more = f" (+{len(cases) - examples} more)" if len(cases) > examples else ""
            out.append(f"       cases: {', '.join(cases[:examples])}{more}")
        if len(groups) > max_groups:
            rest = sum(len(m) for _, m in groups[max_groups:])
            out.append(f"       ... {len(groups) - max_groups} more groups ({rest} runs)")

    def by_message(r: dict[str, Any]) -> str:
        return normalize(r["message"])

    for name in (TRACEBACK, UNUSABLE, TIMEOUT, OTHER_EXIT, SWEEP_ERROR):
        section(name, [r for r in records if r["class"] == name], by_message)
    section(
        NOISY,
        [r for r in records if NOISY in r["flags"]],
        lambda r: normalize(re.sub(r"^.*?(\[[VIWEF]:onnxruntime:)", r"\1", r["noise"] or "")),
        show_raw=False,
    )
    section(LEFT_BEHIND, [r for r in records if LEFT_BEHIND in r["flags"]], lambda r: r["class"], False)
    inconclusive = [r for r in records if r.get("check", {}).get("inconclusive")]
    section(
        "quantized, output check inconclusive (random calibration; the input model fails on the case's "
        "feeds too)",
        inconclusive,
        lambda r: normalize(r["check"]["error"]),
        show_raw=False,
    )
    section(
        CLEAN_ERROR,
        [r for r in records if r["class"] == CLEAN_ERROR],
        lambda r: clean_error_prefix(r["message"]),
    )
    section(
        NOTHING, [r for r in records if r["class"] == NOTHING], lambda r: clean_error_prefix(r["message"])
    )
    return "\n".join(out)


def versions() -> dict[str, str]:
    import importlib.metadata

    result = {"python": platform.python_version()}
    for dist in ("onnxq", "onnx", "onnxruntime", "onnx-ir", "numpy"):
        try:
            result[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            result[dist] = "not installed"
    return result


def parse_modes(text: str) -> tuple[str, ...]:
    modes = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown:
        raise argparse.ArgumentTypeError(
            f"modes are a comma-separated subset of {','.join(MODES)}, got {text!r}"
        )
    return modes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Run onnxq optimize on every ONNX backend node test case and classify the outcome.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--modes", type=parse_modes, default=MODES, help="comma-separated (default: all)")
    parser.add_argument(
        "--filter",
        default=None,
        metavar="SUBSTR",
        help="only cases whose name contains SUBSTR (comma-separated: any of them)",
    )
    parser.add_argument(
        "--limit", type=int, default=None, metavar="N", help="only the first N cases (by name)"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per run (default 60)")
    parser.add_argument("--runs", type=int, default=2, help="onnxq --runs: timed latency runs (default 2)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write every per-run record here")
    parser.add_argument(
        "--workdir", default=None, help="where the per-case temp folders go (default: $TMPDIR)"
    )
    parser.add_argument(
        "--keep-failures",
        default=None,
        metavar="DIR",
        help="copy model.onnx, calib.npz and feeds.pkl of failing runs to DIR/<case>/ to reproduce them",
    )
    parser.add_argument("--examples", type=int, default=3, help="example cases per group (default 3)")
    parser.add_argument("--max-groups", type=int, default=40, help="groups listed per section (default 40)")
    parser.add_argument(
        "--progress", type=int, default=50, metavar="N", help="a progress line every N cases (0: none)"
    )
    parser.add_argument(
        "--from-json",
        default=None,
        metavar="PATH",
        help="print the summary and groups of an earlier --json file instead of running",
    )
    parser.add_argument("--_check", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args._check:
        print(json.dumps(check_output(Path(args._check))), flush=True)
        return 0
    if args.from_json:
        payload = json.loads(Path(args.from_json).read_text())
        records, modes = payload["records"], tuple(payload["summary"])
        print(format_summary(records, modes))
        print(format_groups(records, args.examples, args.max_groups))
        print(f"\n{len(records)} runs in {payload['wall_seconds']:.0f} s; {payload['versions']}")
        return 1 if any(r["class"] in FAILING for r in records) else 0
    start = time.perf_counter()
    tasks = collect_cases(args.filter, args.limit)
    if not tasks:
        print("no cases selected", file=sys.stderr)
        return 1
    settings = Settings(args.modes, args.timeout, args.runs, args.workdir, args.keep_failures)
    print(
        f"{len(tasks)} cases x {len(args.modes)} modes, {args.jobs} jobs, timeout {args.timeout:g} s",
        file=sys.stderr,
        flush=True,
    )
    records = sweep(tasks, settings, max(1, args.jobs), args.progress)
    wall = time.perf_counter() - start
    print(format_summary(records, args.modes))
    print(format_groups(records, args.examples, args.max_groups))
    failing = sum(1 for r in records if r["class"] in FAILING)
    env = versions()
    print(
        f"\n{len(tasks)} cases, {len(records)} runs in {wall:.0f} s ({args.jobs} jobs); "
        + ", ".join(f"{k} {v}" for k, v in env.items())
    )
    if args.json:
        payload = {
            "versions": env,
            "argv": sys.argv,
            "wall_seconds": round(wall, 1),
            "summary": {
                m: collections.Counter(r["class"] for r in records if r["mode"] == m) for m in args.modes
            },
            "records": records,
        }
        Path(args.json).write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
