"""Voiceprints in and out of speakerflow: JSON lines (base64 float32) or NumPy .npz.

Every vector travels with its model id, because vectors of different models must never be compared.

JSON lines, one voiceprint per line::

    {"speaker_id": "alice", "name": "Alice", "model_id": "ge2e-...", "dim": 256,
     "embedding_b64": "<base64 of dim little-endian float32>", "sample_count": 2,
     "speech_seconds": 31.5, "updated_at_ms": 1795000000000, "metadata": {"team": "support"}}

.npz: string arrays `speaker_id`, `name`, `model_id`, `metadata` (JSON text), numbers `sample_count`,
`speech_seconds`, `updated_at_ms`, and `embeddings` (N x dim float32; one file holds one dimension).
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from speakerflow.gallery.voiceprint import Voiceprint

FORMATS = ("jsonl", "npz")


class VoiceprintFileError(ValueError):
    """A voiceprint file is malformed; the message says where and why."""


def to_json(voiceprint: Voiceprint) -> dict:
    vector = np.asarray(voiceprint.embedding, "<f4")
    return {
        "speaker_id": voiceprint.speaker_id,
        "name": voiceprint.name,
        "model_id": voiceprint.model_id,
        "dim": int(vector.shape[0]),
        "embedding_b64": base64.b64encode(vector.tobytes()).decode("ascii"),
        "sample_count": int(voiceprint.sample_count),
        "speech_seconds": float(voiceprint.speech_seconds),
        "updated_at_ms": int(voiceprint.updated_at_ms),
        "metadata": dict(voiceprint.metadata),
    }


def from_json(record: dict, where: str = "record") -> Voiceprint:
    try:
        vector = np.frombuffer(base64.b64decode(record["embedding_b64"], validate=True), "<f4")
        return checked(
            Voiceprint(
                str(record["speaker_id"]),
                str(record.get("name") or record["speaker_id"]),
                str(record["model_id"]),
                vector.astype(np.float32),
                int(record.get("sample_count", 1)),
                float(record.get("speech_seconds", 0.0)),
                int(record.get("updated_at_ms", 0)),
                {str(k): str(v) for k, v in (record.get("metadata") or {}).items()},
            ),
            int(record["dim"]),
            where,
        )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, VoiceprintFileError):
            raise
        raise VoiceprintFileError(f"{where}: {type(exc).__name__}: {exc}") from exc


def checked(voiceprint: Voiceprint, dim: int, where: str) -> Voiceprint:
    """Validate a voiceprint read from outside and return it L2-normalised."""
    vector = np.asarray(voiceprint.embedding, np.float32)
    if not voiceprint.speaker_id:
        raise VoiceprintFileError(f"{where}: empty speaker_id")
    if not voiceprint.model_id:
        raise VoiceprintFileError(f"{where}: empty model_id (every vector must say which model made it)")
    if vector.shape != (dim,) or dim <= 0:
        raise VoiceprintFileError(f"{where}: embedding has {vector.shape[0]} values, dim says {dim}")
    norm = float(np.linalg.norm(vector))
    if not np.all(np.isfinite(vector)) or norm < 1e-6:
        raise VoiceprintFileError(f"{where}: embedding is not a finite, non-zero vector")
    voiceprint.embedding = (vector / norm).astype(np.float32)
    return voiceprint


def write_jsonl(path: Path, voiceprints: Iterable[Voiceprint]) -> int:
    count = 0
    with Path(path).open("w") as fh:
        for vp in voiceprints:
            fh.write(json.dumps(to_json(vp), ensure_ascii=False) + "\n")
            count += 1
    return count


def read_jsonl(path: Path) -> list[Voiceprint]:
    out = []
    with Path(path).open() as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise VoiceprintFileError(f"{path}:{number}: not JSON ({exc})") from exc
            out.append(from_json(record, f"{path}:{number}"))
    return out


def write_npz(path: Path, voiceprints: list[Voiceprint]) -> int:
    dims = {vp.dim for vp in voiceprints}
    if len(dims) > 1:
        raise VoiceprintFileError(
            f"an .npz file holds one dimension, these voiceprints have {sorted(dims)}: "
            "export one model at a time (--model) or use JSON lines"
        )
    dim = dims.pop() if dims else 0
    np.savez(
        path,
        speaker_id=np.array([vp.speaker_id for vp in voiceprints], dtype=str),
        name=np.array([vp.name for vp in voiceprints], dtype=str),
        model_id=np.array([vp.model_id for vp in voiceprints], dtype=str),
        embeddings=np.stack([vp.embedding for vp in voiceprints]).astype(np.float32)
        if voiceprints
        else np.zeros((0, dim), np.float32),
        sample_count=np.array([vp.sample_count for vp in voiceprints], np.int64),
        speech_seconds=np.array([vp.speech_seconds for vp in voiceprints], np.float64),
        updated_at_ms=np.array([vp.updated_at_ms for vp in voiceprints], np.int64),
        metadata=np.array([json.dumps(vp.metadata, ensure_ascii=False) for vp in voiceprints], dtype=str),
    )
    return len(voiceprints)


def read_npz(path: Path) -> list[Voiceprint]:
    try:
        data = np.load(path, allow_pickle=False)
        embeddings = np.asarray(data["embeddings"], np.float32)
        columns = [data[k] for k in ("speaker_id", "name", "model_id", "sample_count")]
        seconds, updated, metadata = data["speech_seconds"], data["updated_at_ms"], data["metadata"]
    except (KeyError, ValueError, OSError) as exc:
        raise VoiceprintFileError(f"{path}: not a speakerflow voiceprint .npz ({exc})") from exc
    if embeddings.ndim != 2 or any(len(c) != len(embeddings) for c in columns):
        raise VoiceprintFileError(f"{path}: arrays disagree on the number of voiceprints")
    out = []
    for i, (sid, name, model, samples) in enumerate(zip(*columns, strict=True)):
        vp = Voiceprint(
            str(sid),
            str(name),
            str(model),
            embeddings[i],
            int(samples),
            float(seconds[i]),
            int(updated[i]),
            json.loads(str(metadata[i])),
        )
        out.append(checked(vp, embeddings.shape[1], f"{path}[{i}]"))
    return out


def file_format(path: Path, explicit: str | None = None) -> str:
    fmt = explicit or ("npz" if Path(path).suffix.lower() == ".npz" else "jsonl")
    if fmt not in FORMATS:
        raise VoiceprintFileError(f"unknown format {fmt!r}; choose {' or '.join(FORMATS)}")
    return fmt


def read_voiceprints(path: Path, fmt: str | None = None) -> list[Voiceprint]:
    return read_npz(path) if file_format(path, fmt) == "npz" else read_jsonl(path)


def write_voiceprints(path: Path, voiceprints: list[Voiceprint], fmt: str | None = None) -> int:
    if file_format(path, fmt) == "npz":
        return write_npz(path, voiceprints)
    return write_jsonl(path, voiceprints)


def model_counts(voiceprints: Iterable[Voiceprint]) -> Counter:
    """How many voiceprints of each model id."""
    return Counter(vp.model_id for vp in voiceprints)
