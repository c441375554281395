"""Online diarization of one stream: audio in, speech windows out, labelled turns back.

The work is split in two steps so that embeddings can be computed elsewhere (a batcher shared by all
streams of a worker):

1. `push_audio(samples)` runs streaming VAD and returns the windows that are complete.
2. `add_embeddings(windows, embeddings)` clusters them online and returns turn updates: a provisional
   update each time the open turn grows, and a final one when the turn ends.

Each window *owns* the stretch of time around its centre (half a hop either side), so turns tile the
speech without overlap; the first window of a speech region owns back to the region start and the
region's tail window owns up to its end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from processors.clustering import OnlineClustering
from processors.vad import SpeechEvent, StreamingVad, VadConfig


@dataclass(frozen=True)
class Window:
    start_s: float
    end_s: float
    own_start_s: float  # the part of the timeline this window's label is given to
    own_end_s: float
    samples: np.ndarray


@dataclass
class TurnUpdate:
    turn_index: int
    label: str
    start_s: float
    end_s: float
    embedding: np.ndarray  # normalised mean of the turn's windows
    window_count: int
    is_final: bool


@dataclass
class _Turn:
    index: int
    label: int
    start_s: float
    end_s: float
    emb_sum: np.ndarray
    window_count: int = 1

    def update(self, final: bool, label_of: int) -> TurnUpdate:
        mean = self.emb_sum / max(np.linalg.norm(self.emb_sum), 1e-12)
        return TurnUpdate(
            self.index,
            label_name(label_of),
            self.start_s,
            self.end_s,
            mean.astype(np.float32),
            self.window_count,
            final,
        )


def label_name(index: int) -> str:
    return f"SPEAKER_{index:02d}"


@dataclass
class StreamDiarizer:
    """State of one stream. `window_s`/`hop_s` set the embedding windows; `max_gap_s` is the longest
    pause inside one turn; `min_window_s` is the shortest speech region that gets a label."""

    window_s: float = 1.5
    hop_s: float = 0.75
    max_gap_s: float = 0.5
    min_window_s: float = 0.4
    sample_rate: int = 16000
    vad_config: VadConfig = field(default_factory=VadConfig)
    clustering: OnlineClustering = field(default_factory=OnlineClustering)

    def __post_init__(self) -> None:
        self._vad = StreamingVad(self.vad_config, self.sample_rate)
        self._audio = np.zeros(0, np.float32)
        self._audio_start = 0  # sample index of self._audio[0]
        self._region_start: float | None = None
        self._next_start = 0.0  # start of the next window inside the open region
        self._owned_until = 0.0  # end of the time already given to a window
        self._turn: _Turn | None = None
        self._turn_count = 0

    @property
    def audio_s(self) -> float:
        return (self._audio_start + len(self._audio)) / self.sample_rate

    def push_audio(self, samples: np.ndarray) -> list[Window]:
        self._audio = np.concatenate([self._audio, np.asarray(samples, np.float32)])
        windows: list[Window] = []
        for event in self._vad.push(samples):
            windows += self._on_event(event)
        windows += self._complete_windows(self.audio_s)
        self._trim_audio()
        return windows

    def end_audio(self) -> list[Window]:
        """Stream end: close the open speech region and return its last windows."""
        windows: list[Window] = []
        for event in self._vad.flush():
            windows += self._on_event(event)
        return windows

    def _on_event(self, event: SpeechEvent) -> list[Window]:
        if event.kind == "start":
            self._region_start = event.time_s
            self._next_start = event.time_s
            self._owned_until = event.time_s
            return []
        if self._region_start is None:
            return []
        windows = self._complete_windows(event.time_s)
        windows += self._tail_window(event.time_s)
        self._region_start = None
        return windows

    def _complete_windows(self, horizon_s: float) -> list[Window]:
        """Full windows of the open region that end before `horizon_s`."""
        out: list[Window] = []
        if self._region_start is None:
            return out
        while self._next_start + self.window_s <= horizon_s + 1e-9:
            start = self._next_start
            own_end = start + self.window_s / 2 + self.hop_s / 2
            out.append(self._window(start, start + self.window_s, self._owned_until, own_end))
            self._owned_until = own_end
            self._next_start = start + self.hop_s
        return out

    def _tail_window(self, region_end_s: float) -> list[Window]:
        """The window that ends the region, so the region's last stretch gets a label too."""
        assert self._region_start is not None
        if region_end_s - self._owned_until <= 1e-3:
            return []
        start = max(self._region_start, region_end_s - self.window_s)
        if region_end_s - start < self.min_window_s:
            return []
        return [self._window(start, region_end_s, self._owned_until, region_end_s)]

    def _window(self, start: float, end: float, own_start: float, own_end: float) -> Window:
        first = round(start * self.sample_rate) - self._audio_start
        last = round(end * self.sample_rate) - self._audio_start
        samples = self._audio[max(first, 0) : max(last, 0)].copy()
        return Window(start, end, own_start, own_end, samples)

    def _trim_audio(self) -> None:
        """Keep only the audio a future window may still need."""
        keep_from_s = self._next_start if self._region_start is not None else self.audio_s - self.window_s
        keep_from = max(round(keep_from_s * self.sample_rate) - self.sample_rate, self._audio_start)
        drop = keep_from - self._audio_start
        if drop > 0:
            self._audio = self._audio[drop:]
            self._audio_start = keep_from

    def add_embeddings(self, windows: list[Window], embeddings: np.ndarray) -> list[TurnUpdate]:
        updates: list[TurnUpdate] = []
        for window, embedding in zip(windows, embeddings, strict=True):
            label = self.clustering.assign(embedding)
            turn = self._turn
            if (
                turn is not None
                and self.clustering.resolve(turn.label) == label
                and window.own_start_s - turn.end_s <= self.max_gap_s
            ):
                turn.end_s = window.own_end_s
                turn.emb_sum = turn.emb_sum + embedding
                turn.window_count += 1
                updates.append(turn.update(False, label))
                continue
            if turn is not None:
                updates.append(turn.update(True, self.clustering.resolve(turn.label)))
            self._turn = _Turn(
                self._turn_count, label, window.own_start_s, window.own_end_s, embedding.copy()
            )
            self._turn_count += 1
            updates.append(self._turn.update(False, label))
        return updates

    def close_idle_turn(self) -> list[TurnUpdate]:
        """Finalise the open turn once the stream has been silent for longer than `max_gap_s`."""
        turn = self._turn
        if turn is None or self._region_start is not None or self.audio_s - turn.end_s <= self.max_gap_s:
            return []
        return self.finish()

    def finish(self) -> list[TurnUpdate]:
        if self._turn is None:
            return []
        update = self._turn.update(True, self.clustering.resolve(self._turn.label))
        self._turn = None
        return [update]
