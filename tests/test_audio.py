"""Tests for processors.audio: PCM codecs, container decoding, resampling."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speakerflow.processors.audio import (
    SUPPORTED_ENCODINGS,
    TARGET_RATE,
    AudioDecodeError,
    StreamResampler,
    decode_file,
    decode_pcm,
    encode_pcm,
    resample,
    to_mono,
)


def sine(freq: float, rate: int, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(samples.size)))
    return float(np.fft.rfftfreq(samples.size, 1 / rate)[np.argmax(spectrum)])


# --- PCM codecs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "tolerance"),
    # G.711 keeps ~8 bits of mantissa: error grows with amplitude, under 1/32 near full scale.
    [("PCM_S16LE", 0.5 / 32768), ("PCM_F32LE", 0.0), ("MULAW", 1 / 32), ("ALAW", 1 / 32)],
)
def test_encode_decode_round_trip(encoding: str, tolerance: float) -> None:
    rng = np.random.default_rng(0)
    samples = rng.uniform(-0.99, 0.99, 4000).astype(np.float32)
    payload = encode_pcm(samples, encoding)
    decoded = decode_pcm(payload, encoding.lower(), TARGET_RATE, 1)
    assert decoded.dtype == np.float32 and decoded.shape == samples.shape
    assert np.max(np.abs(decoded - samples)) <= tolerance


@pytest.mark.parametrize("encoding", ["MULAW", "ALAW"])
def test_g711_relative_error_small_for_quiet_signals(encoding: str) -> None:
    samples = sine(300, TARGET_RATE, 0.1, amplitude=0.01)
    decoded = decode_pcm(encode_pcm(samples, encoding), encoding, TARGET_RATE, 1)
    assert np.max(np.abs(decoded - samples)) < 0.01 * 0.07  # logarithmic: precision tracks level


@pytest.mark.parametrize(("encoding", "reference"), [("MULAW", "lin2ulaw"), ("ALAW", "lin2alaw")])
def test_g711_bit_exact_with_audioop(encoding: str, reference: str) -> None:
    audioop = pytest.importorskip("audioop", reason="audioop left the stdlib in Python 3.13")
    pcm = np.arange(-32768, 32768, dtype=np.int16)
    expected = getattr(audioop, reference)(pcm.astype("<i2").tobytes(), 2)
    assert encode_pcm(pcm.astype(np.float32) / 32768, encoding) == expected
    decoder = "ulaw2lin" if encoding == "MULAW" else "alaw2lin"
    codes = bytes(range(256))
    expected_lin = np.frombuffer(getattr(audioop, decoder)(codes, 2), "<i2") / 32768
    np.testing.assert_array_equal(decode_pcm(codes, encoding, TARGET_RATE, 1), expected_lin)


def test_decode_pcm_downmixes_interleaved_stereo() -> None:
    left, right = np.full(100, 0.5, np.float32), np.full(100, -0.25, np.float32)
    interleaved = np.stack([left, right], axis=1).reshape(-1)
    decoded = decode_pcm(encode_pcm(interleaved, "PCM_F32LE"), "PCM_F32LE", TARGET_RATE, 2)
    assert decoded.shape == (100,)
    np.testing.assert_allclose(decoded, 0.125)


def test_to_mono_averages_channels() -> None:
    np.testing.assert_allclose(to_mono(np.array([[1.0, 0.0], [0.5, 0.5]])), [0.5, 0.5])
    assert to_mono(np.ones(3)).dtype == np.float32


def test_decode_pcm_resamples_to_target() -> None:
    samples = sine(440, 8000)
    decoded = decode_pcm(encode_pcm(samples, "PCM_S16LE"), "PCM_S16LE", 8000, 1)
    assert decoded.size == TARGET_RATE
    assert abs(peak_hz(decoded, TARGET_RATE) - 440) < 2


def test_empty_payload_is_an_empty_chunk() -> None:
    for encoding in SUPPORTED_ENCODINGS:
        decoded = decode_pcm(b"", encoding, TARGET_RATE, 1)
        assert decoded.dtype == np.float32 and decoded.size == 0


@pytest.mark.parametrize(
    ("payload", "encoding", "rate", "channels", "message"),
    [
        (b"\x00\x01\x02", "PCM_S16LE", 16000, 1, "not a whole number of 2-byte frames"),
        (b"\x00" * 6, "PCM_S16LE", 16000, 2, "not a whole number of 4-byte frames"),
        (b"\x00" * 6, "PCM_F32LE", 16000, 1, "not a whole number of 4-byte frames"),
        (b"\x00" * 3, "MULAW", 8000, 2, "not a whole number of 2-byte frames"),
        (b"\x00" * 4, "PCM_S16LE", 3999, 1, "sample_rate 3999"),
        (b"\x00" * 4, "PCM_S16LE", 192001, 1, "sample_rate 192001"),
        (b"\x00" * 4, "PCM_S16LE", 16000, 0, "channels 0"),
        (b"\x00" * 18, "PCM_S16LE", 16000, 9, "channels 9"),
        (np.array([0.0, np.nan], "<f4").tobytes(), "PCM_F32LE", 16000, 1, "non-finite"),
        (np.array([np.inf], "<f4").tobytes(), "PCM_F32LE", 16000, 1, "non-finite"),
    ],
)
def test_decode_pcm_rejects_malformed(
    payload: bytes, encoding: str, rate: int, channels: int, message: str
) -> None:
    with pytest.raises(AudioDecodeError, match=message):
        decode_pcm(payload, encoding, rate, channels)


def test_unknown_encoding_names_supported_ones() -> None:
    with pytest.raises(AudioDecodeError, match=r"unsupported encoding 'AMR'.*PCM_S16LE.*MULAW.*OPUS_OGG"):
        decode_pcm(b"\x00\x00", "AMR", 16000, 1)
    with pytest.raises(AudioDecodeError, match="encode_pcm supports only"):
        encode_pcm(np.zeros(4, np.float32), "FLAC")


def test_decode_pcm_container_encoding_uses_file_header() -> None:
    buffer = io.BytesIO()
    sf.write(buffer, sine(440, 22050), 22050, format="FLAC")
    decoded = decode_pcm(buffer.getvalue(), "flac", 16000, 1)
    assert decoded.size == TARGET_RATE
    assert abs(peak_hz(decoded, TARGET_RATE) - 440) < 2


# --- Files -----------------------------------------------------------------------------------------


def stereo(rate: int) -> np.ndarray:
    return np.stack([sine(440, rate), sine(440, rate, amplitude=0.1)], axis=1)


@pytest.mark.parametrize(
    ("fmt", "subtype", "suffix", "tolerance"),
    [
        ("WAV", "PCM_16", ".wav", 1e-3),
        ("FLAC", "PCM_16", ".flac", 1e-3),
        ("OGG", "VORBIS", ".ogg", 0.05),
        ("OGG", "OPUS", ".opus", 0.05),
        ("MP3", "MPEG_LAYER_III", ".mp3", 0.05),
    ],
)
def test_decode_file_formats(tmp_path: Path, fmt: str, subtype: str, suffix: str, tolerance: float) -> None:
    if subtype not in sf.available_subtypes(fmt):
        pytest.skip(f"this libsndfile ({sf.__libsndfile_version__}) cannot write {fmt}/{subtype}")
    rate = 48000 if subtype == "OPUS" else 44100  # Opus has no 44.1 kHz mode
    audio = stereo(rate)
    path = tmp_path / f"tone{suffix}"
    sf.write(path, audio, rate, format=fmt, subtype=subtype)
    for source in (path, str(path), path.read_bytes()):
        decoded = decode_file(source)
        assert decoded.dtype == np.float32 and decoded.ndim == 1
        assert abs(decoded.size - TARGET_RATE) <= 0.05 * TARGET_RATE  # codecs may trim or pad a frame
        assert abs(peak_hz(decoded, TARGET_RATE) - 440) < 3
        # Mean of 0.5 and 0.1 amplitude channels in phase: 0.3 peak.
        assert abs(np.percentile(np.abs(decoded), 99.9) - 0.3) < tolerance + 0.01


def test_decode_file_target_rate(tmp_path: Path) -> None:
    path = tmp_path / "tone.wav"
    sf.write(path, sine(1000, 16000), 16000)
    assert decode_file(path, target_rate=8000).size == 8000


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "contains no samples"),
        (b"this is not audio at all" * 40, "cannot be decoded: libsndfile: Format not recognised"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", "cannot be decoded"),
    ],
)
def test_decode_file_rejects_garbage(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    for source in (content, path):
        with pytest.raises(AudioDecodeError, match=message) as info:
            decode_file(source)
        text = str(info.value)
        assert "\n" not in text and len(text) < 400, text  # one readable line, no decoder dump


def test_decode_file_rejects_header_only_wav(tmp_path: Path) -> None:
    path = tmp_path / "silent.wav"
    sf.write(path, np.zeros((0, 2), np.float32), 44100)
    with pytest.raises(AudioDecodeError, match="contains no samples"):
        decode_file(path)


def test_decode_file_missing(tmp_path: Path) -> None:
    with pytest.raises(AudioDecodeError, match="no such file"):
        decode_file(tmp_path / "missing.flac")


# --- Resampling ------------------------------------------------------------------------------------


def test_resample_8k_to_16k_keeps_frequency() -> None:
    samples = sine(1000, 8000, seconds=2.0)
    out = resample(samples, 8000, 16000)
    assert out.dtype == np.float32 and out.size == 2 * samples.size
    assert abs(peak_hz(out, 16000) - 1000) < 1


def test_resample_same_rate_is_identity() -> None:
    samples = sine(1000, 16000)
    assert resample(samples, 16000, 16000) is samples
    assert resample(np.zeros(0, np.float32), 8000, 16000).size == 0


@pytest.mark.parametrize(("orig", "target"), [(8000, 16000), (44100, 16000), (16000, 16000)])
def test_stream_resampler_matches_one_shot(orig: int, target: int) -> None:
    rng = np.random.default_rng(1)
    samples = (sine(440, orig, 2.0) + 0.05 * rng.standard_normal(2 * orig)).astype(np.float32)
    one_shot = resample(samples, orig, target)
    stream = StreamResampler(orig, target)
    parts, position = [], 0
    while position < samples.size:
        size = int(rng.integers(1, 3000))
        parts.append(stream.process(samples[position : position + size]))
        position += size
    parts.append(stream.process(np.zeros(0, np.float32), last=True))
    chunked = np.concatenate(parts)
    assert abs(chunked.size - one_shot.size) <= 1
    n = min(chunked.size, one_shot.size)
    np.testing.assert_allclose(chunked[:n], one_shot[:n], atol=1e-4)
