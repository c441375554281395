"""Voice activity detection with silero-vad, for whole files and for chunked streams.

Both paths run the same frame-level hysteresis (:class:`_Hysteresis`) over the same per-frame model
outputs, so a stream fed in arbitrary chunks yields exactly the regions of the whole-file call. The
hysteresis follows silero's ``get_speech_timestamps`` (without ``max_speech_duration_s``) but is
causal: every decision uses only frames already seen.

Silero's JIT model keeps its recurrent state inside the module, so one model instance must never
serve two streams (or threads) at once: each :class:`StreamingVad` and each :func:`speech_regions`
call works on its own copy of the cached weights (a ~6 ms deepcopy).
"""

from __future__ import annotations

import copy
import functools
import warnings
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch

from processors.audio import TARGET_RATE, resample

# silero_vad.model calls torch.set_num_threads(1) at import time; thread policy belongs to callers.
_threads = torch.get_num_threads()
from silero_vad import load_silero_vad  # noqa: E402

torch.set_num_threads(_threads)

# Silero consumes fixed frames: 512 samples at 16 kHz, 256 at 8 kHz (32 ms either way).
_FRAME_SAMPLES = {16000: 512, 8000: 256}


@dataclass(frozen=True)
class VadConfig:
    """Hysteresis settings applied to silero's per-frame speech probabilities."""

    threshold: float = 0.5  # a frame at or above this probability is speech (opens a region)
    min_speech_ms: int = 250  # regions shorter than this are dropped; also the latency of 'start' events
    min_silence_ms: int = 300  # silence needed to close a region (bridges short pauses between words)
    speech_pad_ms: int = 60  # widen each region by this much on both sides (never overlapping)
    neg_threshold: float | None = None  # a frame below this is silence; None = max(threshold - 0.15, 0.01)

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if min(self.min_speech_ms, self.min_silence_ms, self.speech_pad_ms) < 0:
            raise ValueError("min_speech_ms, min_silence_ms and speech_pad_ms must not be negative")

    @property
    def exit_threshold(self) -> float:
        return self.neg_threshold if self.neg_threshold is not None else max(self.threshold - 0.15, 0.01)


_Raw = tuple[Literal["start", "end"], int]  # an event in samples, before conversion to seconds


class SpeechEvent(NamedTuple):
    """A region boundary, in seconds from the start of the stream."""

    kind: Literal["start", "end"]
    time_s: float


@functools.lru_cache(maxsize=1)
def load_vad_model() -> torch.jit.ScriptModule:
    """The shared silero JIT model (weights ship in the wheel). Stateful: copy it per stream."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load deprecation notice
        return load_silero_vad(onnx=False)


def new_vad_model() -> torch.jit.ScriptModule:
    """An independent, freshly reset copy of the cached model for one stream or one call."""
    model = copy.deepcopy(load_vad_model())
    model.reset_states()
    return model


def _frame_samples(sample_rate: int) -> int:
    if sample_rate not in _FRAME_SAMPLES:
        raise ValueError(f"silero VAD runs at 8000 or 16000 Hz, not {sample_rate}")
    return _FRAME_SAMPLES[sample_rate]


class _Hysteresis:
    """Turns per-frame probabilities into start/end events, in samples, one frame at a time.

    A region opens at a frame >= threshold, survives dips that stay above the exit threshold or
    last less than min_silence, and closes at the first frame of that silence. 'start' is emitted
    once the region is certain to exceed min_speech (so dropped blips emit nothing); 'end' when the
    silence is confirmed or the stream ends. Padding never crosses the previous region's end nor
    audio not yet seen; that is where it departs from silero, which (offline) splits gaps shorter
    than 2 * speech_pad at their middle. With min_silence_ms >= 2 * speech_pad_ms (the defaults)
    such gaps cannot occur and the regions equal silero's sample for sample.
    """

    def __init__(self, config: VadConfig, sample_rate: int) -> None:
        def samples(ms: float) -> int:
            return round(sample_rate * ms / 1000)

        self._threshold = config.threshold
        self._exit = config.exit_threshold
        self._min_speech = samples(config.min_speech_ms)
        self._min_silence = samples(config.min_silence_ms)
        self._pad = samples(config.speech_pad_ms)
        self._frame = _frame_samples(sample_rate)
        self.triggered = False
        self._start = 0  # first sample of the open region (unpadded)
        self._silence_from: int | None = None  # first sample of a pending silence inside the region
        self._confirmed = False  # 'start' already emitted for the open region
        self._last_end = 0  # padded end of the last emitted region

    def step(self, index: int, prob: float, frame_end: int) -> list[_Raw]:
        """Feed frame ``index``; ``frame_end`` is where its real samples end (a short last frame
        was zero-padded for the model)."""
        position = index * self._frame
        events: list[_Raw] = []
        if prob >= self._threshold and self._silence_from is not None:
            self._silence_from = None
        if prob >= self._threshold and not self.triggered:
            self.triggered, self._start, self._confirmed = True, position, False
        elif prob < self._exit and self.triggered:
            if self._silence_from is None:
                self._silence_from = position
            if position - self._silence_from >= self._min_silence:
                return self._close(self._silence_from, min(self._silence_from + self._pad, frame_end))
        if self.triggered and not self._confirmed:
            # The region's end can be no earlier than this: the pending silence or the frame's end.
            floor = self._silence_from if self._silence_from is not None else frame_end
            if floor - self._start > self._min_speech:
                events.append(self._confirm())
        return events

    def finish(self, total: int) -> list[_Raw]:
        """Close an open region at the end of the stream (``total`` real samples)."""
        if not self.triggered:
            return []
        return self._close(total, total)

    def _confirm(self) -> _Raw:
        self._confirmed = True
        return ("start", max(self._start - self._pad, self._last_end, 0))

    def _close(self, end: int, padded_end: int) -> list[_Raw]:
        events: list[_Raw] = []
        if end - self._start > self._min_speech:
            if not self._confirmed:
                events.append(self._confirm())
            events.append(("end", padded_end))
            self._last_end = padded_end
        self.triggered, self._silence_from, self._confirmed = False, None, False
        return events


def _frame_prob(model: torch.jit.ScriptModule, frame: np.ndarray, sample_rate: int) -> float:
    return float(model(torch.from_numpy(frame), sample_rate).item())


def frame_probabilities(
    samples: np.ndarray, sample_rate: int = TARGET_RATE, model: torch.jit.ScriptModule | None = None
) -> np.ndarray:
    """Speech probability of each 32 ms frame (512 samples at 16 kHz; the last one zero-padded).

    ``model`` is reset and used exclusively for the call; None uses a private copy of the cache.
    """
    frame = _frame_samples(sample_rate)
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    count = -(-samples.size // frame)
    padded = np.zeros(count * frame, dtype=np.float32)
    padded[: samples.size] = samples
    model = model if model is not None else new_vad_model()
    model.reset_states()
    with torch.inference_mode():
        return np.array(
            [_frame_prob(model, padded[i * frame : (i + 1) * frame], sample_rate) for i in range(count)],
            dtype=np.float32,
        )


def regions_from_probabilities(
    probs: np.ndarray, num_samples: int, sample_rate: int = TARGET_RATE, config: VadConfig = VadConfig()
) -> list[tuple[float, float]]:
    """Speech regions (start_s, end_s) from per-frame probabilities of ``num_samples`` samples."""
    frame = _frame_samples(sample_rate)
    machine = _Hysteresis(config, sample_rate)
    events: list[_Raw] = []
    for index, prob in enumerate(probs):
        events += machine.step(index, float(prob), min((index + 1) * frame, num_samples))
    events += machine.finish(num_samples)
    times = [at / sample_rate for _, at in events]
    return list(zip(times[0::2], times[1::2], strict=True))


def speech_regions(
    samples: np.ndarray, sample_rate: int = TARGET_RATE, config: VadConfig = VadConfig()
) -> list[tuple[float, float]]:
    """Speech regions (start_s, end_s) of a whole mono recording. Rates other than 8/16 kHz are
    resampled to 16 kHz first."""
    if sample_rate not in _FRAME_SAMPLES:
        samples, sample_rate = resample(samples, sample_rate, TARGET_RATE), TARGET_RATE
    samples = np.asarray(samples, dtype=np.float32)
    probs = frame_probabilities(samples, sample_rate)
    return regions_from_probabilities(probs, samples.size, sample_rate, config)


def speech_mask(
    probs: np.ndarray, num_samples: int, sample_rate: int = TARGET_RATE, config: VadConfig = VadConfig()
) -> np.ndarray:
    """Boolean per-frame mask (True = inside a speech region) for the given frame probabilities."""
    frame = _frame_samples(sample_rate)
    centres = (np.arange(len(probs)) + 0.5) * frame / sample_rate
    mask = np.zeros(len(probs), dtype=bool)
    for start, end in regions_from_probabilities(probs, num_samples, sample_rate, config):
        mask |= (centres >= start) & (centres < end)
    return mask


class StreamingVad:
    """Chunk-by-chunk VAD for one stream: any chunk length in, region events out.

    Owns its model copy (silero state lives in the module), so instances are independent but each
    one must be driven by one thread at a time. Event times count from the first pushed sample;
    'start' events lag the audio by about min_speech_ms, 'end' events by about min_silence_ms.
    """

    def __init__(self, config: VadConfig = VadConfig(), sample_rate: int = TARGET_RATE) -> None:
        self.config = config
        self.sample_rate = sample_rate
        self._frame = _frame_samples(sample_rate)
        self._model = new_vad_model()
        self._machine = _Hysteresis(config, sample_rate)
        self._pending = np.zeros(0, dtype=np.float32)  # samples not yet forming a whole frame
        self._frames = 0  # frames sent to the model
        self._seen = 0  # real samples received
        self._finished = False
        self.last_probs = np.zeros(0, dtype=np.float32)  # frame probabilities of the latest push/flush

    @property
    def in_speech(self) -> bool:
        """True while a region is open (possibly not yet confirmed by min_speech_ms)."""
        return self._machine.triggered

    @property
    def processed_s(self) -> float:
        """Seconds of audio received so far."""
        return self._seen / self.sample_rate

    def push(self, chunk: np.ndarray) -> list[SpeechEvent]:
        """Feed the next float32 mono chunk at ``sample_rate``; returns the events it completes."""
        if self._finished:
            raise RuntimeError("StreamingVad.push after flush(); create a new instance per stream")
        chunk = np.asarray(chunk, dtype=np.float32).reshape(-1)
        if not chunk.flags.writeable:  # torch.from_numpy warns on read-only buffers (np.frombuffer)
            chunk = chunk.copy()
        self._seen += chunk.size
        buffered = np.concatenate([self._pending, chunk]) if self._pending.size else chunk
        whole = buffered.size // self._frame * self._frame
        self._pending = buffered[whole:].copy()
        return self._run(buffered[:whole])

    def flush(self) -> list[SpeechEvent]:
        """End of stream: score the zero-padded tail and close any open region."""
        if self._finished:
            return []
        self._finished = True
        tail = np.zeros(self._frame if self._pending.size else 0, dtype=np.float32)
        tail[: self._pending.size] = self._pending
        self._pending = tail[:0]
        events = self._run(tail)
        return events + self._events(self._machine.finish(self._seen))

    def _run(self, frames: np.ndarray) -> list[SpeechEvent]:
        count = frames.size // self._frame
        probs = np.empty(count, dtype=np.float32)
        raw: list[_Raw] = []
        with torch.inference_mode():
            for i in range(count):
                frame = frames[i * self._frame : (i + 1) * self._frame]
                probs[i] = _frame_prob(self._model, frame, self.sample_rate)
                frame_end = min((self._frames + 1) * self._frame, self._seen)
                raw += self._machine.step(self._frames, float(probs[i]), frame_end)
                self._frames += 1
        self.last_probs = probs
        return self._events(raw)

    def _events(self, raw: list[_Raw]) -> list[SpeechEvent]:
        return [SpeechEvent(kind, at / self.sample_rate) for kind, at in raw]
