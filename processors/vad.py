"""Voice activity detection with silero-vad, for whole files and for chunked streams.

Both paths run the same frame-level hysteresis (:class:`_Hysteresis`) over the same per-frame model
outputs, so a stream fed in arbitrary chunks yields exactly the regions of the whole-file call. The
hysteresis follows silero's ``get_speech_timestamps`` (without ``max_speech_duration_s``) but is
causal: every decision uses only frames already seen.

At 16 kHz the model runs as silero's *sequence* ONNX export (in the same wheel): one ONNX Runtime call
scores a whole block of frames, with the recurrent state and the 64-sample context passed in and out, so a
3-s sample takes about 6 ms instead of about 50 ms of per-frame calls, with the same probabilities (within
3e-6). The state lives in :class:`SileroFrames`, one per stream; the ONNX session is shared (its `run` is
thread-safe). 8 kHz audio uses silero's JIT model, which keeps its state inside the module, so each
scorer works on its own copy of the cached weights (a ~6 ms deepcopy).
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from speakerflow.processors.audio import TARGET_RATE, resample

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


SEQUENCE_MODEL = "silero_vad_16k_sequence.onnx"
_CONTEXT_SAMPLES = {16000: 64, 8000: 32}  # silero prefixes each frame with the previous frame's tail
_BLOCK_FRAMES = 512  # frames per ONNX call (16 s): bounds the memory of one call on long files


@functools.lru_cache(maxsize=1)
def _sequence_session() -> Any:
    import onnxruntime as ort
    import silero_vad

    options = ort.SessionOptions()
    options.inter_op_num_threads = 1  # one frame block is small: threads would only add overhead
    options.intra_op_num_threads = 1
    path = Path(silero_vad.__file__).parent / "data" / SEQUENCE_MODEL
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


class SileroFrames:
    """Silero's speech probability per whole frame, with the recurrent state carried across calls."""

    def __init__(self, sample_rate: int = TARGET_RATE) -> None:
        self.frame = _frame_samples(sample_rate)
        self.sample_rate = sample_rate
        self._context_size = _CONTEXT_SAMPLES[sample_rate]
        self._jit = new_vad_model() if sample_rate != 16000 else None
        self.state = np.zeros((2, 1, 128), np.float32)  # LSTM (h, c)
        self.context = np.zeros((1, self._context_size), np.float32)

    def score(self, frames: np.ndarray) -> np.ndarray:
        """Probabilities of the whole frames in `frames` (a multiple of the frame length, in order)."""
        count = frames.size // self.frame
        if count == 0:
            return np.zeros(0, np.float32)
        blocks = np.ascontiguousarray(frames[: count * self.frame], np.float32).reshape(count, self.frame)
        if self._jit is not None:
            return self._score_jit(blocks)
        session, ctx = _sequence_session(), self._context_size
        out = []
        for first in range(0, count, _BLOCK_FRAMES):
            block = blocks[first : first + _BLOCK_FRAMES]
            contexts = np.concatenate([self.context, block[:-1, -ctx:]])
            inputs = np.concatenate([contexts, block], axis=1)
            probs, h, c = session.run(
                ["speech_probs", "hn", "cn"], {"input": inputs, "h": self.state[:1], "c": self.state[1:]}
            )
            self.state = np.concatenate([h, c]).astype(np.float32)
            self.context = block[-1:, -ctx:].copy()
            out.append(np.asarray(probs, np.float32).reshape(-1))
        return np.concatenate(out)

    def _score_jit(self, blocks: np.ndarray) -> np.ndarray:
        model = self._jit
        self._load_jit_state()
        with torch.inference_mode():
            probs = [float(model(torch.from_numpy(b.copy()), self.sample_rate).item()) for b in blocks]
        self.state = model._state.detach().numpy().copy()
        self.context = model._context.detach().numpy().copy()
        return np.asarray(probs, np.float32)

    def _load_jit_state(self) -> None:
        # Marking rate and batch as seen keeps the module from resetting the state on its next call.
        model = self._jit
        model._state = torch.from_numpy(self.state.copy())
        model._context = torch.from_numpy(self.context.copy())
        model._last_sr, model._last_batch_size = self.sample_rate, 1


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


def frame_probabilities(samples: np.ndarray, sample_rate: int = TARGET_RATE) -> np.ndarray:
    """Speech probability of each 32 ms frame (512 samples at 16 kHz; the last one zero-padded)."""
    frame = _frame_samples(sample_rate)
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    count = -(-samples.size // frame)
    padded = np.zeros(count * frame, dtype=np.float32)
    padded[: samples.size] = samples
    return SileroFrames(sample_rate).score(padded)


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


def speech_only(
    samples: np.ndarray, sample_rate: int = TARGET_RATE, config: VadConfig = VadConfig()
) -> np.ndarray:
    """The speech of a whole mono recording: its VAD regions joined (empty when there is none)."""
    samples = np.asarray(samples, dtype=np.float32)
    regions = speech_regions(samples, sample_rate, config)
    parts = [samples[int(a * sample_rate) : int(b * sample_rate)] for a, b in regions]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


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

    Owns its recurrent state (:class:`SileroFrames`), so instances are independent but each one must
    be driven by one thread at a time. Event times count from the first pushed sample;
    'start' events lag the audio by about min_speech_ms, 'end' events by about min_silence_ms.
    """

    def __init__(self, config: VadConfig = VadConfig(), sample_rate: int = TARGET_RATE) -> None:
        self.config = config
        self.sample_rate = sample_rate
        self._frame = _frame_samples(sample_rate)
        self.frames = SileroFrames(sample_rate)
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
        probs = self.frames.score(frames)
        raw: list[_Raw] = []
        for prob in probs:
            frame_end = min((self._frames + 1) * self._frame, self._seen)
            raw += self._machine.step(self._frames, float(prob), frame_end)
            self._frames += 1
        self.last_probs = probs
        return self._events(raw)

    def _events(self, raw: list[_Raw]) -> list[SpeechEvent]:
        return [SpeechEvent(kind, at / self.sample_rate) for kind, at in raw]


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run silero VAD on one intra-op thread: its per-frame calls are tiny, and on a busy 2-core
    machine two threads spent ~10x longer synchronising than computing (measured: 30 s vs 2.8 s
    for 27 s of audio). Embedding batches, which do gain from threads, run outside this block."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
