"""Write ``tools/zoo_data/speech.npz``: speech for the silero_vad entry of :mod:`tools.zoo`.

Why a data file: the speech is synthesized by espeak-ng, whose output changes between versions and
which is not installed everywhere (a benchmark machine may have no package manager). Storing the
result keeps the VAD feeds identical on every machine; only this script needs espeak-ng
(``apt-get install -y espeak-ng``).

What: for each split, sentences from its half of ``tools/sentences.txt`` (calib: first half, eval: second
half), each spoken with a seeded voice (en-us, en-gb, en-gb-scotland, en-029, en-gb-x-rp; male and
female variants), speed, pitch and loudness, resampled from espeak-ng's 22050 Hz to 16 kHz (band-limited,
by FFT), separated by 0.5–2.5 s of silence. Stored as μ-law uint8 (:func:`tools.zoo.mulaw_encode`, 8
bits per sample) with the utterance bounds in samples, the sentences and the espeak-ng version. Clean:
:mod:`tools.zoo` adds a seeded gain and background noise.

Run ``python -m tools.make_zoo_data [--seconds 18] [--out tools/zoo_data/speech.npz]``; the same
espeak-ng version writes the same file.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import wave
from collections.abc import Sequence
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools import model_zoo, zoo

__all__ = ["main", "resample", "speak", "speech_stream"]

_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp")
_VARIANTS = ("", "+m3", "+f2", "+f3", "+f4", "+m7", "+klatt2")


def resample(audio: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Band-limited resampling by truncating (or zero-extending) the spectrum; ends padded to avoid wrap."""
    pad = rate_in // 10
    padded = np.pad(audio.astype(np.float64), pad)
    n_out = round(padded.size * rate_out / rate_in)
    spectrum = np.fft.rfft(padded)
    bins = n_out // 2 + 1
    spectrum = spectrum[:bins] if spectrum.size >= bins else np.pad(spectrum, (0, bins - spectrum.size))
    out = np.fft.irfft(spectrum, n_out) * (n_out / padded.size)
    trim = round(pad * rate_out / rate_in)
    return out[trim : n_out - trim].astype(np.float32)


def speak(text: str, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, int]:
    """``text`` spoken by espeak-ng: float32 mono in [-1, 1] and its sample rate."""
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        command = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav), text]
        subprocess.run(command, check=True, capture_output=True)
        with wave.open(str(wav)) as f:
            rate, frames = f.getframerate(), f.readframes(f.getnframes())
    return np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0, rate


def speech_stream(
    sentences: Sequence[str], seconds: float, seed: int, rate: int = zoo.VAD_RATE
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """At least ``seconds`` of speech and silence; the utterance bounds ``[k, 2]``; the sentences spoken."""
    rng = np.random.default_rng(seed)
    parts: list[np.ndarray] = [np.zeros(round(rng.uniform(0.3, 1.0) * rate), np.float32)]
    bounds, spoken = [], []
    length = parts[0].size
    for index in rng.permutation(len(sentences)):
        if length >= seconds * rate:
            break
        voice = f"{rng.choice(_VOICES)}{rng.choice(_VARIANTS)}"
        audio, rate_in = speak(
            sentences[index], voice, int(rng.integers(130, 200)), int(rng.integers(30, 75))
        )
        audio = resample(audio, rate_in, rate)
        loud = np.flatnonzero(np.abs(audio) > 0.02 * np.max(np.abs(audio)))
        audio = audio[loud[0] : loud[-1] + 1] * float(rng.uniform(0.3, 0.9) / np.max(np.abs(audio)))
        bounds.append((length, length + audio.size))
        gap = np.zeros(round(rng.uniform(0.5, 2.5) * rate), np.float32)
        parts += [audio, gap]
        length += audio.size + gap.size
        spoken.append(sentences[index])
    return np.concatenate(parts), np.asarray(bounds, dtype=np.int64), spoken


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the speech data of tools/zoo.py with espeak-ng.")
    parser.add_argument("--out", type=Path, default=zoo.SPEECH_DATA)
    parser.add_argument("--seconds", type=float, default=18.0, help="length of each split's stream")
    args = parser.parse_args(argv)
    if shutil.which("espeak-ng") is None:
        print("espeak-ng not found: apt-get install -y espeak-ng", file=sys.stderr)
        return 2
    version = subprocess.run(
        ["espeak-ng", "--version"], check=True, capture_output=True, text=True
    ).stdout.strip()
    sentences = model_zoo.load_sentences()
    half = len(sentences) // 2
    arrays: dict[str, np.ndarray] = {"espeak_version": np.array(version)}
    for split, pool, seed in (("calib", sentences[:half], 1), ("eval", sentences[half:], 2)):
        audio, bounds, spoken = speech_stream(pool, args.seconds, seed)
        arrays[f"{split}_mulaw"] = zoo.mulaw_encode(audio)
        arrays[f"{split}_segments"] = bounds
        arrays[f"{split}_sentences"] = np.array(spoken)
        print(f"{split}: {audio.size / zoo.VAD_RATE:.1f} s, {len(spoken)} utterances")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)  # type: ignore[arg-type]
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB, {version})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
