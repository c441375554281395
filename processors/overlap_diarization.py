"""Overlap-aware online diarization of one stream on a local segmentation model (the diart approach).

Protocol (three compute steps, each batchable across streams by the caller):

1. `push_audio(samples)` / `end_audio()` return the rolling windows (`Chunk`: `window_s` long, one every
   `hop_s`) whose audio is complete. The first windows are zero-padded on the left so that the start
   of the stream is labelled as early as the rest; the last ones are zero-padded on the right.
2. `add_segmentation(chunks, activity)` takes the segmentation model's (windows, frames, 3) speaker
   probabilities and returns the local speakers to embed (`LocalSpeaker`, with `samples`: the
   speaker's frames of the window where it talks alone, concatenated; all its frames when those are
   too short; nothing below `min_clean_s`).
3. `add_embeddings(locals, embeddings)` stores them; `updates()` (also called by it) clusters the
   windows that are complete, in order, commits the frames that are due and returns `TurnUpdate`s.

Frames: the model's frame grid (about 17 ms). A frame's labels are committed once the window ending
`latency_s - hop_s` after it has been clustered, so no frame waits more than `latency_s` of audio;
a committed frame never changes. Overlapped speech carries two labels: each global speaker has its own
turns, so two turns of different labels can cover the same time (the stage's `TurnUpdate` already
allows that; nothing was added to it). A turn is re-emitted (`is_final=False`) while it grows and is
final once its speaker has been silent for more than `max_gap_s`. Provisional turns also reach past the
committed frames into the audio the clustered windows already cover (open turns extended, new voices as
tentative turns), so a new voice is labelled about a hop after it starts; committed frames decide, and
a tentative turn that no committed turn replaces by the end is closed as an empty final segment.
Live re-clustering: every `recluster_every_s` of audio, the local speakers of every window so far are
re-clustered offline (the end-of-stream algorithm below) and the online centroids replaced by that
result, aligned to the live labels (a speaker the pass merges into another is retired, a speaker it
splits off gets a new label); windows whose frames are not committed yet take the new labels. Online
matching alone cannot undo an early merge or split; this lets later labels follow the better clusters.
A turn's embedding is the normalised mean of the local-speaker embeddings mapped to its speaker while
it was open (or just before it opened); `window_count` counts them (0: none, e.g. a speaker only
heard in overlap).

End of stream: `finish()` commits everything, and `revise()` re-clusters every window's local speakers
offline and rebuilds the whole labelling (revision 1), with labels aligned to the live ones.

`snapshot()` / `restore()` serialise the whole state; a restored diarizer continues exactly as the
original would have. Windows before `windows_from` (at most `stable_windows`) can be kept outside the
snapshot as immutable `window_rows` blocks, as the light diarizer does.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import NamedTuple

import numpy as np
from scipy.optimize import linear_sum_assignment

from speakerflow.processors.diarization import TurnUpdate, label_name
from speakerflow.processors.overlap_clustering import (
    Aggregation,
    IncrementalClustering,
    cluster_sums,
    offline_assign,
    reconstruct,
)
from speakerflow.processors.segmentation import FrameGrid

# Distinct from the light diarizer's formats, so that a stage never restores one as the other.
SNAPSHOT_FORMAT = 1001
LOCAL_SPEAKERS = 3


@dataclass(frozen=True)
class OverlapConfig:
    """Every knob of the segmentation diarizer (seconds unless named otherwise)."""

    # Thresholds marked "tuned" were chosen on the tuning sets with evaluation/tune_overlap.py (GE2E values
    # here; other embedders' in TUNED).
    window_s: float = 5.0  # segmentation window
    hop_s: float = 0.5  # step between windows
    latency_s: float = 2.0  # a frame's labels are committed at most this long (of audio) after it
    tau_active: float = 0.5  # tuned (IncrementalClustering documents the three)
    rho_update: float = 0.2  # tuned
    delta_new: float = 0.35  # tuned
    onset: float = 0.5  # tuned: speaker probability at which a local speaker counts as talking
    min_clean_s: float = 0.4  # shortest speech of a local speaker that gets an embedding
    max_gap_s: float = 0.1  # tuned: longest silence inside one turn
    offline_threshold: float = 0.6  # tuned: centroid-linkage AHC cut (euclidean distance of unit vectors)
    min_cluster_size: int = 8  # tuned (see the notes): smaller offline clusters join the closest larger one
    recluster_every_s: float = 10.0  # tuned: live re-clustering period in audio seconds (0: never)
    max_cluster_items: int = 1000  # most local-speaker embeddings one offline AHC sees (cost is quadratic)
    max_speakers: int = 20
    sample_rate: int = 16000
    # segmentation-3.0's frame grid (checked against the model by the caller, see `check_grid`)
    frame_step: int = 270
    first_centre: int = 495
    frame_size: int = 991

    @property
    def grid(self) -> FrameGrid:
        return FrameGrid(self.frame_step, self.first_centre, self.frame_size)

    @property
    def window_samples(self) -> int:
        return round(self.window_s * self.sample_rate)

    @property
    def hop_samples(self) -> int:
        return round(self.hop_s * self.sample_rate)

    def check_grid(self, grid: FrameGrid) -> None:
        if grid != self.grid:
            raise ValueError(f"segmentation model frame grid {grid} differs from the configured {self.grid}")


# Per embedder family: its tuned thresholds where they differ from OverlapConfig's (GE2E) defaults,
# since cosine distances between embeddings of different models are on different scales.
TUNED: dict[str, dict[str, float]] = {
    "ge2e": {},
    # evaluation/tune_overlap.py with CAM++ (onset and max_gap_s not searched: GE2E's, flat there)
    "campplus": {"delta_new": 0.7, "rho_update": 0.2, "offline_threshold": 0.8, "min_cluster_size": 4},
}


def overlap_config(
    latency_s: float | None = None, overrides: dict[str, str] | None = None, embedder: str = "ge2e"
) -> OverlapConfig:
    """The tuned config for `embedder`, with `latency_s` and string overrides (field -> value) applied."""
    config = OverlapConfig(**TUNED.get(embedder, {}))
    values = asdict(config)
    if latency_s is not None:
        values["latency_s"] = latency_s
    for name, text in (overrides or {}).items():
        if name not in values:
            raise ValueError(f"unknown segmentation-diarizer setting {name!r} (choose from {sorted(values)})")
        values[name] = type(values[name])(text)
    return OverlapConfig(**values)


@dataclass(frozen=True)
class Chunk:
    index: int
    start: int  # first sample (negative: zero-padded stream start)
    samples: np.ndarray


@dataclass(frozen=True)
class LocalSpeaker:
    chunk: int
    speaker: int  # local speaker 0..2
    samples: np.ndarray  # the audio to embed
    clean: bool  # from frames where the speaker talks alone (else from all its frames, overlap included)


class _History(NamedTuple):
    """Every active local speaker of the windows so far (one row each), for the offline passes."""

    chunk_ids: np.ndarray  # window of each row
    local_ids: np.ndarray  # local speaker (0..2) in that window
    embeddings: np.ndarray  # (rows, dim)
    clean: np.ndarray  # embedding of frames without overlap
    live: np.ndarray  # live global speaker (-1: none)
    named: np.ndarray  # offline cluster, renamed to the live labels it shares most rows with


@dataclass
class _Turn:
    index: int
    label: int
    start: int  # frames
    end: int  # frames (exclusive)
    emb_sum: np.ndarray
    count: int = 0


@dataclass
class _Pending:
    """A window handed out and not yet clustered."""

    start: int
    activity: np.ndarray | None = None  # float16 (frames, 3)
    embeddings: dict[int, np.ndarray] = field(default_factory=dict)
    clean: dict[int, bool] = field(default_factory=dict)
    awaiting: int = 0


class SegmentationDiarizer:
    """State of one stream; see the module docstring for the protocol."""

    snapshot_format = SNAPSHOT_FORMAT
    # windows per immutable state block: a window row holds its segmentation (frames x 3) and three
    # embeddings, about 3 KB, so 64 keep a block (and the core record) well under Kafka's 1 MB
    rows_per_block = 64

    def __init__(self, config: OverlapConfig | None = None) -> None:
        self.config = config or OverlapConfig()
        cfg = self.config
        self.clustering = IncrementalClustering(
            cfg.tau_active, cfg.rho_update, cfg.delta_new, cfg.max_speakers
        )
        self.agg = Aggregation(cfg.grid, cfg.onset)
        self._audio = np.zeros(0, np.float32)
        self._audio_start = 0  # sample index of self._audio[0]
        self._total = 0  # samples received
        self._ended = False
        self._next_chunk = 0
        self._pending: dict[int, _Pending] = {}
        # one row per clustered window
        self._starts: list[int] = []
        self._activity: list[np.ndarray] = []  # float16 (frames, 3)
        self._embeddings: list[np.ndarray] = []  # float16 (3, dim); zero rows where invalid
        self._valid: list[np.ndarray] = []  # bool (3,)
        self._clean: list[np.ndarray] = []  # bool (3,): embedding of frames without overlap
        self._mapping: list[np.ndarray] = []  # int (3,)
        self._dim = 0
        self._committed = 0  # frames [0, committed) have their live labels
        self._turns: dict[int, _Turn] = {}  # open turn per global speaker
        self._carry: dict[int, tuple[np.ndarray, int]] = {}  # embeddings of a speaker with no open turn
        self._turn_count = 0
        self._shown: dict[int, tuple] = {}
        self._finished = False

    # -- audio and windows -------------------------------------------------------------------------
    @property
    def audio_s(self) -> float:
        return self._total / self.config.sample_rate

    @property
    def window_count(self) -> int:
        return len(self._starts)

    @property
    def stable_windows(self) -> int:
        """Leading windows that can no longer change: every frame they cover is committed (live
        re-clustering relabels only windows that still cover uncommitted frames). Only these may go
        into immutable `window_rows` blocks."""
        first_open = self._committed * self.config.frame_step
        ends = np.asarray(self._starts, np.int64) + self.config.window_samples
        return int(np.searchsorted(ends, first_open, side="right"))

    @property
    def committed_s(self) -> float:
        """Stream time up to which every frame's live labels are committed (they never change)."""
        return min(self._committed * self.config.frame_step, self._total) / self.config.sample_rate

    @property
    def frame_s(self) -> float:
        return self.config.frame_step / self.config.sample_rate

    def push_audio(self, samples: np.ndarray) -> list[Chunk]:
        """Feed the next 16 kHz mono chunk; returns the windows to segment (in order)."""
        samples = np.asarray(samples, np.float32)
        self._audio = np.concatenate([self._audio, samples])
        self._total += len(samples)
        out = []
        while (self._next_chunk + 1) * self.config.hop_samples <= self._total:
            out.append(self._chunk())
        self._trim()
        return out

    def end_audio(self) -> list[Chunk]:
        """Stream end: the windows (zero-padded on the right) that cover the rest of the audio."""
        self._ended = True
        out = []
        while self._next_chunk * self.config.hop_samples < self._total:
            out.append(self._chunk())
        return out

    def _chunk(self) -> Chunk:
        cfg = self.config
        index = self._next_chunk
        start = (index + 1) * cfg.hop_samples - cfg.window_samples
        window = np.zeros(cfg.window_samples, np.float32)
        lo, hi = max(start, self._audio_start), min(start + cfg.window_samples, self._total)
        if hi > lo:
            window[lo - start : hi - start] = self._audio[lo - self._audio_start : hi - self._audio_start]
        self._next_chunk += 1
        self._pending[index] = _Pending(start)
        return Chunk(index, start, window)

    def _trim(self) -> None:
        keep = max((self._next_chunk + 1) * self.config.hop_samples - self.config.window_samples, 0)
        drop = keep - self._audio_start
        if drop > 0:
            self._audio = self._audio[drop:]
            self._audio_start = keep

    # -- segmentation and embeddings ---------------------------------------------------------------
    def add_segmentation(self, chunks: Sequence[Chunk], activity: np.ndarray) -> list[LocalSpeaker]:
        """Speaker probabilities (windows, frames, 3) of `chunks`; returns the local speakers to embed."""
        out: list[LocalSpeaker] = []
        for chunk, probs in zip(chunks, activity, strict=True):
            pending = self._pending[chunk.index]
            # Stored (and used) at float16 precision so that a snapshot restores exactly.
            pending.activity = np.asarray(probs, np.float32).astype(np.float16)
            for speaker, samples, clean in self._speaker_audio(chunk, pending.activity.astype(np.float32)):
                out.append(LocalSpeaker(chunk.index, speaker, samples, clean))
                pending.clean[speaker] = clean
            pending.awaiting = sum(1 for s in out if s.chunk == chunk.index)
        return out

    def _speaker_audio(self, chunk: Chunk, probs: np.ndarray) -> list[tuple[int, np.ndarray, bool]]:
        """Per active local speaker, its clean frames' audio (see the module docstring)."""
        cfg = self.config
        talking = probs >= cfg.onset
        alone = talking & (talking.sum(axis=1, keepdims=True) == 1)
        need = math.ceil(cfg.min_clean_s / self.frame_s)
        out = []
        for k in range(probs.shape[1]):
            if probs[:, k].max() < cfg.tau_active:
                continue
            clean = alone[:, k].sum() >= need
            frames = alone[:, k] if clean else talking[:, k]
            if frames.sum() < need:
                continue
            out.append((k, self._frames_audio(chunk, frames), bool(clean)))
        return out

    def _frames_audio(self, chunk: Chunk, frames: np.ndarray) -> np.ndarray:
        """The samples under the selected frames (each frame owns one step around its centre)."""
        grid = self.config.grid
        edges = np.flatnonzero(np.diff(np.concatenate([[0], frames.astype(np.int8), [0]])))
        pieces = []
        for a, b in zip(edges[0::2], edges[1::2], strict=True):
            lo = max(grid.first_centre + grid.step * a - grid.step // 2, 0)
            hi = min(grid.first_centre + grid.step * (b - 1) + grid.step // 2, len(chunk.samples))
            pieces.append(chunk.samples[lo:hi])
        return np.concatenate(pieces) if pieces else np.zeros(0, np.float32)

    def add_embeddings(self, speakers: Sequence[LocalSpeaker], embeddings: np.ndarray) -> list[TurnUpdate]:
        """Embeddings of `add_segmentation`'s local speakers (any order); returns turn updates."""
        for speaker, embedding in zip(speakers, embeddings, strict=True):
            pending = self._pending[speaker.chunk]
            pending.embeddings[speaker.speaker] = np.asarray(embedding, np.float32).astype(np.float16)
            pending.awaiting -= 1
        return self.updates()

    @property
    def awaiting(self) -> int:
        """Windows handed out and not yet clustered."""
        return len(self._pending)

    # -- clustering, commitment, turns -------------------------------------------------------------
    def updates(self) -> list[TurnUpdate]:
        """Cluster the windows that are complete (in order), commit due frames, report changes."""
        out: list[TurnUpdate] = []
        while self._pending:
            index = min(self._pending)
            pending = self._pending[index]
            if index != self.window_count or pending.activity is None or pending.awaiting > 0:
                break
            del self._pending[index]
            self._cluster(pending)
            out += self._commit(self._due_frames())
        if self._finished:
            return out
        return out + self._provisional()

    def _cluster(self, pending: _Pending) -> None:
        if pending.embeddings and not self._dim:
            self._dim = len(next(iter(pending.embeddings.values())))
            # windows clustered before the first embedding had no width to store: widen them
            self._embeddings = [np.zeros((LOCAL_SPEAKERS, self._dim), np.float16) for _ in self._embeddings]
        embeddings = np.zeros((LOCAL_SPEAKERS, max(self._dim, 1)), np.float16)
        valid = np.zeros(LOCAL_SPEAKERS, bool)
        clean = np.zeros(LOCAL_SPEAKERS, bool)
        for k, embedding in pending.embeddings.items():
            embeddings[k], valid[k], clean[k] = embedding, True, pending.clean[k]
        activity = pending.activity.astype(np.float32)
        mapping = self.clustering.assign(embeddings.astype(np.float32), valid, activity, clean)
        self._starts.append(pending.start)
        self._activity.append(pending.activity)
        self._embeddings.append(embeddings)
        self._valid.append(valid)
        self._clean.append(clean)
        self._mapping.append(mapping)
        for k in np.flatnonzero(valid & (mapping >= 0)):
            self._give_embedding(int(mapping[k]), embeddings[k].astype(np.float64))
        every = round(self.config.recluster_every_s / self.config.hop_s)
        if every > 0 and self.window_count % every == 0:
            self._recluster()

    def _offline_clusters(self) -> _History:
        """Every active local speaker so far, with its offline cluster aligned to the live labels."""
        cfg = self.config
        valid = np.stack(self._valid)
        activity_peak = np.stack([a.max(axis=0) for a in self._activity]).astype(np.float32)
        chunk_ids, local_ids = np.nonzero(valid & (activity_peak >= cfg.tau_active))
        embeddings = np.stack(self._embeddings)[chunk_ids, local_ids].astype(np.float32)
        clean = np.stack(self._clean)[chunk_ids, local_ids]
        clusters = offline_assign(
            embeddings, chunk_ids, cfg.offline_threshold, cfg.min_cluster_size, clean, cfg.max_cluster_items
        )
        live = np.stack(self._mapping)[chunk_ids, local_ids]
        named = _align(clusters, live, first_free=self.clustering.count)
        return _History(chunk_ids, local_ids, embeddings, clean, live, named)

    def _recluster(self) -> None:
        """Live re-clustering (module docstring): new centroids, and new labels for the windows that
        still cover uncommitted frames."""
        history = self._offline_clusters()
        live = history.live
        if not len(live):
            return
        # A speaker the online pass opened only lately has too few windows for the offline cut to judge
        # (it would fold them into a bigger cluster): it keeps its label, windows and centroid. (A retired
        # speaker's few old windows do not bring it back.)
        labelled = live >= 0
        sizes = np.bincount(live[labelled], minlength=self.clustering.count)
        young = np.zeros(len(live), bool)
        labels = live[labelled]
        young[labelled] = (sizes[labels] < self.config.min_cluster_size) & ~self.clustering.retired[labels]
        named = np.where(young, live, history.named)
        centres = cluster_sums(history.embeddings, named, history.clean)
        centres.update({int(g): self.clustering.centres[g] for g in np.unique(live[young])})
        self.clustering.rebase(centres)
        for window in range(self.stable_windows, self.window_count):
            mapping = np.full(LOCAL_SPEAKERS, -1, np.int64)
            rows = history.chunk_ids == window
            mapping[history.local_ids[rows]] = named[rows]
            self._mapping[window] = mapping

    def _give_embedding(self, label: int, embedding: np.ndarray) -> None:
        turn = self._turns.get(label)
        if turn is not None:
            turn.emb_sum = turn.emb_sum + embedding
            turn.count += 1
            return
        total, count = self._carry.get(label, (np.zeros_like(embedding), 0))
        self._carry[label] = (total + embedding, count + 1)

    def _due_frames(self) -> int:
        """Frames [0, n) that are due once the last clustered window is in."""
        cfg = self.config
        if self._ended and not self._pending:
            return math.ceil(self._total / cfg.frame_step)
        end = self._starts[-1] + cfg.window_samples  # the window's last sample (exclusive)
        wait = max(round((cfg.latency_s - cfg.hop_s) * cfg.sample_rate), 0)
        horizon = min(end - wait, self._total)
        return max(horizon // cfg.frame_step, self._committed)

    def _commit(self, upto: int) -> list[TurnUpdate]:
        if upto <= self._committed:
            return []
        labels = self._labels(self._committed, upto)
        out: list[TurnUpdate] = []
        gap = self.config.max_gap_s / self.frame_s
        for offset, row in enumerate(labels):
            frame = self._committed + offset
            for label in list(self._turns):
                turn = self._turns[label]
                if not row[label] and frame + 1 - turn.end > gap:
                    out.append(self._update(turn, True))
                    del self._turns[label]
            for label in np.flatnonzero(row):
                label = int(label)
                turn = self._turns.get(label)
                if turn is None:
                    total, count = self._carry.pop(label, (np.zeros(max(self._dim, 1)), 0))
                    turn = _Turn(self._turn_count, label, frame, frame + 1, total, count)
                    self._turns[label] = turn
                    self._turn_count += 1
                turn.end = frame + 1
        self._committed = upto
        return out

    def _labels(self, lo: int, hi: int) -> np.ndarray:
        """Live labels of frames [lo, hi) from the windows clustered so far that cover them."""
        cfg = self.config
        reach = math.ceil(cfg.window_samples / cfg.hop_samples) + 2
        first = max(0, (lo * cfg.frame_step + cfg.window_samples) // cfg.hop_samples - reach)
        rows = range(first, self.window_count)
        return reconstruct(
            np.asarray([self._starts[i] for i in rows]),
            np.stack([self._activity[i] for i in rows]),
            np.stack([self._mapping[i] for i in rows]),
            self.agg,
            lo,
            hi,
            self.clustering.count,
        )

    def _update(self, turn: _Turn, final: bool, revision: int = 0) -> TurnUpdate:
        norm = max(float(np.linalg.norm(turn.emb_sum)), 1e-12)
        return TurnUpdate(
            turn.index,
            label_name(turn.label),
            turn.start * self.frame_s,
            min(turn.end * self.frame_s, self.audio_s),
            (turn.emb_sum / norm).astype(np.float32),
            turn.count,
            final,
            revision,
        )

    def _provisional(self) -> list[TurnUpdate]:
        """Open turns as known now, reaching into the frames the clustered windows already hear but
        that are not committed yet: an open turn is extended over its speaker's run right after it,
        and a speaker who starts there is shown as a tentative new turn under the index the next
        committed turn will take. So a new voice is labelled about one hop after its audio rather than
        `latency_s` after it. Tentative labels may still change; the committed turn replaces them under
        the same turn index (consumers keep the latest record of a segment)."""
        ahead = self._tentative_runs()
        gap = self.config.max_gap_s / self.frame_s
        shown: list[_Turn] = []
        for turn in sorted(self._turns.values(), key=lambda t: t.index):
            run = ahead.pop(turn.label, None)
            extends = run is not None and run[0] - turn.end <= gap
            shown.append(replace(turn, end=max(turn.end, run[1])) if extends else turn)
        index = self._turn_count
        for label, (start, end) in sorted(ahead.items(), key=lambda item: item[1][0]):
            total, count = self._carry.get(label, (np.zeros(max(self._dim, 1)), 0))
            shown.append(_Turn(index, label, start, end, total, count))
            index += 1
        out = []
        for turn in shown:
            key = (turn.label, turn.start, turn.end, turn.count)
            if self._shown.get(turn.index) != key:
                self._shown[turn.index] = key
                out.append(self._update(turn, False))
        return out

    def _tentative_runs(self) -> dict[int, tuple[int, int]]:
        """Per global speaker, its first run of frames [start, end) among the frames not committed yet
        that the windows clustered so far cover, by their labels as of now."""
        if not self._starts:
            return {}
        cfg = self.config
        frontier = min(self._starts[-1] + cfg.window_samples, self._total) // cfg.frame_step
        if frontier <= self._committed:
            return {}
        labels = self._labels(self._committed, frontier)
        runs = {}
        for label in np.flatnonzero(labels.any(axis=0)):
            column = labels[:, label]
            first = int(np.argmax(column))
            after = np.flatnonzero(~column[first:])
            length = int(after[0]) if len(after) else len(column) - first
            runs[int(label)] = (self._committed + first, self._committed + first + length)
        return runs

    def finish(self) -> list[TurnUpdate]:
        """End of stream (after `end_audio` and every embedding): commit the rest, close every turn."""
        out = self.updates()
        self._finished = True
        if self._pending:
            raise RuntimeError(f"finish with {len(self._pending)} windows not yet clustered")
        out += self._commit(math.ceil(self._total / self.config.frame_step))
        for turn in sorted(self._turns.values(), key=lambda t: t.index):
            out.append(self._update(turn, True))
        out += self._withdraw_tentative()
        self._turns.clear()
        self._shown.clear()
        return out

    def _withdraw_tentative(self) -> list[TurnUpdate]:
        """Tentative new turns whose index no committed turn took by the end: each is closed as an empty
        final segment, so that no provisional segment is left open for its consumers."""
        out = []
        for index, (label, start, _, _) in sorted(self._shown.items()):
            if index >= self._turn_count:
                at = min(start * self.frame_s, self.audio_s)
                empty = np.zeros(max(self._dim, 1), np.float32)
                out.append(TurnUpdate(index, label_name(label), at, at, empty, 0, True, 0))
        return out

    def close_idle_turn(self) -> list[TurnUpdate]:
        return self.updates()

    # -- end-of-stream revision --------------------------------------------------------------------
    def revise(self, revision: int = 1) -> list[TurnUpdate]:
        """Offline re-clustering of every window's local speakers: a complete final labelling."""
        if not self.window_count:
            return []
        history = self._offline_clusters()
        mapping = np.full((self.window_count, LOCAL_SPEAKERS), -1, np.int64)
        mapping[history.chunk_ids, history.local_ids] = history.named
        return self.labelling(mapping, revision)

    def windows(self) -> tuple[np.ndarray, np.ndarray]:
        """(first sample (windows,), speaker probabilities (windows, frames, 3)) of every clustered window:
        what an evaluation needs to map local speakers its own way."""
        if not self.window_count:
            return np.zeros(0, np.int64), np.zeros((0, 0, LOCAL_SPEAKERS), np.float32)
        return np.asarray(self._starts), np.stack(self._activity).astype(np.float32)

    def labelling(self, mapping: np.ndarray, revision: int = 1) -> list[TurnUpdate]:
        """Final segments of the whole stream when local speaker k of window c is global speaker
        `mapping[c, k]` (-1: none): the revision's mapping, or an evaluation's (e.g. an oracle's)."""
        activity = np.stack(self._activity).astype(np.float32)
        embeddings = np.stack(self._embeddings).astype(np.float32)
        speakers = int(mapping.max(initial=-1)) + 1
        frames = math.ceil(self._total / self.config.frame_step)
        labels = reconstruct(np.asarray(self._starts), activity, mapping, self.agg, 0, frames, speakers)
        return self._segments(labels, mapping, embeddings, revision)

    def _segments(
        self, labels: np.ndarray, mapping: np.ndarray, embeddings: np.ndarray, revision: int
    ) -> list[TurnUpdate]:
        cfg = self.config
        gap = cfg.max_gap_s / self.frame_s
        starts = np.asarray(self._starts)
        spans: list[_Turn] = []
        for label in range(labels.shape[1]):
            active = np.flatnonzero(labels[:, label])
            if not len(active):
                continue
            breaks = np.flatnonzero(np.diff(active) > gap + 1)
            for a, b in zip(np.r_[0, breaks + 1], np.r_[breaks, len(active) - 1], strict=True):
                lo, hi = int(active[a]), int(active[b]) + 1
                # embeddings of this speaker from windows overlapping the span
                rows = (starts < hi * cfg.frame_step) & (starts + cfg.window_samples > lo * cfg.frame_step)
                chunk_ids, local_ids = np.nonzero((mapping == label) & rows[:, None])
                emb = embeddings[chunk_ids, local_ids].astype(np.float64).sum(axis=0)
                spans.append(_Turn(0, label, lo, hi, emb, len(chunk_ids)))
        spans.sort(key=lambda t: (t.start, t.label))
        out = []
        for index, span in enumerate(spans):
            span.index = index
            out.append(self._update(span, True, revision))
        return out

    # -- snapshots ---------------------------------------------------------------------------------
    def snapshot(self, windows_from: int = 0) -> bytes:
        """The complete state as bytes (npz), taken when no window is awaiting segmentation or
        embeddings. Windows before `windows_from` are left out (see `window_rows`)."""
        if self._pending:
            raise RuntimeError(f"snapshot with {len(self._pending)} windows not yet clustered")
        scalars = {
            "format": SNAPSHOT_FORMAT,
            "config": asdict(self.config),
            "audio_start": self._audio_start,
            "total": self._total,
            "ended": self._ended,
            "next_chunk": self._next_chunk,
            "dim": self._dim,
            "committed": self._committed,
            "turn_count": self._turn_count,
            "finished": self._finished,
            "shown": {str(k): list(v) for k, v in self._shown.items()},
            "turns": [[t.index, t.label, t.start, t.end, t.count] for t in self._turns.values()],
            "carry": [[label, count] for label, (_, count) in self._carry.items()],
            "windows_from": windows_from,
        }
        arrays = self._rows(windows_from, self.window_count)
        arrays["audio"] = self._audio
        arrays["centres"] = self.clustering.centres
        arrays["retired"] = self.clustering.retired
        arrays["turn_sums"] = _stack([t.emb_sum for t in self._turns.values()])
        arrays["carry_sums"] = _stack([total for total, _ in self._carry.values()])
        buffer = io.BytesIO()
        np.savez(buffer, scalars=np.frombuffer(json.dumps(scalars).encode(), np.uint8), **arrays)
        return buffer.getvalue()

    def window_rows(self, start: int, stop: int) -> bytes:
        """Windows [start, stop) as bytes (npz), for snapshots that leave them out."""
        buffer = io.BytesIO()
        np.savez(buffer, **self._rows(start, stop))
        return buffer.getvalue()

    def _rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        frames = self._activity[0].shape[0] if self._activity else 0
        dim = self._embeddings[0].shape[1] if self._embeddings else 1
        pick = slice(start, stop)
        return {
            "w_start": np.asarray(self._starts[pick], np.int64),
            "w_activity": _stack(self._activity[pick], (0, frames, LOCAL_SPEAKERS), np.float16),
            "w_embedding": _stack(self._embeddings[pick], (0, LOCAL_SPEAKERS, dim), np.float16),
            "w_valid": _stack(self._valid[pick], (0, LOCAL_SPEAKERS), bool),
            "w_clean": _stack(self._clean[pick], (0, LOCAL_SPEAKERS), bool),
            "w_mapping": _stack(self._mapping[pick], (0, LOCAL_SPEAKERS), np.int64),
        }

    @classmethod
    def restore(cls, data: bytes, blocks: Sequence[bytes] = ()) -> SegmentationDiarizer:
        """A diarizer in exactly the state `snapshot()` captured; `blocks`: the left-out windows."""
        arrays = _load_npz(data)
        scalars = json.loads(arrays.pop("scalars").tobytes())
        if scalars["format"] != SNAPSHOT_FORMAT:
            raise ValueError(f"snapshot format {scalars['format']} is not {SNAPSHOT_FORMAT}")
        parts = [_load_npz(b) for b in blocks] + [arrays]
        if sum(len(p["w_start"]) for p in parts[:-1]) != scalars["windows_from"]:
            raise ValueError(f"snapshot needs the first {scalars['windows_from']} windows in blocks")
        self = cls(OverlapConfig(**scalars["config"]))
        for name in (
            "audio_start",
            "total",
            "ended",
            "next_chunk",
            "dim",
            "committed",
            "turn_count",
            "finished",
        ):
            setattr(self, f"_{name}", scalars[name])
        self._audio = arrays["audio"].astype(np.float32)
        self._shown = {int(k): tuple(v) for k, v in scalars["shown"].items()}
        for key, target in (
            ("w_start", self._starts),
            ("w_activity", self._activity),
            ("w_embedding", self._embeddings),
            ("w_valid", self._valid),
            ("w_clean", self._clean),
            ("w_mapping", self._mapping),
        ):
            for part in parts:
                target.extend(part[key].tolist() if key == "w_start" else list(part[key]))
        self.clustering.load_state({k: arrays[k] for k in ("centres", "retired") if k in arrays})
        for (index, label, start, end, count), total in zip(
            scalars["turns"], arrays["turn_sums"], strict=True
        ):
            self._turns[label] = _Turn(index, label, start, end, total.astype(np.float64), count)
        for (label, count), total in zip(scalars["carry"], arrays["carry_sums"], strict=True):
            self._carry[label] = (total.astype(np.float64), count)
        return self


def _align(clusters: np.ndarray, live: np.ndarray, first_free: int) -> np.ndarray:
    """Offline cluster ids renamed to the live labels they share most local speakers with."""
    if not len(clusters) or clusters.max() < 0:
        return clusters
    k = int(clusters.max()) + 1
    g = max(int(live.max(initial=-1)) + 1, 1)
    overlap = np.zeros((k, g))
    seen = (live >= 0) & (clusters >= 0)
    np.add.at(overlap, (clusters[seen], live[seen]), 1)
    rows, cols = linear_sum_assignment(-overlap)
    rename = {int(r): int(c) for r, c in zip(rows, cols, strict=True) if overlap[r, c] > 0}
    free = max(first_free, g)
    for c in range(k):
        if c not in rename:
            rename[c] = free
            free += 1
    return np.array([rename[int(c)] if c >= 0 else -1 for c in clusters], np.int64)


def _stack(rows: list, empty_shape: tuple = (0, 0), dtype=np.float64) -> np.ndarray:
    return np.stack(rows).astype(dtype) if rows else np.zeros(empty_shape, dtype)


def _load_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}
