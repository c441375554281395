"""Contracts in schemas/: round trips, defaults, error handling, fingerprints and backward compatibility."""

import io
import json
from pathlib import Path
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_writer
from fastavro.schema import to_parsing_canonical_form

from speakerflow.schemas import codec
from speakerflow.schemas.codec import RECORDS, SchemaError, decode, encode

SCHEMA_DIR = Path(codec.__file__).parent
NOW = 1_763_820_000_000
EMB = [0.125, -0.5, 0.25, 0.75]  # exactly representable as float32, so round trips compare equal
SAMPLE = {"payload": b"RIFF....WAVE", "uri": None, "encoding": "WAV", "sample_rate": 16000, "channels": 1}

EXAMPLES: dict[str, dict[str, Any]] = {
    "DiarizerState": {
        "stream_id": "call-42",
        "part": "core",
        "snapshot": b"PK\x03\x04npz",
        "snapshot_format": 1,
        "audio_s": 12.5,
        "next_seq": 25,
        "resume_offset": 1_234,
        "origin_capture_ts_ms": NOW,
        "sample_rate": 16000,
        "channels": 1,
        "model_id": "ge2e-resemblyzer-1a2b3c4d",
        "saved_at_ms": NOW + 12_500,
    },
    "StreamEvent": {
        "stream_id": "call-42",
        "event": "ENDED",
        "at_ms": NOW,
        "audio_seconds": 61.5,
        "speakers": 2,
        "revision": 1,
        "segments": 12,
        "reason": None,
        "metadata": {"source": "api"},
    },
    "AudioChunk": {
        "stream_id": "call-42",
        "seq": 7,
        "capture_ts_ms": NOW,
        "sample_rate": 16000,
        "channels": 1,
        "encoding": "PCM_S16LE",
        "payload": bytes(range(256)) * 2,
        "end_of_stream": False,
        "metadata": {"device": "mic-1"},
    },
    "EnrollmentRequest": {
        "request_id": "req-1",
        "speaker_id": "spk-ada",
        "name": "Ada Lovelace",
        "mode": "REPLACE",
        "samples": [SAMPLE, {**SAMPLE, "payload": None, "uri": "s3://bucket/ada.flac", "encoding": "FLAC"}],
        "metadata": {"team": "research"},
        "requested_at_ms": NOW,
    },
    "EnrollmentResult": {
        "request_id": "req-1",
        "speaker_id": "spk-ada",
        "name": "Ada Lovelace",
        "accepted": False,
        "reason": "only 2.1 s of speech, need 5 s",
        "speech_seconds": 2.1,
        "quality": 0.4,
        "sample_count": 2,
        "model_id": "ecapa-voxceleb@1",
        "processed_at_ms": NOW + 900,
    },
    "Voiceprint": {
        "speaker_id": "spk-ada",
        "name": "Ada Lovelace",
        "model_id": "ecapa-voxceleb@1",
        "dim": 4,
        "embedding": EMB,
        "sample_count": 3,
        "speech_seconds": 31.5,
        "updated_at_ms": NOW,
        "metadata": {},
    },
    "DiarizedSegment": {
        "segment_id": "call-42/3",
        "stream_id": "call-42",
        "label": "SPEAKER_01",
        "start_s": 12.5,
        "end_s": 15.25,
        "is_final": True,
        "revision": 2,
        "embedding": EMB,
        "window_count": 5,
        "model_id": "ecapa-voxceleb@1",
        "source_capture_ts_ms": NOW,
        "emitted_at_ms": NOW + 350,
    },
    "IdentifiedSegment": {
        "segment_id": "call-42/3",
        "stream_id": "call-42",
        "label": "SPEAKER_01",
        "start_s": 12.5,
        "end_s": 15.25,
        "speaker_id": "spk-ada",
        "name": "Ada Lovelace",
        "confidence": 0.93,
        "score": 0.71,
        "candidates": [
            {"speaker_id": "spk-ada", "name": "Ada Lovelace", "score": 0.71},
            {"speaker_id": "spk-bob", "name": "Bob", "score": 0.22},
        ],
        "model_id": "ecapa-voxceleb@1",
        "is_final": True,
        "revision": 2,
        "source_capture_ts_ms": NOW,
        "emitted_at_ms": NOW + 400,
    },
    "VerificationRequest": {
        "request_id": "ver-9",
        "speaker_id": "spk-ada",
        "sample": SAMPLE,
        "requested_at_ms": NOW,
    },
    "VerificationResult": {
        "request_id": "ver-9",
        "speaker_id": "spk-ada",
        "accepted": True,
        "score": 0.68,
        "confidence": 0.9,
        "threshold": 0.5,
        "model_id": "ecapa-voxceleb@1",
        "error": None,
        "processed_at_ms": NOW + 120,
    },
    "DeadLetter": {
        "source_topic": "audio.chunks",
        "source_partition": 3,
        "source_offset": 1_234_567,
        "key": b"call-42",
        "processor": "diarizer",
        "error_class": "SchemaError",
        "error_message": "bad marker",
        "payload_excerpt": b"\x00\x01garbage",
        "failed_at_ms": NOW,
    },
}


# --- independent CRC-64-AVRO (Avro spec, "Schema Fingerprints") -------------------------------------
CRC64_EMPTY = 0xC15D213AA4D7A795
CRC64_TABLE = []
for _i in range(256):
    _fp = _i
    for _ in range(8):
        _fp = (_fp >> 1) ^ (CRC64_EMPTY & -(_fp & 1))
    CRC64_TABLE.append(_fp)


def crc64_avro(data: bytes) -> int:
    fp = CRC64_EMPTY
    for b in data:
        fp = (fp >> 8) ^ CRC64_TABLE[(fp ^ b) & 0xFF]
    return fp


def single_object(raw_schema: dict, record: dict) -> bytes:
    """Frame ``record`` with ``raw_schema`` without going through the codec under test."""
    parsed = parse_schema(raw_schema, named_schemas={})
    fp = crc64_avro(to_parsing_canonical_form(parsed).encode()).to_bytes(8, "little")
    body = io.BytesIO()
    schemaless_writer(body, parsed, record)
    return b"\xc3\x01" + fp + body.getvalue()


def example_for(avro_type: Any, named: dict[str, Any]) -> Any:
    """A value for ``avro_type`` that sets every field (non-null union branch, one array/map item)."""
    if isinstance(avro_type, list):
        return example_for(next(t for t in avro_type if t != "null"), named)
    if isinstance(avro_type, str):
        primitives = {
            "null": None,
            "boolean": True,
            "int": 3,
            "long": 4,
            "float": 0.5,
            "double": 0.25,
            "bytes": b"\x01\x02",
            "string": "s",
        }
        if avro_type in primitives:
            return primitives[avro_type]
        return example_for(named[avro_type], named)
    kind = avro_type["type"]
    if kind in ("record", "enum", "fixed"):
        full = avro_type["name"]
        named[full] = named[full.rsplit(".", 1)[-1]] = avro_type
        if "namespace" in avro_type:
            named[f"{avro_type['namespace']}.{full}"] = avro_type
    if kind == "record":
        return {f["name"]: example_for(f["type"], named) for f in avro_type["fields"]}
    if kind == "enum":
        return avro_type["symbols"][-1]
    if kind == "fixed":
        return b"\x00" * avro_type["size"]
    if kind == "array":
        return [example_for(avro_type["items"], named)]
    if kind == "map":
        return {"k": example_for(avro_type["values"], named)}
    return example_for(kind, named)  # {"type": "long", "logicalType": ...}


def load_raw(path: Path) -> dict:
    return json.loads(path.read_text())


HISTORY = [(name, path) for name in RECORDS for path in codec.history_paths(name)]


# --- tests --------------------------------------------------------------------------------------------
def test_every_record_has_a_file_an_example_and_a_history() -> None:
    assert set(EXAMPLES) == set(RECORDS)
    for name in RECORDS:
        raw = load_raw(SCHEMA_DIR / f"{name}.avsc")
        assert raw["name"] == name and raw["namespace"] == "speakerflow" and raw["doc"]
        assert codec.history_paths(name)[0].name == f"{name}.v1.avsc"


@pytest.mark.parametrize("name", RECORDS)
def test_round_trip(name: str) -> None:
    data = encode(name, EXAMPLES[name])
    assert data[:2] == b"\xc3\x01" and data[2:10] == codec.fingerprint(name)
    assert decode(name, data) == EXAMPLES[name]


@pytest.mark.parametrize("name", RECORDS)
def test_generated_example_round_trips(name: str) -> None:
    record = example_for(load_raw(SCHEMA_DIR / f"{name}.avsc"), {})
    assert decode(name, encode(name, record)) == record


def test_defaults_are_filled() -> None:
    chunk = {k: v for k, v in EXAMPLES["AudioChunk"].items() if k not in ("end_of_stream", "metadata")}
    assert decode("AudioChunk", encode("AudioChunk", chunk)) == {
        **chunk,
        "end_of_stream": False,
        "metadata": {},
    }

    req = {"request_id": "r", "speaker_id": "s", "name": "n", "requested_at_ms": NOW}
    got = decode("EnrollmentRequest", encode("EnrollmentRequest", req))
    assert got == {**req, "mode": "ADD", "samples": [], "metadata": {}}

    got = decode(
        "VerificationRequest",
        encode(
            "VerificationRequest",
            {
                "request_id": "r",
                "speaker_id": "s",
                "sample": {"encoding": "PCM_F32LE"},
                "requested_at_ms": NOW,
            },
        ),
    )
    assert got["sample"] == {
        "payload": None,
        "uri": None,
        "encoding": "PCM_F32LE",
        "sample_rate": 16000,
        "channels": 1,
    }

    seg = {
        k: v
        for k, v in EXAMPLES["IdentifiedSegment"].items()
        if k not in ("speaker_id", "candidates", "revision")
    }
    got = decode("IdentifiedSegment", encode("IdentifiedSegment", seg))
    assert (got["speaker_id"], got["candidates"], got["revision"]) == (None, [], 0)


def test_timestamps_stay_epoch_millis() -> None:
    # The logicalType is documentation only; consumers do arithmetic on ints.
    assert decode("AudioChunk", encode("AudioChunk", EXAMPLES["AudioChunk"]))["capture_ts_ms"] == NOW


def test_encode_rejects_missing_required_field() -> None:
    record = {k: v for k, v in EXAMPLES["DiarizedSegment"].items() if k != "window_count"}
    with pytest.raises(SchemaError, match=r"DiarizedSegment.*window_count"):
        encode("DiarizedSegment", record)


def test_encode_rejects_bad_values() -> None:
    with pytest.raises(SchemaError, match=r"AudioChunk.*seq"):
        encode("AudioChunk", {**EXAMPLES["AudioChunk"], "seq": "7"})
    with pytest.raises(SchemaError, match=r"encoding"):
        encode("AudioChunk", {**EXAMPLES["AudioChunk"], "encoding": "AAC"})
    with pytest.raises(SchemaError, match=r"unknown field.*speakerId"):
        encode("VerificationResult", {**EXAMPLES["VerificationResult"], "speakerId": "x"})
    with pytest.raises(SchemaError, match=r"AudioSample.*encoding"):
        encode("VerificationRequest", {**EXAMPLES["VerificationRequest"], "sample": {"uri": "file:///a.wav"}})
    with pytest.raises(SchemaError, match="unknown record"):
        encode("Nope", {})


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "shorter than"),
        (b"\xc3\x01\x00", "shorter than"),
        (b"\x00" * 5 + b"\x00\x00\x00\x01" + b"\x00" * 20, "marker 0000"),  # Confluent wire format
        (b"\xc3\x01" + b"\xff" * 8 + b"\x00" * 20, "unknown writer schema fingerprint ffffffffffffffff"),
        (b"not avro at all, just text", "marker"),
    ],
)
def test_decode_rejects_bad_framing(data: bytes, reason: str) -> None:
    with pytest.raises(SchemaError, match=reason):
        decode("DeadLetter", data)


def test_decode_rejects_other_records_fingerprint() -> None:
    with pytest.raises(SchemaError, match="unknown writer schema fingerprint"):
        decode("DeadLetter", encode("AudioChunk", EXAMPLES["AudioChunk"]))


@pytest.mark.parametrize("name", RECORDS)
def test_decode_rejects_every_truncation(name: str) -> None:
    data = encode(name, EXAMPLES[name])
    for cut in range(len(data)):
        with pytest.raises(SchemaError):
            decode(name, data[:cut])


def test_decode_rejects_garbage_bodies() -> None:
    header = b"\xc3\x01" + codec.fingerprint("DeadLetter")
    bodies = [
        b"\x04\xff\xfe",  # source_topic: invalid UTF-8
        b"\xff" * 40,  # never-ending varint
        b"\x01",  # negative string length
        b"\x02a\x02\x00\x06",  # key: union branch index 3 does not exist
    ]
    for body in bodies:
        with pytest.raises(SchemaError, match="corrupt or truncated"):
            decode("DeadLetter", header + body)
    with pytest.raises(SchemaError, match="trailing"):
        decode("DeadLetter", encode("DeadLetter", EXAMPLES["DeadLetter"]) + b"\x00")
    with pytest.raises(SchemaError, match="expected bytes"):
        decode("DeadLetter", "text")  # type: ignore[arg-type]


def test_crc64_matches_published_vectors() -> None:
    # Avro's share/test/data/schema-tests.txt publishes these as signed 64-bit integers.
    for canonical, published in [
        ('"null"', 7195948357588979594),
        ('"int"', 8247732601305521295),
        ('"long"', -3434872931120570953),
    ]:
        assert crc64_avro(canonical.encode()) == published & 0xFFFF_FFFF_FFFF_FFFF


@pytest.mark.parametrize("name", RECORDS)
def test_fingerprint_is_little_endian_crc64_of_canonical_form(name: str) -> None:
    canonical = to_parsing_canonical_form(load_raw(SCHEMA_DIR / f"{name}.avsc"))
    assert codec.fingerprint(name) == crc64_avro(canonical.encode()).to_bytes(8, "little")


@pytest.mark.parametrize(("name", "path"), HISTORY, ids=[p.name for _, p in HISTORY])
def test_historical_versions_decode_with_current_schema(name: str, path: Path) -> None:
    raw = load_raw(path)
    record = example_for(raw, {})
    got = decode(name, single_object(raw, record))
    current = {f["name"] for f in codec.schema(name)["fields"]}
    assert set(got) == current
    assert {k: got[k] for k in current & set(record)} == {k: record[k] for k in current & set(record)}


@pytest.mark.parametrize("name", RECORDS)
def test_current_schema_is_committed_to_history(name: str) -> None:
    # Changing a schema means adding history/<Name>.v<N+1>.avsc, so the next change is checked against it.
    latest = codec.history_paths(name)[-1]
    assert to_parsing_canonical_form(load_raw(latest)) == to_parsing_canonical_form(
        load_raw(SCHEMA_DIR / f"{name}.avsc")
    ), f"copy schemas/{name}.avsc to schemas/history/ as the next version"


def test_shared_named_types_are_identical_in_every_file() -> None:
    seen: dict[str, tuple[str, str]] = {}
    for name in RECORDS:
        parsed = parse_schema(load_raw(SCHEMA_DIR / f"{name}.avsc"), named_schemas={})
        for full, named in parsed["__named_schemas"].items():
            canonical = to_parsing_canonical_form(named)
            first = seen.setdefault(full, (name, canonical))
            assert first[1] == canonical, f"{full} differs between {first[0]}.avsc and {name}.avsc"
