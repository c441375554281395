"""Identification: the stream side of the stream-table join against the gallery.

For each diarized speaker of a stream (stream id, label) the matcher keeps every segment it has seen
(one mean embedding per segment, weighted by its windows; provisional updates of a segment replace
each other, never count twice). A segment is identified from its own embedding pooled with the
segments of its label that sound like it (cosine >= threshold + `consistency`), so the identity
becomes more certain as the speaker keeps talking, while a turn that live diarization put into the
wrong label (live labels are not pure: README, "Streaming diarization") does not inherit a name that
is not its own.

Decisions, made again whenever a segment of the stream arrives:

- threshold: a name needs at least the calibrated threshold;
- margin: ...and the best voiceprint must beat the runner-up by `margin`, unless the score is
  sure (>= threshold + `sure_offset`). A stranger tends to score alike against several voiceprints;
  an enrolled speaker stands out. What the rule buys (strangers labelled UNKNOWN, enrolled speech
  named right) is measured by `speakerflow eval gallery`; the figures are in the README ("Gallery:
  voiceprints, identification, verification");
- exclusive assignment (optional): two labels of one stream cannot both be Alice. The labels (each
  represented by its latest segment's evidence) and the candidate voiceprints are matched by an
  optimal assignment (Hungarian algorithm) maximising the evidence-weighted score above threshold,
  so the label with more, and more similar, speech keeps the name and the other gets its next
  acceptable candidate or UNKNOWN. Labels that sound like one voice share an identity instead;
- re-labelling (optional): an earlier final segment whose identity, decided again with the evidence
  now at hand, differs from what it was emitted with is emitted again, once its evidence rests on
  `settle_windows` windows (at once if its speaker was deleted). The correction keeps the segment's
  id and `revision` (the revision numbers the diarizer's labellings of the stream), so consumers
  apply it as an update: the latest record of a (segment id, revision) wins, and the rows of a
  stream's highest revision are its current labelling. A new diarizer revision of the stream
  (end-of-stream re-clustering) supersedes the live labelling: only its segments count from then on.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from speakerflow.gallery.index import VectorIndex, make_index
from speakerflow.gallery.voiceprint import Voiceprint
from speakerflow.processors.scoring import Calibration

log = logging.getLogger(__name__)
UNKNOWN = "UNKNOWN"


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / max(float(np.linalg.norm(vector)), 1e-12)


@dataclass(frozen=True)
class Identification:
    speaker_id: str | None
    name: str
    score: float
    confidence: float
    candidates: list[tuple[str, str, float]]  # (speaker id, name, score), best first


class Gallery:
    """The materialised gallery table: voiceprints of one model, searchable, updated live.

    The index is exact up to `exact_max` voiceprints and IVF above (see gallery/index.py).
    `version` increases with every change, so that cached decisions know when to look again.
    """

    def __init__(self, model_id: str, dim: int, exact_max: int = 50_000, **index_options: Any) -> None:
        self.model_id = model_id
        self.dim = dim
        self.index: VectorIndex = make_index(dim, exact_max, **index_options)
        self._voiceprints: dict[str, Voiceprint] = {}
        self._lock = threading.Lock()
        self.skipped_other_model = 0
        self._reported_models: set[str] = set()
        self.version = 0

    def __len__(self) -> int:
        return len(self._voiceprints)

    def __contains__(self, speaker_id: str) -> bool:
        return speaker_id in self._voiceprints

    def get(self, speaker_id: str) -> Voiceprint | None:
        return self._voiceprints.get(speaker_id)

    def speakers(self) -> list[Voiceprint]:
        with self._lock:
            return list(self._voiceprints.values())

    def upsert(self, voiceprint: Voiceprint) -> bool:
        """Apply a gallery record; voiceprints of another model are ignored (never compared)."""
        if voiceprint.model_id != self.model_id or voiceprint.dim != self.dim:
            self.skipped_other_model += 1
            if voiceprint.model_id not in self._reported_models:
                # Said once per foreign model: e.g. a GE2E gallery read by CAM++ workers after the switch.
                self._reported_models.add(voiceprint.model_id)
                log.warning(
                    "gallery holds voiceprints of model %s (dim %d), not of this worker's %s (dim %d): "
                    "ignored, never compared; re-enroll those speakers with %s",
                    voiceprint.model_id,
                    voiceprint.dim,
                    self.model_id,
                    self.dim,
                    self.model_id,
                )
            return False
        with self._lock:
            self._voiceprints[voiceprint.speaker_id] = voiceprint
            self.index.upsert(voiceprint.speaker_id, voiceprint.embedding)
            self.version += 1
        return True

    def delete(self, speaker_id: str) -> bool:
        with self._lock:
            self._voiceprints.pop(speaker_id, None)
            deleted = self.index.delete(speaker_id)
            self.version += 1
            return deleted

    def name_of(self, speaker_id: str) -> str:
        vp = self._voiceprints.get(speaker_id)
        return vp.name if vp else speaker_id


@dataclass
class Emission:
    """One identified segment to publish: the caller's segment payload with an identity."""

    payload: Any
    identification: Identification
    revision: int
    relabelled: bool  # an earlier segment re-emitted because its label's identity settled


@dataclass
class _Segment:
    label: str
    embedding: np.ndarray
    window_count: int
    payload: Any
    is_final: bool
    in_revision: int  # the diarizer's revision
    out_revision: int  # what we emit: the diarizer's revision (corrections keep it)
    emitted_speaker: str | None = None
    emitted: bool = False


@dataclass
class _Stream:
    segments: dict[str, _Segment] = field(default_factory=dict)
    identities: dict[str, Identification] = field(default_factory=dict)  # latest decision per label
    # The diarizer's newest labelling (its highest revision seen): an end-of-stream re-clustering
    # replaces the live labelling, so only segments of the newest one count as evidence.
    labelling: int = 0
    gallery_version: int = -1  # the gallery version the emitted identities were decided against

    def current(self) -> dict[str, list[tuple[str, _Segment]]]:
        """Segments of the newest labelling, by label, in arrival order."""
        by_label: dict[str, list[tuple[str, _Segment]]] = {}
        for segment_id, segment in self.segments.items():
            if segment.in_revision >= self.labelling:
                by_label.setdefault(segment.label, []).append((segment_id, segment))
        return by_label


# The margin rule and pooling in cosine units per embedder family (model id prefix); the Matcher's own
# defaults are GE2E's. CAM++'s were chosen on `eval gallery --seed 0` only (README, identification).
RULES_BY_FAMILY: dict[str, dict[str, float]] = {
    "campplus": {"margin": 0.16, "sure_offset": 0.15, "consistency": 0.0},
}


def rules_for(model_id: str) -> dict[str, float]:
    """margin, sure_offset and consistency for the embedder family of `model_id`."""
    ge2e = {"margin": Matcher.margin, "sure_offset": Matcher.sure_offset, "consistency": Matcher.consistency}
    return ge2e | RULES_BY_FAMILY.get(model_id.split("-", 1)[0], {})


@dataclass
class Matcher:
    """Identifies the diarized segments of every stream against `gallery`. See the module docstring.

    threshold: the calibration's; a name needs at least this cosine.
    margin / sure_offset: a name also needs the best score to beat the runner-up by `margin`, unless
        the score reaches `threshold + sure_offset`, where no stranger is expected to get (0 = off).
    consistency: segments of one label are evidence for each other only if their embeddings have a
        cosine of at least `threshold + consistency`: live diarization sometimes puts two voices in
        one label, and pooling those would hand one voice's name to the other.
    exclusive / relabel / settle_windows: see the module docstring.
    """

    gallery: Gallery
    calibration: Calibration
    top_k: int = 3
    # Defaults measured with GE2E on ../shared/data (`speakerflow eval gallery`); cosine units, so
    # another model may want others.
    margin: float = 0.08
    exclusive: bool = True
    relabel: bool = True
    settle_windows: int = 8  # windows of evidence (about 4-6 s of speech) before re-labelling
    sure_offset: float = 0.08
    consistency: float = 0.08
    _streams: dict[str, _Stream] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- the stream join ---------------------------------------------------------------------------
    def observe(
        self,
        stream_id: str,
        segment_id: str,
        label: str,
        embedding: np.ndarray,
        window_count: int,
        *,
        is_final: bool = False,
        revision: int = 0,
        payload: Any = None,
    ) -> list[Emission]:
        """Take one diarized segment (or an update of it) and return what to emit: this segment with
        its identity, then any earlier segments whose identity changed."""
        with self._lock:
            stream = self._streams.setdefault(stream_id, _Stream())
            segment = self._update_segment(stream, segment_id, label, embedding, window_count, revision)
            segment.payload, segment.is_final = payload, is_final
            stream.labelling = max(stream.labelling, revision)
            by_label = stream.current()
            stream.identities = self._decide(by_label, segment)
            emissions = [self._emit(segment, stream.identities[label], relabelled=False)]
            if self.relabel:
                emissions += self._relabel(stream, by_label, skip=segment_id, label=label)
            stream.gallery_version = self.gallery.version
            return emissions

    def _update_segment(
        self,
        stream: _Stream,
        segment_id: str,
        label: str,
        embedding: np.ndarray,
        window_count: int,
        revision: int,
    ) -> _Segment:
        vector = np.asarray(embedding, np.float32)
        # A zero embedding is no evidence (window_count 0: the second voice of an overlap, whose
        # audio was embedded as the first voice's); any other embedding counts as at least a window.
        count = max(int(window_count), 1) if float(np.linalg.norm(vector)) > 0 else 0
        segment = stream.segments.get(segment_id)
        if segment is None:
            segment = _Segment(label, vector, count, None, False, revision, revision)
            stream.segments[segment_id] = segment
            return segment
        if revision > segment.in_revision:
            segment.out_revision = segment.in_revision = revision
        segment.label, segment.embedding, segment.window_count = label, vector, count
        return segment

    def _evidence(self, members: list[tuple[str, _Segment]], segment: _Segment) -> tuple[np.ndarray, int]:
        """`segment`'s embedding pooled with the segments of its label that sound like it (weighted
        by windows), and how many windows that evidence rests on. A segment without windows of its
        own is whoever its label is: all of the label's evidence."""
        vectors = np.stack([m.embedding for _, m in members])
        weights = np.array([m.window_count for _, m in members], np.float32)
        if segment.window_count == 0:
            alike = weights > 0
        else:
            alike = vectors @ segment.embedding >= self.calibration.threshold + self.consistency
        total = weights[alike] @ vectors[alike] if alike.any() else segment.embedding * segment.window_count
        windows = int(weights[alike].sum()) if alike.any() else segment.window_count
        return total / max(float(np.linalg.norm(total)), 1e-12), windows

    def _decide(
        self, by_label: dict[str, list[tuple[str, _Segment]]], segment: _Segment
    ) -> dict[str, Identification]:
        """The identity of every label: `segment` speaks for its label, the latest segment of each
        other label for theirs; jointly assigned when exclusive."""
        names = list(by_label)
        speakers = [segment if n == segment.label else by_label[n][-1][1] for n in names]
        evidence = [self._evidence(by_label[n], seg) for n, seg in zip(names, speakers, strict=True)]
        vectors = np.stack([v for v, _ in evidence])
        windows = [w for _, w in evidence]
        groups = self._same_voice_groups(vectors) if self.exclusive else [[i] for i in range(len(names))]
        group_vectors = np.stack([_unit(sum(vectors[i] * windows[i] for i in g)) for g in groups])
        depth = max(self.top_k, 2) + (len(groups) - 1 if self.exclusive else 0)
        hits = self.gallery.index.search(group_vectors, depth)
        accepted = [self._acceptable(h) for h in hits]
        if self.exclusive and len(groups) > 1:
            chosen = self._assign(accepted, [sum(windows[i] for i in g) for g in groups])
        else:
            chosen = [a[0] if a else None for a in accepted]
        decisions: dict[str, Identification] = {}
        named = {c[0] for c in chosen if c is not None}
        for group, group_hits, choice in zip(groups, hits, chosen, strict=True):
            ident = self._identification(group_hits, choice, taken=named)
            decisions.update({names[i]: ident for i in group})
        return decisions

    def _same_voice_groups(self, vectors: np.ndarray) -> list[list[int]]:
        """Labels whose evidence sounds like one voice (diarization split it) share an identity
        instead of competing for it under exclusive assignment."""
        if len(vectors) == 1:
            return [[0]]
        similar = vectors @ vectors.T >= self.calibration.threshold + self.consistency
        parent = list(range(len(vectors)))

        def root(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for i, j in zip(*np.nonzero(np.triu(similar, 1)), strict=True):
            parent[root(int(i))] = root(int(j))
        groups: dict[int, list[int]] = {}
        for i in range(len(vectors)):
            groups.setdefault(root(i), []).append(i)
        return list(groups.values())

    def _acceptable(self, hits: list[tuple[str, float]]) -> list[tuple[str, float]]:
        """Candidates a label may be given: above threshold, and the best only if the margin rule
        holds (ambiguous between two voiceprints, or a stranger close to several: UNKNOWN)."""
        if not hits:
            return []
        best = hits[0][1]
        runner_up = hits[1][1] if len(hits) > 1 else -1.0
        sure = best >= self.calibration.threshold + self.sure_offset
        if self.margin > 0 and best - runner_up < self.margin and not sure:
            return []
        return [(sid, score) for sid, score in hits if score >= self.calibration.threshold]

    def _assign(
        self, accepted: list[list[tuple[str, float]]], windows: list[int]
    ) -> list[tuple[str, float] | None]:
        """Optimal one-to-one groups -> speakers, maximising sum(windows * (score - threshold)):
        weighting by windows gives the name to the group with more speech when two compete."""
        speakers = sorted({sid for options in accepted for sid, _ in options})
        chosen: list[tuple[str, float] | None] = [None] * len(accepted)
        if not speakers:
            return chosen
        column = {sid: j for j, sid in enumerate(speakers)}
        # Columns: the speakers, then one "UNKNOWN" column per group (gain 0); forbidden pairs cost a lot.
        forbidden = 1e9
        cost = np.full((len(accepted), len(speakers) + len(accepted)), forbidden)
        for i, options in enumerate(accepted):
            cost[i, len(speakers) + i] = 0.0
            for sid, score in options:
                cost[i, column[sid]] = -windows[i] * (score - self.calibration.threshold + 1e-6)
        rows, cols = linear_sum_assignment(cost)
        for i, j in zip(rows, cols, strict=True):
            if j < len(speakers) and cost[i, j] < forbidden:
                sid = speakers[j]
                chosen[i] = (sid, next(score for s, score in accepted[i] if s == sid))
        return chosen

    def _identification(
        self, hits: list[tuple[str, float]], chosen: tuple[str, float] | None, taken: set[str] | None = None
    ) -> Identification:
        candidates = [(sid, self.gallery.name_of(sid), score) for sid, score in hits[: self.top_k]]
        if chosen is None:
            best = hits[0][1] if hits else 0.0
            return Identification(
                None, UNKNOWN, best, self._unknown_confidence(hits, taken or set()), candidates
            )
        sid, score = chosen
        return Identification(
            sid, self.gallery.name_of(sid), score, self.calibration.confidence(score), candidates
        )

    def _unknown_confidence(self, hits: list[tuple[str, float]], taken: set[str]) -> float:
        """How sure UNKNOWN is: 1 - sigmoid(slope * (score - bar)), the mirror of a name's confidence
        (both are >= 0.5 on their side of the rules). When the margin rule refused the label, score is
        the best and the bar threshold + sure_offset (the score that would have named it anyway); else
        score is the best of the speakers still open to the label (one named on another label of the
        stream is not, under exclusive assignment) and the bar is the threshold."""
        if not hits:
            return 1.0 - self.calibration.confidence(-1.0)
        best = hits[0][1]
        runner_up = hits[1][1] if len(hits) > 1 else -1.0
        sure = best >= self.calibration.threshold + self.sure_offset
        if self.margin > 0 and best - runner_up < self.margin and not sure:
            return 1.0 - self.calibration.confidence(best - self.sure_offset)
        open_scores = [score for sid, score in hits if sid not in taken]
        return 1.0 - self.calibration.confidence(open_scores[0] if open_scores else -1.0)

    def _emit(self, segment: _Segment, ident: Identification, relabelled: bool) -> Emission:
        segment.emitted_speaker, segment.emitted = ident.speaker_id, True
        return Emission(segment.payload, ident, segment.out_revision, relabelled)

    def _relabel(
        self, stream: _Stream, by_label: dict[str, list[tuple[str, _Segment]]], skip: str, label: str
    ) -> list[Emission]:
        """Earlier final segments whose identity, decided again with all the evidence now at hand,
        differs from what they were emitted with: only those of the label that just grew, or all
        of them when the gallery changed (a speaker enrolled, updated or deleted)."""
        everything = stream.gallery_version != self.gallery.version
        owners = {ident.speaker_id: name for name, ident in stream.identities.items() if ident.speaker_id}
        out = []
        for name, members in by_label.items():
            if name != label and not everything:
                continue
            for segment_id, segment in members:
                if segment_id == skip or not segment.is_final or not segment.emitted:
                    continue
                vector, windows = self._evidence(members, segment)
                hits = self.gallery.index.search(vector, max(self.top_k, 2))[0]
                accepted = self._acceptable(hits)
                ident = self._identification(hits, accepted[0] if accepted else None)
                if ident.speaker_id == segment.emitted_speaker:
                    continue
                gone = segment.emitted_speaker is not None and segment.emitted_speaker not in self.gallery
                taken = self.exclusive and owners.get(ident.speaker_id, name) != name
                if gone or (windows >= self.settle_windows and not taken):
                    out.append(self._emit(segment, ident, relabelled=True))
        return out

    # -- one-off identification and housekeeping ---------------------------------------------------
    def identify(self, embedding: np.ndarray) -> Identification:
        """The identity of one embedding on its own (threshold and margin rules; no stream state)."""
        hits = self.gallery.index.search(np.asarray(embedding, np.float32), max(self.top_k, 2))[0]
        accepted = self._acceptable(hits)
        return self._identification(hits, accepted[0] if accepted else None)

    def identities(self, stream_id: str) -> dict[str, Identification]:
        """The current identity of every label of a stream."""
        with self._lock:
            stream = self._streams.get(stream_id)
            return dict(stream.identities) if stream else {}

    def streams(self) -> list[str]:
        with self._lock:
            return list(self._streams)

    def end_stream(self, stream_id: str) -> None:
        with self._lock:
            self._streams.pop(stream_id, None)
