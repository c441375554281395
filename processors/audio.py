"""Audio decoding, PCM codecs and resampling: bytes in, float32 mono at a target rate out.

Pure compute: every parameter comes in as an argument. Samples are float32 in [-1, 1); integer PCM is
scaled by 1/32768 so that int16 -> float -> int16 round-trips exactly.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

TARGET_RATE = 16000

MIN_RATE = 4000
MAX_RATE = 192000
MAX_CHANNELS = 8
FILE_MAX_CHANNELS = 32  # channels a container file may declare before decoding is refused

# Bytes per sample of the raw encodings; the container encodings carry their own framing.
_RAW_WIDTHS = {"PCM_S16LE": 2, "PCM_F32LE": 4, "MULAW": 1, "ALAW": 1}
_CONTAINER_ENCODINGS = ("FLAC", "WAV", "OPUS_OGG", "MP3")
SUPPORTED_ENCODINGS: tuple[str, ...] = (*_RAW_WIDTHS, *_CONTAINER_ENCODINGS)


class AudioDecodeError(ValueError):
    """Input that cannot be turned into samples: undecodable, empty, malformed or unsupported."""


class AudioTooLong(AudioDecodeError):
    """Compressed audio that would decode to more than the caller allows (a decompression bomb)."""


# --------------------------------------------------------------------------------------------------
# G.711 (ITU-T) mu-law and A-law as in the Sun reference g711.c (bit-exact with CPython's audioop).
# Decoding is a 256-entry table; encoding a 65536-entry table indexed by the int16 sample, so both
# directions are a single vectorised lookup.
# --------------------------------------------------------------------------------------------------


def _mulaw_decode_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (u >> 4) & 0x07
    mantissa = u & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(u & 0x80, -magnitude, magnitude).astype(np.int16)


def _alaw_decode_table() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    segment = (a & 0x70) >> 4
    t = (a & 0x0F) << 4
    t = np.where(segment == 0, t + 8, t + 0x108)
    t = np.where(segment > 1, t << np.maximum(segment - 1, 0), t)
    return np.where(a & 0x80, t, -t).astype(np.int16)


def _mulaw_encode_table() -> np.ndarray:
    pcm = np.arange(-32768, 32768, dtype=np.int32) >> 2  # mu-law works on 14-bit samples
    mask = np.where(pcm < 0, 0x7F, 0xFF)
    magnitude = np.minimum(np.abs(pcm), 8159) + 33  # clip, then add the G.711 bias
    segment_ends = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
    segment = np.searchsorted(segment_ends, magnitude, side="left")
    code = (segment << 4) | ((magnitude >> (segment + 1)) & 0x0F)
    code = np.where(segment >= 8, 0x7F, code)  # beyond the last segment: the largest code
    return ((code ^ mask) & 0xFF).astype(np.uint8)


def _alaw_encode_table() -> np.ndarray:
    pcm = np.arange(-32768, 32768, dtype=np.int32) >> 3  # A-law works on 13-bit samples
    mask = np.where(pcm >= 0, 0xD5, 0x55)
    value = np.where(pcm >= 0, pcm, -pcm - 1)
    segment_ends = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])
    segment = np.searchsorted(segment_ends, value, side="left")
    shift = np.where(segment < 2, 1, segment)
    code = (np.minimum(segment, 7) << 4) | ((value >> shift) & 0x0F)
    code = np.where(segment >= 8, 0x7F, code)
    return ((code ^ mask) & 0xFF).astype(np.uint8)


_MULAW_DECODE = _mulaw_decode_table()
_ALAW_DECODE = _alaw_decode_table()
_MULAW_ENCODE = _mulaw_encode_table()
_ALAW_ENCODE = _alaw_encode_table()


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def to_mono(samples: np.ndarray) -> np.ndarray:
    """Average the channels of a (frames, channels) array; 1-D input passes through. Returns float32."""
    samples = np.asarray(samples)
    if samples.ndim == 1:
        return samples.astype(np.float32, copy=False)
    if samples.ndim != 2:
        raise AudioDecodeError(f"expected 1-D or (frames, channels) audio, got shape {samples.shape}")
    if samples.shape[1] == 1:
        return samples[:, 0].astype(np.float32, copy=False)
    return samples.mean(axis=1, dtype=np.float32)


def resample(samples: np.ndarray, orig_rate: int, target_rate: int = TARGET_RATE) -> np.ndarray:
    """Resample 1-D float32 audio with soxr (HQ); a no-op when the rates are equal."""
    samples = np.asarray(samples, dtype=np.float32)
    if orig_rate == target_rate or samples.size == 0:
        return samples
    return soxr.resample(samples, orig_rate, target_rate, quality="HQ")


class StreamResampler:
    """Chunk-by-chunk resampler that keeps filter state across chunks, so boundaries add no clicks.

    Output lags input by the filter delay; pass ``last=True`` with the final chunk (possibly empty) to
    drain it. The concatenated output matches one-shot :func:`resample` to within float rounding.
    """

    def __init__(self, orig_rate: int, target_rate: int = TARGET_RATE) -> None:
        self.orig_rate = orig_rate
        self.target_rate = target_rate
        self._stream = (
            None
            if orig_rate == target_rate
            else soxr.ResampleStream(orig_rate, target_rate, 1, dtype="float32", quality="HQ")
        )

    def process(self, chunk: np.ndarray, last: bool = False) -> np.ndarray:
        """Resample the next 1-D float32 chunk; returns whatever output is ready."""
        chunk = np.asarray(chunk, dtype=np.float32)
        if self._stream is None:
            return chunk
        return self._stream.resample_chunk(chunk, last=last)


# --------------------------------------------------------------------------------------------------
# Files and containers
# --------------------------------------------------------------------------------------------------


def _describe(source: str | Path | bytes) -> str:
    return f"{len(source)}-byte buffer" if isinstance(source, bytes) else f"file {str(source)!r}"


def _too_long(what: str, seconds: float, max_seconds: float) -> AudioTooLong:
    return AudioTooLong(
        f"{what} decodes to {seconds:.0f} s of audio; at most {max_seconds:.0f} s are accepted"
    )


def _read_soundfile(source: str | Path | bytes, max_seconds: float | None) -> tuple[np.ndarray, int]:
    handle = io.BytesIO(source) if isinstance(source, bytes) else source
    frames = -1
    if max_seconds is not None:
        # The header says how long the audio is: refuse before decoding (a small FLAC of an hour of
        # silence decodes to hundreds of MB), and never read more frames than allowed even if it lies.
        info = sf.info(handle)
        if info.channels > FILE_MAX_CHANNELS:
            raise AudioDecodeError(f"{info.channels} channels; at most {FILE_MAX_CHANNELS} are accepted")
        if info.frames > max_seconds * info.samplerate:
            raise _too_long(_describe(source), info.frames / info.samplerate, max_seconds)
        frames = int(max_seconds * info.samplerate) + 1
        if isinstance(handle, io.BytesIO):
            handle.seek(0)
    data, rate = sf.read(handle, frames=frames, dtype="float32", always_2d=True)
    if max_seconds is not None and len(data) > max_seconds * rate:
        raise _too_long(_describe(source), len(data) / rate, max_seconds)
    return to_mono(data), int(rate)


def _read_torchcodec(source: str | Path | bytes, max_seconds: float | None) -> tuple[np.ndarray, int]:
    # Imported lazily: it loads the system FFmpeg libraries, which only the fallback path needs.
    from torchcodec.decoders import AudioDecoder

    decoder = AudioDecoder(str(source) if isinstance(source, Path) else source)
    if max_seconds is not None:
        seconds = decoder.metadata.duration_seconds_from_header
        if seconds is None or seconds > max_seconds:
            raise _too_long(_describe(source), seconds or float("inf"), max_seconds)
    decoded = decoder.get_all_samples()
    data = decoded.data.numpy()  # (channels, frames)
    return to_mono(data.T), int(decoded.sample_rate)


def _short_reason(exc: BaseException) -> str:
    # Decoder errors can span many lines (FFmpeg logs, C++ traces); keep one readable line.
    if isinstance(exc, sf.LibsndfileError):
        return exc.error_string.rstrip(".")
    text = str(exc).strip()
    if text.startswith("Could not load libtorchcodec"):
        return "the FFmpeg libraries it needs are not installed"
    lines = text.splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:200]


def _reject_missing_or_empty(source: str | Path | bytes, what: str) -> None:
    # Checked up front: decoders report these cases as a vague "format not recognised".
    if isinstance(source, bytes):
        if not source:
            raise AudioDecodeError(f"{what} contains no samples: the input is empty")
    elif not Path(source).is_file():
        raise AudioDecodeError(f"{what} cannot be decoded: no such file")
    elif Path(source).stat().st_size == 0:
        raise AudioDecodeError(f"{what} contains no samples: the file is empty")


def decode_file(
    path_or_bytes: str | Path | bytes, *, target_rate: int = TARGET_RATE, max_seconds: float | None = None
) -> np.ndarray:
    """Decode an audio file (path or the file's bytes) to float32 mono at ``target_rate``.

    soundfile (libsndfile) handles WAV/FLAC/OGG/MP3 quickly; anything it rejects (M4A/AAC, Opus in
    other containers, ...) goes to torchcodec, which needs the system FFmpeg libraries.
    Raises AudioDecodeError for missing, empty, undecodable or non-finite input, and AudioTooLong for
    input longer than ``max_seconds`` (checked from the header before decoding, memory bounded).
    """
    what = _describe(path_or_bytes)
    _reject_missing_or_empty(path_or_bytes, what)
    try:
        samples, rate = _read_soundfile(path_or_bytes, max_seconds)
    except AudioDecodeError:
        raise
    except Exception as sf_exc:  # libsndfile raises several types; any failure means "try FFmpeg"
        try:
            samples, rate = _read_torchcodec(path_or_bytes, max_seconds)
        except AudioDecodeError:
            raise
        except Exception as tc_exc:
            raise AudioDecodeError(
                f"{what} cannot be decoded: libsndfile: {_short_reason(sf_exc)}; "
                f"torchcodec fallback: {_short_reason(tc_exc)}"
            ) from tc_exc
    if samples.size == 0:
        raise AudioDecodeError(f"{what} contains no samples")
    if not np.isfinite(samples).all():
        raise AudioDecodeError(f"{what} contains non-finite samples (NaN or infinity)")
    return resample(samples, rate, target_rate)


# --------------------------------------------------------------------------------------------------
# Raw PCM chunks
# --------------------------------------------------------------------------------------------------


def _normalise_encoding(encoding: str) -> str:
    name = str(encoding).upper()
    if name not in SUPPORTED_ENCODINGS:
        raise AudioDecodeError(
            f"unsupported encoding {encoding!r}; supported: {', '.join(SUPPORTED_ENCODINGS)}"
        )
    return name


def _validate_format(sample_rate: int, channels: int) -> None:
    if not MIN_RATE <= sample_rate <= MAX_RATE:
        raise AudioDecodeError(f"sample_rate {sample_rate} is outside {MIN_RATE}..{MAX_RATE} Hz")
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioDecodeError(f"channels {channels} is outside 1..{MAX_CHANNELS}")


def _raw_to_float(payload: bytes, encoding: str) -> np.ndarray:
    if encoding == "PCM_S16LE":
        return np.frombuffer(payload, dtype="<i2").astype(np.float32) / 32768.0
    if encoding == "PCM_F32LE":
        samples = np.frombuffer(payload, dtype="<f4").astype(np.float32)
        if not np.isfinite(samples).all():
            raise AudioDecodeError("PCM_F32LE payload contains non-finite samples (NaN or infinity)")
        return samples
    table = _MULAW_DECODE if encoding == "MULAW" else _ALAW_DECODE
    return table[np.frombuffer(payload, dtype=np.uint8)].astype(np.float32) / 32768.0


def decode_pcm(
    payload: bytes,
    encoding: str,
    sample_rate: int,
    channels: int,
    *,
    target_rate: int = TARGET_RATE,
    max_seconds: float | None = None,
) -> np.ndarray:
    """Decode one audio chunk to float32 mono at ``target_rate``.

    ``encoding`` is a case-insensitive name from the Avro enum (see SUPPORTED_ENCODINGS). Raw
    encodings are interleaved little-endian frames described by ``sample_rate`` and ``channels``;
    container encodings (FLAC, WAV, OPUS_OGG, MP3) are whole files whose own header wins over those
    two arguments (which are still range-checked). An empty payload is legal (an empty chunk, e.g.
    an end-of-stream marker) and returns an empty array.

    Each chunk is resampled on its own; for a continuous stream at a foreign rate decode at the
    native rate (``target_rate=sample_rate``) and feed a :class:`StreamResampler` instead.
    ``max_seconds`` bounds what a container payload may decode to (see decode_file).
    """
    name = _normalise_encoding(encoding)
    _validate_format(sample_rate, channels)
    if not payload:
        return np.zeros(0, dtype=np.float32)
    if name in _CONTAINER_ENCODINGS:
        return decode_file(bytes(payload), target_rate=target_rate, max_seconds=max_seconds)
    frame_size = _RAW_WIDTHS[name] * channels
    if len(payload) % frame_size:
        raise AudioDecodeError(
            f"{name} payload of {len(payload)} bytes is not a whole number of {frame_size}-byte frames "
            f"({channels} channel(s) x {_RAW_WIDTHS[name]} byte(s))"
        )
    samples = to_mono(_raw_to_float(payload, name).reshape(-1, channels))
    return resample(samples, sample_rate, target_rate)


def encode_pcm(samples: np.ndarray, encoding: str) -> bytes:
    """Encode float audio (clipped to [-1, 1)) as PCM_S16LE, PCM_F32LE, MULAW or ALAW bytes.

    A (frames, channels) array comes out interleaved, as decode_pcm expects.
    """
    name = _normalise_encoding(encoding)
    samples = np.asarray(samples, dtype=np.float32).reshape(-1)
    if not np.isfinite(samples).all():
        raise AudioDecodeError("cannot encode non-finite samples (NaN or infinity)")
    if name == "PCM_F32LE":
        return samples.astype("<f4").tobytes()
    if name not in _RAW_WIDTHS:
        raise AudioDecodeError(f"encode_pcm supports only {', '.join(_RAW_WIDTHS)}, not {name}")
    pcm16 = np.clip(np.rint(samples * 32768.0), -32768, 32767).astype(np.int32)
    if name == "PCM_S16LE":
        return pcm16.astype("<i2").tobytes()
    table = _MULAW_ENCODE if name == "MULAW" else _ALAW_ENCODE
    return table[pcm16 + 32768].tobytes()
