"""Limits on every field that reaches a fixed-width encoding, an index or a decoder, checked where data
enters: the gateway (HTTP and WebSocket) and the stages that read request and audio topics.

Why each limit exists:
- ids (stream, speaker, request): they become Kafka keys, btree-indexed primary keys and file names, so a
  safe charset and 128 characters at most (a 9,000-character id overflowed the btree index row);
- names and metadata: free text, but no NUL or other control characters (PostgreSQL text refuses NUL)
  and bounded length; a name is never blank;
- `seq`, `capture_ts_ms`, `requested_at_ms`: the stages add to them and store them as Avro longs and
  PostgreSQL timestamps, so they stay far from 2**63 (timestamps before the year 2286);
- `sample_rate` and `channels`: checked before a chunk fixes its stream's format;
- compressed audio: the decoded length is read from the header before decoding (see processors/audio.py).
"""

from __future__ import annotations

import re
import unicodedata

ID_MAX = 128
NAME_MAX = 200
METADATA_ENTRIES_MAX = 32
METADATA_TEXT_MAX = 512
SEQ_MAX = 2**40  # a chunk every 10 ms for 348 years
TS_MS_MAX = 10**13  # 2286-11-20
MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 48000
MAX_CHANNELS = 8
SAMPLES_MAX = 32  # audio samples in one enrollment request

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]*")


class InvalidField(ValueError):
    """A field value outside its limits; the message names the field and the limit."""


def check_id(field: str, value: str) -> str:
    """`value` if it is a safe id (letters, digits and ._:@- , at most ID_MAX characters, starting with a
    letter or digit); InvalidField otherwise."""
    if not isinstance(value, str) or not value:
        raise InvalidField(f"{field} must not be empty")
    if len(value) > ID_MAX:
        raise InvalidField(f"{field} is {len(value)} characters long; at most {ID_MAX} are allowed")
    if not _ID.fullmatch(value):
        raise InvalidField(
            f"{field} {_excerpt(value)} may contain only letters, digits and . _ : @ - "
            "(starting with a letter or digit)"
        )
    return value


def check_text(field: str, value: str, max_len: int = METADATA_TEXT_MAX, allow_blank: bool = True) -> str:
    """Free text without NUL or other control characters, at most `max_len` characters."""
    if len(value) > max_len:
        raise InvalidField(f"{field} is {len(value)} characters long; at most {max_len} are allowed")
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in value):
        raise InvalidField(f"{field} {_excerpt(value)} contains control characters (NUL, ...)")
    if not allow_blank and not value.strip():
        raise InvalidField(f"{field} must not be blank")
    return value


def check_name(value: str) -> str:
    return check_text("name", value, NAME_MAX, allow_blank=False)


def check_int(field: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise InvalidField(f"{field} {value} is outside {low}..{high}")
    return value


def check_format(sample_rate: int, channels: int) -> None:
    check_int("sample_rate", sample_rate, MIN_SAMPLE_RATE, MAX_SAMPLE_RATE)
    check_int("channels", channels, 1, MAX_CHANNELS)


def check_metadata(metadata: dict[str, str]) -> None:
    if len(metadata) > METADATA_ENTRIES_MAX:
        raise InvalidField(f"metadata has {len(metadata)} entries; at most {METADATA_ENTRIES_MAX}")
    for key, value in metadata.items():
        check_text("metadata key", key)
        check_text(f"metadata[{key}]", value)


def check_audio_chunk(chunk: dict) -> None:
    """Everything in an AudioChunk that a stage relies on, before it touches any stream state."""
    check_id("stream_id", chunk["stream_id"])
    check_int("seq", chunk["seq"], 0, SEQ_MAX)
    check_int("capture_ts_ms", chunk["capture_ts_ms"], 0, TS_MS_MAX)
    check_format(chunk["sample_rate"], chunk["channels"])
    check_metadata(chunk["metadata"])


def check_sample(sample: dict) -> None:
    if sample.get("payload") is not None:
        check_format(sample["sample_rate"], sample["channels"])
    elif sample.get("uri") is not None:
        check_text("uri", sample["uri"], 1024)


def check_enrollment_request(request: dict) -> None:
    check_id("request_id", request["request_id"])
    check_id("speaker_id", request["speaker_id"])
    if request["mode"] != "DELETE":
        check_name(request["name"])
    check_int("requested_at_ms", request["requested_at_ms"], 0, TS_MS_MAX)
    check_int("samples", len(request["samples"]), 0, SAMPLES_MAX)
    for sample in request["samples"]:
        check_sample(sample)
    check_metadata(request["metadata"])


def check_verification_request(request: dict) -> None:
    check_id("request_id", request["request_id"])
    check_id("speaker_id", request["speaker_id"])
    check_int("requested_at_ms", request["requested_at_ms"], 0, TS_MS_MAX)
    check_sample(request["sample"])


def slug(name: str) -> str:
    """A speaker id made from a display name: lower-case letters, digits and dashes."""
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().lower()
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:64]


def _excerpt(value: str) -> str:
    return repr(value[:40] + ("..." if len(value) > 40 else ""))
