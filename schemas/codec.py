"""Avro wire format for every speakerflow topic value.

Messages use the Avro specification's *single-object encoding*: the marker bytes ``C3 01``, the
8-byte little-endian CRC-64-AVRO fingerprint of the writer schema's Parsing Canonical Form, then
the Avro binary body. The fingerprint tells a consumer exactly which schema version wrote the
message, so it can resolve old data to the current schema without a schema registry service:
every version ever produced is kept in ``schemas/history/<Name>.v<N>.avsc``. With a Confluent
Schema Registry one would swap this module for the Confluent wire format (magic 0 + 4-byte
schema id) and keep the ``encode``/``decode`` signatures.

``logicalType`` annotations are dropped when loading, so timestamps stay plain epoch-ms ints in
Python (fastavro would otherwise turn them into ``datetime``); this changes neither the binary
encoding nor the fingerprint, because the canonical form ignores logical types.
"""

import copy
import io
import json
import reprlib
from functools import cache
from pathlib import Path
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.read import SchemaResolutionError
from fastavro.schema import fingerprint as _avro_fingerprint
from fastavro.schema import to_parsing_canonical_form
from fastavro.validation import ValidationError, validate

MARKER = b"\xc3\x01"
HEADER_LEN = len(MARKER) + 8

RECORDS: tuple[str, ...] = (
    "AudioChunk",
    "EnrollmentRequest",
    "EnrollmentResult",
    "Voiceprint",
    "DiarizedSegment",
    "IdentifiedSegment",
    "VerificationRequest",
    "VerificationResult",
    "DeadLetter",
    "StreamEvent",
    "DiarizerState",
)

_DIR = Path(__file__).resolve().parent
_HISTORY = _DIR / "history"


class SchemaError(ValueError):
    """A record does not match its schema, or bytes are not a decodable message of it."""


def _strip_logical_types(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_logical_types(v) for k, v in node.items() if k != "logicalType"}
    if isinstance(node, list):
        return [_strip_logical_types(v) for v in node]
    return node


def _load(path: Path) -> dict:
    # A fresh named-type registry per file: every .avsc is self-contained (shared types inlined).
    return parse_schema(_strip_logical_types(json.loads(path.read_text())), named_schemas={})


def _fingerprint_of(parsed: dict) -> bytes:
    # fastavro returns the hex of the little-endian bytes, i.e. exactly the spec's wire order.
    return bytes.fromhex(_avro_fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))


def _check_name(name: str) -> None:
    if name not in RECORDS:
        raise SchemaError(f"unknown record {name!r}; expected one of {', '.join(RECORDS)}")


@cache
def schema(name: str) -> dict:
    """Current parsed (fastavro) schema of record ``name``; shared and cached, do not mutate."""
    _check_name(name)
    return _load(_DIR / f"{name}.avsc")


@cache
def fingerprint(name: str) -> bytes:
    """8-byte CRC-64-AVRO fingerprint of the current schema of ``name``, in wire (little-endian) order."""
    return _fingerprint_of(schema(name))


def history_paths(name: str) -> list[Path]:
    """Historical schema files of ``name`` (``history/<Name>.v<N>.avsc``), oldest first."""
    _check_name(name)
    return sorted(_HISTORY.glob(f"{name}.v*.avsc"), key=lambda p: int(p.stem.rsplit(".v", 1)[1]))


@cache
def _writers(name: str) -> dict[bytes, dict]:
    writers = {_fingerprint_of(s): s for s in map(_load, history_paths(name))}
    # The current schema object wins so that decode can skip resolution in the common case.
    writers[fingerprint(name)] = schema(name)
    return writers


def _describe(error: Any) -> str:
    expected = error.schema
    if isinstance(expected, dict):
        expected = expected.get("name") or expected.get("type")
    got = f"{type(error.datum).__name__} {reprlib.repr(error.datum)}"
    return f"{error.field or '<record>'}: got {got}, expected {expected}"


def encode(name: str, record: dict) -> bytes:
    """Validate ``record`` against the current schema of ``name`` and frame it as a single object."""
    parsed = schema(name)
    if not isinstance(record, dict):
        raise SchemaError(f"{name}: expected a dict, got {type(record).__name__}")
    fields = parsed["fields"]
    missing = [f["name"] for f in fields if f["name"] not in record and "default" not in f]
    if missing:
        raise SchemaError(f"{name}: missing required field(s) {', '.join(missing)}")
    # fastavro silently drops unknown keys; rejecting them catches misspelt field names.
    unknown = sorted(set(record) - {f["name"] for f in fields})
    if unknown:
        raise SchemaError(f"{name}: unknown field(s) {', '.join(map(str, unknown))}")
    try:
        validate(record, parsed, raise_errors=True)
    except ValidationError as exc:
        raise SchemaError(f"{name}: invalid " + "; ".join(map(_describe, exc.errors))) from exc
    buf = io.BytesIO()
    buf.write(MARKER)
    buf.write(fingerprint(name))
    schemaless_writer(buf, parsed, record)
    return buf.getvalue()


def decode(name: str, data: bytes) -> dict:
    """Decode a single-object-encoded ``name`` written by any known version, resolved to the current one."""
    reader = schema(name)
    if not isinstance(data, bytes | bytearray | memoryview):
        raise SchemaError(f"{name}: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < HEADER_LEN:
        raise SchemaError(f"{name}: {len(data)} bytes is shorter than the {HEADER_LEN}-byte header")
    if data[:2] != MARKER:
        raise SchemaError(f"{name}: marker {data[:2].hex()} is not c301 (not Avro single-object encoding)")
    fp = data[2:HEADER_LEN]
    writer = _writers(name).get(fp)
    if writer is None:
        raise SchemaError(f"{name}: unknown writer schema fingerprint {fp.hex()} (not in schemas/history)")
    body = io.BytesIO(data[HEADER_LEN:])
    try:
        record = schemaless_reader(body, writer, None if writer is reader else reader)
    except SchemaResolutionError as exc:  # an incompatible schema change slipped through
        raise SchemaError(f"{name}: writer version {fp.hex()} cannot be resolved: {exc}") from exc
    except Exception as exc:  # fastavro raises EOFError, struct/Unicode errors, ... on bad bodies
        raise SchemaError(f"{name}: corrupt or truncated body ({type(exc).__name__}: {exc})") from exc
    trailing = len(data) - HEADER_LEN - body.tell()
    if trailing:
        raise SchemaError(f"{name}: {trailing} unexpected trailing bytes after the record")
    # fastavro fills fields missing from an old writer with the reader schema's own default objects;
    # copy so a consumer mutating e.g. metadata={} cannot corrupt the cached schema.
    return record if writer is reader else copy.deepcopy(record)
