"""Online diarization of one stream: audio in, speech windows out, labelled turns back.

The work is split so that embeddings can be computed elsewhere (a batcher shared by all streams):

1. `push_audio(samples)` runs streaming VAD and returns the windows that are complete.
2. `add_embeddings(windows, embeddings)` clusters them online and returns turn updates.

Each window *owns* the stretch of time around its centre (half a hop either side), so turns tile the
speech without overlap; a region's first window owns back to the region start and its tail window up
to the region end.

Labels are committed with a little lookahead: a window's speaker is decided once `lookahead` later
windows are embedded (at the latest `latency_s` of audio after the earliest frame it labels), so
that one odd window neither opens a speaker nor breaks a turn. Until then the open turn is extended
*provisionally* over the pending windows and the still-open speech region, so provisional segments
lag the audio by about one chunk.

Turn updates: the open turn is re-emitted (`is_final=False`) whenever it grows or changes; a turn is
final once its speaker changes or a pause longer than `max_gap_s` ends it. Final turns never change.
At the end of the stream `revise()` re-clusters every window offline and returns a complete new
labelling (`revision=1`), which replaces the live one.

`snapshot()` / `restore()` serialise the whole state (VAD recurrent state included) so that a restored
diarizer continues exactly as the original would have.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from speakerflow.processors.clustering import OnlineClustering
from speakerflow.processors.offline_clustering import OfflineConfig, align_to, recluster, second_labels
from speakerflow.processors.vad import SpeechEvent, StreamingVad, VadConfig

SNAPSHOT_FORMAT = 1


@dataclass(frozen=True)
class DiarizerConfig:
    """Every knob of a stream's diarizer (seconds unless named otherwise)."""

    window_s: float = 1.5  # embedding window length
    hop_s: float = 0.5  # step between windows
    max_gap_s: float = 0.5  # longest pause inside one turn
    min_window_s: float = 0.4  # shortest speech region that gets a label
    lookahead: int = 2  # windows seen after a window before its label is committed
    latency_s: float = 2.0  # a frame's label is committed at most this long (of audio) after the frame
    new_speaker_distance: float = 0.25
    confirm_similarity: float = 0.6
    confirm_windows: int = 1
    merge_distance: float = 0.2
    max_speakers: int = 20
    sample_rate: int = 16000
    vad: VadConfig = field(default_factory=VadConfig)
    offline: OfflineConfig = field(default_factory=OfflineConfig)

    def clustering(self) -> OnlineClustering:
        return OnlineClustering(
            new_speaker_distance=self.new_speaker_distance,
            confirm_similarity=self.confirm_similarity,
            confirm_windows=self.confirm_windows,
            merge_distance=self.merge_distance,
            max_speakers=self.max_speakers,
        )


# Cosine thresholds of the clustering per embedder family; the DiarizerConfig defaults are GE2E's,
# tuned on the simulated tuning split. CAM++ scores live on another scale (1.5-s windows of the tuning
# speakers: same speaker mean 0.62, different 0.06; GE2E 0.78 and 0.48), so its values are GE2E's
# carried over by the affine map that takes GE2E's two means onto CAM++'s (similarity s -> 1.89 s - 0.84,
# margins x 1.89), rounded; checked, not searched, on the tuning split (README, streaming diarization).
CLUSTERING_BY_FAMILY: dict[str, dict[str, float]] = {
    "campplus": {
        "new_speaker_distance": 0.43,
        "confirm_similarity": 0.29,
        "merge_distance": 0.33,
        "offline_threshold": 0.62,
        "switch_penalty": 0.28,
        "overlap_margin": 0.28,
    },
}


def config_for_embedder(family: str, **overrides) -> DiarizerConfig:
    """A DiarizerConfig with the clustering thresholds of `family` (`Embedder.name`), then `overrides`."""
    values = dict(CLUSTERING_BY_FAMILY.get(family, {}))
    offline = {k: values.pop(k) for k in ("switch_penalty", "overlap_margin") if k in values}
    if "offline_threshold" in values:
        offline["threshold"] = values.pop("offline_threshold")
    return DiarizerConfig(**(values | {"offline": OfflineConfig(**offline)} | overrides))


@dataclass(frozen=True)
class Window:
    index: int
    region: int  # VAD region the window belongs to
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
    revision: int = 0


def label_name(index: int) -> str:
    return f"SPEAKER_{index:02d}"


@dataclass
class _Turn:
    index: int
    label: int
    start_s: float
    end_s: float
    emb_sum: np.ndarray
    window_count: int = 1

    def update(self, final: bool, label: int, end_s: float | None = None) -> TurnUpdate:
        mean = self.emb_sum / max(float(np.linalg.norm(self.emb_sum)), 1e-12)
        end = self.end_s if end_s is None else end_s
        return TurnUpdate(
            self.index,
            label_name(label),
            self.start_s,
            end,
            mean.astype(np.float32),
            self.window_count,
            final,
        )


# Per-window arrays kept for the end-of-stream pass (and snapshots): name -> dtype.
_WINDOW_FIELDS = {
    "start": np.float64,
    "end": np.float64,
    "own_start": np.float64,
    "own_end": np.float64,
    "region": np.int64,
    "label": np.int64,  # live label (-1 while pending)
}


class StreamDiarizer:
    """State of one stream; see the module docstring for the protocol."""

    snapshot_format = SNAPSHOT_FORMAT

    def __init__(self, config: DiarizerConfig | None = None) -> None:
        self.config = config or DiarizerConfig()
        self.clustering = self.config.clustering()
        self._vad = StreamingVad(self.config.vad, self.config.sample_rate)
        self._audio = np.zeros(0, np.float32)
        self._audio_start = 0  # sample index of self._audio[0]
        self._region = -1  # index of the current (or last) VAD region
        self._region_open = False
        self._region_start = 0.0
        self._next_start = 0.0  # start of the next window inside the open region
        self._owned_until = 0.0  # end of the time already given to a window
        self._awaiting = 0  # windows handed out by push_audio, not yet back with an embedding
        self._created = 0  # windows handed out so far (the next window's index)
        self._windows = {name: [] for name in _WINDOW_FIELDS}
        self._embeddings: list[np.ndarray] = []  # float16 rows, one per window
        self._committed = 0  # windows [0, committed) have their live label
        self._turn: _Turn | None = None
        self._turn_count = 0
        self._shown: dict[int, tuple] = {}  # last provisional version emitted per turn index
        self._finished = False

    # -- audio and windows -------------------------------------------------------------------------
    @property
    def audio_s(self) -> float:
        return (self._audio_start + len(self._audio)) / self.config.sample_rate

    @property
    def window_count(self) -> int:
        return len(self._embeddings)

    def push_audio(self, samples: np.ndarray) -> list[Window]:
        """Feed the next 16 kHz mono chunk; returns the windows to embed (in order)."""
        samples = np.asarray(samples, np.float32)
        self._audio = np.concatenate([self._audio, samples])
        windows: list[Window] = []
        for event in self._vad.push(samples):
            windows += self._on_event(event)
        windows += self._complete_windows(self.audio_s)
        self._trim_audio()
        self._awaiting += len(windows)
        return windows

    def end_audio(self) -> list[Window]:
        """Stream end: close the open speech region and return its last windows."""
        windows: list[Window] = []
        for event in self._vad.flush():
            windows += self._on_event(event)
        self._awaiting += len(windows)
        return windows

    def _on_event(self, event: SpeechEvent) -> list[Window]:
        if event.kind == "start":
            self._region += 1
            self._region_open = True
            self._region_start = self._next_start = self._owned_until = event.time_s
            return []
        if not self._region_open:
            return []
        windows = self._complete_windows(event.time_s)
        windows += self._tail_window(event.time_s)
        self._region_open = False
        return windows

    def _complete_windows(self, horizon_s: float) -> list[Window]:
        """Full windows of the open region that end before `horizon_s`."""
        out: list[Window] = []
        if not self._region_open:
            return out
        cfg = self.config
        while self._next_start + cfg.window_s <= horizon_s + 1e-9:
            start = self._next_start
            own_end = start + cfg.window_s / 2 + cfg.hop_s / 2
            out.append(self._window(start, start + cfg.window_s, self._owned_until, own_end))
            self._owned_until = own_end
            self._next_start = start + cfg.hop_s
        return out

    def _tail_window(self, region_end_s: float) -> list[Window]:
        """The window that ends the region, so the region's last stretch gets a label too."""
        if region_end_s - self._owned_until <= 1e-3:
            return []
        start = max(self._region_start, region_end_s - self.config.window_s)
        if region_end_s - start < self.config.min_window_s:
            return []
        return [self._window(start, region_end_s, self._owned_until, region_end_s)]

    def _window(self, start: float, end: float, own_start: float, own_end: float) -> Window:
        rate = self.config.sample_rate
        first = round(start * rate) - self._audio_start
        last = round(end * rate) - self._audio_start
        samples = self._audio[max(first, 0) : max(last, 0)].copy()
        self._created += 1
        return Window(self._created - 1, self._region, start, end, own_start, own_end, samples)

    def _trim_audio(self) -> None:
        """Keep only the audio a future window may still need."""
        cfg = self.config
        # A region opens (padded) and closes a little after the fact, and its tail window reaches a
        # window length back from its end: keep that much, plus a second of slack.
        keep_from_s = self.audio_s - cfg.window_s - 1.0
        if self._region_open:
            keep_from_s = min(self._next_start, keep_from_s)
        keep_from = max(round(keep_from_s * cfg.sample_rate), self._audio_start)
        drop = keep_from - self._audio_start
        if drop > 0:
            self._audio = self._audio[drop:]
            self._audio_start = keep_from

    # -- clustering and turns ----------------------------------------------------------------------
    def add_embeddings(self, windows: list[Window], embeddings: np.ndarray) -> list[TurnUpdate]:
        """Store the embeddings of windows from `push_audio`/`end_audio` (in order); returns updates."""
        for window, embedding in zip(windows, embeddings, strict=True):
            if window.index != self.window_count:
                raise ValueError(f"window {window.index} arrived, expected {self.window_count}")
            values = (window.start_s, window.end_s, window.own_start_s, window.own_end_s, window.region, -1)
            for name, value in zip(_WINDOW_FIELDS, values, strict=True):
                self._windows[name].append(value)
            # Stored (and clustered) at float16 precision so that a snapshot restores exactly.
            self._embeddings.append(np.asarray(embedding, np.float32).astype(np.float16))
        self._awaiting -= len(windows)
        return self.updates()

    def updates(self) -> list[TurnUpdate]:
        """Commit the windows that are due and report what changed (also call it when idle)."""
        out = self._commit(finishing=self._finished)
        if self._turn is not None and self._idle_for() > self.config.max_gap_s and not self._pending():
            out.append(self._turn.update(True, self._resolve(self._turn.label)))
            self._turn = None
        return out + self._provisional()

    def _pending(self) -> range:
        return range(self._committed, self.window_count)

    def _embedding(self, i: int) -> np.ndarray:
        return self._embeddings[i].astype(np.float32)

    def _resolve(self, label: int) -> int:
        return self.clustering.resolve(label)

    def _idle_for(self) -> float:
        """Seconds of audio since the open turn's last owned time, while no speech region is open."""
        if self._turn is None or self._region_open:
            return 0.0
        return self.audio_s - self._turn.end_s

    def _due(self, i: int, finishing: bool) -> bool:
        if finishing or self.window_count - 1 - i >= self.config.lookahead:
            return True
        return self.audio_s - self._windows["own_start"][i] >= self.config.latency_s

    def _commit(self, finishing: bool) -> list[TurnUpdate]:
        out: list[TurnUpdate] = []
        while self._committed < self.window_count and self._due(self._committed, finishing):
            i = self._committed
            ahead = [
                self._embedding(j)
                for j in range(i + 1, min(i + 1 + self.config.lookahead, self.window_count))
            ]
            label = self._resolve(self.clustering.assign(self._embedding(i), ahead))
            label = self._keep_turn_through_blip(i, label, ahead)
            self._windows["label"][i] = label
            out += self._extend_turns(i, label)
            self._committed += 1
        return out

    def _keep_turn_through_blip(self, i: int, label: int, ahead: list[np.ndarray]) -> int:
        """A single window that disagrees with the open turn and with the window after it keeps the
        turn's speaker (a median filter over three windows)."""
        turn = self._turn
        if turn is None or not ahead or self._gap_before(i) > self.config.max_gap_s:
            return label
        current = self._resolve(turn.label)
        if label == current:
            return label
        after, _ = self.clustering.nearest(ahead[0])
        return current if after == current else label

    def _gap_before(self, i: int) -> float:
        turn = self._turn
        return self._windows["own_start"][i] - turn.end_s if turn is not None else float("inf")

    def _extend_turns(self, i: int, label: int) -> list[TurnUpdate]:
        embedding = self._embedding(i)
        own_start, own_end = self._windows["own_start"][i], self._windows["own_end"][i]
        turn = self._turn
        if (
            turn is not None
            and self._resolve(turn.label) == label
            and self._gap_before(i) <= self.config.max_gap_s
        ):
            turn.end_s = own_end
            turn.emb_sum = turn.emb_sum + embedding
            turn.window_count += 1
            return []
        out = [] if turn is None else [turn.update(True, self._resolve(turn.label))]
        self._turn = _Turn(self._turn_count, label, own_start, own_end, embedding.astype(np.float64))
        self._turn_count += 1
        return out

    def _provisional(self) -> list[TurnUpdate]:
        """The open turn (and a turn that is certain to start) as currently known, when changed."""
        out: list[TurnUpdate] = []
        pending = list(self._pending())
        frontier = self._windows["own_end"][pending[-1]] if pending else 0.0
        if self._region_open:
            frontier = max(frontier, self.audio_s)
        turn = self._turn
        speculative_from = pending[0] if pending else None
        if turn is not None:
            # What follows the turn without a long pause is taken to be the same speaker for now.
            next_start = self._windows["own_start"][pending[0]] if pending else self._region_start
            contiguous = (pending or self._region_open) and next_start - turn.end_s <= self.config.max_gap_s
            end = max(turn.end_s, frontier) if contiguous else turn.end_s
            if contiguous:
                speculative_from = None
            out += self._show(turn.update(False, self._resolve(turn.label), end_s=end))
        if speculative_from is not None:
            out += self._show(self._speculative_turn(pending, frontier))
        return out

    def _speculative_turn(self, pending: list[int], frontier: float) -> TurnUpdate:
        """Pending windows after a pause: certainly a new turn; its speaker is the best guess so far."""
        first = pending[0]
        label, distance = self.clustering.nearest(self._embedding(first))
        if label < 0 or distance > self.config.new_speaker_distance:
            label = len(self.clustering.alias)  # the label a new speaker would get
        emb = np.sum([self._embedding(i) for i in pending], axis=0).astype(np.float64)
        turn = _Turn(self._turn_count, label, self._windows["own_start"][first], frontier, emb, len(pending))
        return turn.update(False, label)

    def _show(self, update: TurnUpdate) -> list[TurnUpdate]:
        key = (update.label, round(update.start_s, 3), round(update.end_s, 3), update.window_count)
        if self._shown.get(update.turn_index) == key:
            return []
        self._shown[update.turn_index] = key
        return [update]

    def finish(self) -> list[TurnUpdate]:
        """End of stream (after `end_audio` and its embeddings): commit everything, close the turn."""
        self._finished = True
        out = self._commit(finishing=True)
        if self._turn is not None:
            out.append(self._turn.update(True, self._resolve(self._turn.label)))
            self._turn = None
        self._shown.clear()
        return out

    def close_idle_turn(self) -> list[TurnUpdate]:
        """Updates for a stream that received nothing new (commits due windows, ends quiet turns)."""
        return self.updates()

    # -- end-of-stream revision --------------------------------------------------------------------
    def live_labels(self) -> np.ndarray:
        """The committed live label of every window (-1 while pending), merged labels resolved."""
        labels = np.asarray(self._windows["label"], np.int64)
        return np.array([self._resolve(int(x)) if x >= 0 else -1 for x in labels], np.int64)

    def window_table(self) -> dict[str, np.ndarray]:
        """Every window so far: times, region, live label and embedding (float32)."""
        return self._table(self.window_count)

    def _table(self, count: int) -> dict[str, np.ndarray]:
        """The first `count` windows as arrays."""
        table = {
            name: np.asarray(values[:count], dtype)
            for (name, dtype), values in zip(_WINDOW_FIELDS.items(), self._windows.values(), strict=True)
        }
        table["label"] = self.live_labels()[:count]
        dim = self._embeddings[0].shape[0] if self._embeddings else 0
        table["embedding"] = (
            np.stack(self._embeddings[:count]).astype(np.float32) if count else np.zeros((0, dim), np.float32)
        )
        return table

    def revise(self, revision: int = 1) -> list[TurnUpdate]:
        """Offline re-clustering of every window: a complete final labelling of the stream."""
        table = self.window_table()
        n = len(table["start"])
        if n == 0:
            return []
        cfg = self.config
        live = table["label"]
        weights, contiguous, runs = _window_geometry(table, cfg.max_gap_s)
        labels = recluster(table["embedding"], weights, contiguous, runs, cfg.offline)
        second = second_labels(table["embedding"], labels, weights, contiguous, cfg.offline.overlap_margin)
        named = align_to(labels, live, weights, first_free=len(self.clustering.alias))
        rename = dict(zip(labels.tolist(), named.tolist(), strict=True))
        second = np.array([rename.get(int(x), -1) if x >= 0 else -1 for x in second], np.int64)
        return _segments(table, named, second, cfg.max_gap_s, revision)

    # -- snapshots ---------------------------------------------------------------------------------
    def snapshot(self, windows_from: int = 0) -> bytes:
        """The complete state as bytes (npz); `restore` continues exactly from here.

        Taken between calls, when every window handed out has come back with its embedding. Windows
        before `windows_from` are left out: the caller keeps them as `window_rows` blocks (they never
        change once stored) and hands them back to `restore`.
        """
        if self._awaiting:
            raise RuntimeError(f"snapshot with {self._awaiting} windows still awaiting embeddings")
        vad, machine = self._vad, self._vad._machine
        scalars = {
            "format": SNAPSHOT_FORMAT,
            "config": _config_dict(self.config),
            "audio_start": self._audio_start,
            "region": self._region,
            "region_open": self._region_open,
            "region_start": self._region_start,
            "next_start": self._next_start,
            "owned_until": self._owned_until,
            "created": self._created,
            "committed": self._committed,
            "turn_count": self._turn_count,
            "finished": self._finished,
            "shown": {str(k): list(v) for k, v in self._shown.items()},
            "turn": None
            if self._turn is None
            else {
                "index": self._turn.index,
                "label": self._turn.label,
                "start_s": self._turn.start_s,
                "end_s": self._turn.end_s,
                "window_count": self._turn.window_count,
            },
            "vad": {"frames": vad._frames, "seen": vad._seen, "finished": vad._finished},
            "vad_machine": {
                k: v for k, v in vars(machine).items() if isinstance(v, bool | int | float | None)
            },
        }
        scalars["windows_from"] = windows_from
        arrays = _window_arrays(self._windows, self._embeddings, windows_from, self.window_count)
        arrays |= {f"c_{k}": v for k, v in self.clustering.state().items()}
        arrays["audio"] = self._audio
        arrays["vad_pending"] = vad._pending
        arrays["vad_state"] = vad.frames.state
        arrays["vad_context"] = vad.frames.context
        if self._turn is not None:
            arrays["turn_emb_sum"] = self._turn.emb_sum
        buffer = io.BytesIO()
        np.savez(buffer, scalars=np.frombuffer(json.dumps(scalars).encode(), np.uint8), **arrays)
        return buffer.getvalue()

    def window_rows(self, start: int, stop: int) -> bytes:
        """Windows [start, stop) as bytes (npz), for snapshots that leave them out."""
        buffer = io.BytesIO()
        np.savez(buffer, **_window_arrays(self._windows, self._embeddings, start, stop))
        return buffer.getvalue()

    @classmethod
    def restore(cls, data: bytes, blocks: Sequence[bytes] = ()) -> StreamDiarizer:
        """A diarizer in exactly the state `snapshot()` captured; `blocks` are the `window_rows` of
        the windows the snapshot left out, in order."""
        arrays = _load_npz(data)
        scalars = json.loads(arrays.pop("scalars").tobytes())
        parts = [_load_npz(block) for block in blocks] + [arrays]
        for key in [f"w_{name}" for name in _WINDOW_FIELDS] + ["w_embedding"]:
            pieces = [p[key] for p in parts if p[key].size]
            arrays[key] = np.concatenate(pieces) if pieces else arrays[key]
        if sum(len(p["w_start"]) for p in parts[:-1]) != scalars["windows_from"]:
            raise ValueError(f"snapshot needs the first {scalars['windows_from']} windows in blocks")
        if scalars["format"] != SNAPSHOT_FORMAT:
            raise ValueError(f"snapshot format {scalars['format']} is not {SNAPSHOT_FORMAT}")
        self = cls(_config_from_dict(scalars["config"]))
        self._audio = arrays["audio"].astype(np.float32)
        for name in (
            "audio_start",
            "region",
            "region_open",
            "region_start",
            "next_start",
            "owned_until",
            "created",
            "committed",
            "turn_count",
            "finished",
        ):
            setattr(self, f"_{name}", scalars[name])
        self._shown = {int(k): tuple(v) for k, v in scalars["shown"].items()}
        for name, dtype in _WINDOW_FIELDS.items():
            self._windows[name] = [dtype(x).item() for x in arrays[f"w_{name}"]]
        self._embeddings = list(arrays["w_embedding"].astype(np.float16))
        self.clustering.load_state({k[2:]: v for k, v in arrays.items() if k.startswith("c_")})
        turn = scalars["turn"]
        if turn is not None:
            self._turn = _Turn(
                turn["index"],
                turn["label"],
                turn["start_s"],
                turn["end_s"],
                arrays["turn_emb_sum"].astype(np.float64),
                turn["window_count"],
            )
        vad = self._vad
        vad._frames, vad._seen, vad._finished = (scalars["vad"][k] for k in ("frames", "seen", "finished"))
        vad._pending = arrays["vad_pending"].astype(np.float32)
        for key, value in scalars["vad_machine"].items():
            setattr(vad._machine, key, value)
        vad.frames.state = arrays["vad_state"].astype(np.float32)
        vad.frames.context = arrays["vad_context"].astype(np.float32).reshape(1, -1)
        return self


def _window_geometry(table: dict[str, np.ndarray], max_gap_s: float) -> tuple[np.ndarray, ...]:
    """Per-window weights (seconds owned), contiguity with the next window, and runs of one live
    label without a pause (the units long streams are clustered in)."""
    weights = np.maximum(table["own_end"] - table["own_start"], 1e-3)
    contiguous = table["own_start"][1:] - table["own_end"][:-1] <= max_gap_s
    live = table["label"]
    runs = np.concatenate([[0], np.cumsum((live[1:] != live[:-1]) | ~contiguous)]).astype(np.int64)
    return weights, contiguous, runs


def _window_arrays(windows: dict[str, list], embeddings: list[np.ndarray], start: int, stop: int) -> dict:
    arrays = {
        f"w_{name}": np.asarray(windows[name][start:stop], dtype) for name, dtype in _WINDOW_FIELDS.items()
    }
    dim = embeddings[0].shape[0] if embeddings else 0
    rows = embeddings[start:stop]
    arrays["w_embedding"] = np.stack(rows) if rows else np.zeros((0, dim), np.float16)
    return arrays


def _load_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _config_dict(config: DiarizerConfig) -> dict:
    return asdict(config)


def _config_from_dict(values: dict) -> DiarizerConfig:
    values = dict(values)
    values["vad"] = VadConfig(**values["vad"])
    values["offline"] = OfflineConfig(**values["offline"])
    return DiarizerConfig(**values)


def _segments(
    table: dict[str, np.ndarray], labels: np.ndarray, second: np.ndarray, max_gap_s: float, revision: int
) -> list[TurnUpdate]:
    """Turns from per-window labels: consecutive windows of one speaker, pauses up to `max_gap_s`
    bridged; windows with a second speaker extend that speaker's adjacent turn over them."""
    spans: list[list] = []  # [label, start, end, emb_sum, count]
    for i, label in enumerate(labels):
        start, end = table["own_start"][i], table["own_end"][i]
        emb = table["embedding"][i].astype(np.float64)
        last = spans[-1] if spans else None
        if last is not None and last[0] == label and start - last[2] <= max_gap_s:
            last[2] = end
            last[3] = last[3] + emb
            last[4] += 1
        else:
            spans.append([int(label), start, end, emb, 1])
    for i in np.flatnonzero(second >= 0):
        start, end = table["own_start"][i], table["own_end"][i]
        spans.append([int(second[i]), start, end, None, 0])
    merged: list[list] = []
    for span in sorted(spans, key=lambda s: (s[0], s[1])):
        last = merged[-1] if merged else None
        if last is not None and last[0] == span[0] and span[1] <= last[2] + 1e-3:
            last[2] = max(last[2], span[2])
            if span[3] is not None:
                last[3] = span[3] if last[3] is None else last[3] + span[3]
                last[4] += span[4]
        else:
            merged.append(list(span))
    out = []
    for index, (label, start, end, emb, count) in enumerate(sorted(merged, key=lambda s: (s[1], s[0]))):
        emb = np.zeros(table["embedding"].shape[1]) if emb is None else emb
        mean = (emb / max(float(np.linalg.norm(emb)), 1e-12)).astype(np.float32)
        out.append(
            TurnUpdate(index, label_name(label), float(start), float(end), mean, count, True, revision)
        )
    return out
