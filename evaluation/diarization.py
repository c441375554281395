"""Scoring diarization against RTTM references with pyannote.metrics, live and after the revision.

Conventions (stated once, used everywhere):

- DER and JER come from `pyannote.metrics` with `skip_overlap=False` (overlapped speech is scored) at
  collars 0 and 0.25 s. pyannote's collar is the *total* width removed around each reference boundary
  (0.125 s either side for 0.25).
- **Live DER at latency L**: audio is fed in chunks; a sample *arrives* when the chunk holding it has
  been delivered. The live hypothesis at latency L gives each 10-ms frame at time t the labels of the
  segments that covered t, as last emitted (provisional or final) once audio up to arrival(t) + L had
  been processed. A frame no segment covered by then counts as no speech (missed if it was speech).
  Compute time is not part of this clock; it is reported separately as a real-time factor.
- The **live final** labelling is every segment in its last live version (latency infinity); the
  **revision** is the end-of-stream re-clustering that replaces it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pyannote.core import Annotation, Segment, Timeline
from pyannote.metrics.diarization import DiarizationErrorRate, JaccardErrorRate

from speakerflow.evaluation.baselines import baseline_windows, reference_design, speechbrain_spectral
from speakerflow.evaluation.corpus import load_manifest
from speakerflow.processors.audio import decode_file
from speakerflow.processors.diarization import DiarizerConfig, StreamDiarizer, TurnUpdate, Window
from speakerflow.processors.overlap_diarization import SegmentationDiarizer
from speakerflow.processors.vad import VadConfig

COLLARS = (0.0, 0.25)
FRAME_S = 0.01


@dataclass(frozen=True)
class Emission:
    """One segment version as emitted by a live diarizer, with the stream time it was emitted at."""

    clock_s: float  # audio processed (stream seconds) when this version was emitted
    segment_id: str
    label: str
    start_s: float
    end_s: float
    is_final: bool


# -- reading references ------------------------------------------------------------------------------
def load_rttm(path: Path | str) -> dict[str, Annotation]:
    """Annotations by file id from an RTTM file (SPEAKER lines only)."""
    out: dict[str, Annotation] = {}
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) < 8 or parts[0] != "SPEAKER":
            continue
        file_id, start, duration, speaker = parts[1], float(parts[3]), float(parts[4]), parts[7]
        annotation = out.setdefault(file_id, Annotation(uri=file_id))
        annotation[Segment(start, start + duration), len(annotation)] = speaker
    return out


def load_uem(path: Path | str) -> Timeline | None:
    """The scored regions of a UEM file (all files in it together), or None when it does not exist."""
    path = Path(path)
    if not path.is_file():
        return None
    segments = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 4:
            segments.append(Segment(float(parts[2]), float(parts[3])))
    return Timeline(segments).support() if segments else None


def annotation(segments: Iterable[tuple[float, float, str]], uri: str = "") -> Annotation:
    out = Annotation(uri=uri)
    for i, (start, end, label) in enumerate(segments):
        if end > start:
            out[Segment(start, end), i] = label
    return out


# -- live labellings ---------------------------------------------------------------------------------
def final_live(emissions: list[Emission], uri: str = "") -> Annotation:
    """Every segment in its last emitted version (what a consumer of the live topic ends up with)."""
    latest: dict[str, Emission] = {}
    for e in sorted(emissions, key=lambda e: e.clock_s):
        latest[e.segment_id] = e
    return annotation(((e.start_s, e.end_s, e.label) for e in latest.values()), uri)


def live_at_latency(
    emissions: list[Emission], latency_s: float, chunk_s: float, duration_s: float, uri: str = ""
) -> Annotation:
    """The labelling each frame had `latency_s` after its audio arrived (see the module docstring)."""
    frames = math.ceil(duration_s / FRAME_S)
    centres = (np.arange(frames) + 0.5) * FRAME_S
    arrival = np.minimum(np.ceil(centres / chunk_s - 1e-9) * chunk_s, duration_s)
    horizon = arrival + latency_s  # non-decreasing: the clock at which each frame is judged
    versions: dict[str, list[Emission]] = {}
    for e in sorted(emissions, key=lambda e: e.clock_s):
        versions.setdefault(e.segment_id, []).append(e)
    labels: dict[str, np.ndarray] = {}
    for chain in versions.values():
        for version, successor in zip(chain, [*chain[1:], None], strict=True):
            # Frames judged while this version was the newest one of its segment ...
            first = int(np.searchsorted(horizon, version.clock_s - 1e-9, side="left"))
            last = frames if successor is None else int(np.searchsorted(horizon, successor.clock_s - 1e-9))
            # ... and inside the version's extent.
            first = max(first, math.ceil(version.start_s / FRAME_S - 0.5))
            last = min(last, math.ceil(version.end_s / FRAME_S - 0.5))
            if last > first:
                labels.setdefault(version.label, np.zeros(frames, bool))[first:last] = True
    return _frames_to_annotation(labels, uri)


def _frames_to_annotation(labels: dict[str, np.ndarray], uri: str) -> Annotation:
    out = Annotation(uri=uri)
    for label, active in labels.items():
        edges = np.flatnonzero(np.diff(np.concatenate([[0], active.astype(np.int8), [0]])))
        for start, end in zip(edges[0::2], edges[1::2], strict=True):
            out[Segment(start * FRAME_S, end * FRAME_S), len(out)] = label
    return out


# -- scoring -----------------------------------------------------------------------------------------
def speaker_count(annotation_: Annotation, uem: Timeline | None, min_s: float = 0.0) -> int:
    """Labels with more than `min_s` of speech inside the scored region."""
    scoped = annotation_.crop(uem) if uem is not None else annotation_
    return sum(1 for label in scoped.labels() if scoped.label_duration(label) > min_s)


class Scorer:
    """Accumulates DER/JER per labelling (e.g. 'revision', 'live@2s') and collar, per file and in total."""

    def __init__(self, collars: tuple[float, ...] = COLLARS) -> None:
        self.collars = collars
        self._der: dict[tuple[str, float], DiarizationErrorRate] = {}
        self._jer: dict[tuple[str, float], JaccardErrorRate] = {}
        self._counts: dict[str, list[int]] = {}
        self.rows: list[dict] = []

    def add(
        self,
        file_id: str,
        labelling: str,
        reference: Annotation,
        hypothesis: Annotation,
        uem: Timeline | None,
    ) -> dict:
        """Score one file's hypothesis; returns (and keeps) its row."""
        uem = uem if uem is not None else _extent(reference, hypothesis)
        row: dict = {"file": file_id, "labelling": labelling}
        for collar in self.collars:
            der = self._der.setdefault(
                (labelling, collar), DiarizationErrorRate(collar=collar, skip_overlap=False)
            )
            jer = self._jer.setdefault(
                (labelling, collar), JaccardErrorRate(collar=collar, skip_overlap=False)
            )
            parts = der(reference, hypothesis, uem=uem, detailed=True)
            row[f"der@{collar}"] = parts["diarization error rate"]
            row[f"missed@{collar}"] = _share(parts, "missed detection")
            row[f"false_alarm@{collar}"] = _share(parts, "false alarm")
            row[f"confusion@{collar}"] = _share(parts, "confusion")
            row[f"jer@{collar}"] = jer(reference, hypothesis, uem=uem)
        ref_count = speaker_count(reference, uem)
        hyp_count = speaker_count(hypothesis, uem)
        row["ref_speakers"], row["hyp_speakers"] = ref_count, hyp_count
        row["count_error"] = hyp_count - ref_count
        self._counts.setdefault(labelling, []).append(hyp_count - ref_count)
        self.rows.append(row)
        return row

    def totals(self) -> dict[str, dict]:
        """Per labelling: DER components over all files (time-weighted), JER, speaker-count summary."""
        out: dict[str, dict] = {}
        for (labelling, collar), der in self._der.items():
            total = der.accumulated_
            entry = out.setdefault(labelling, {"files": len(self._counts.get(labelling, []))})
            entry[f"der@{collar}"] = abs(der)
            entry[f"missed@{collar}"] = _share(total, "missed detection")
            entry[f"false_alarm@{collar}"] = _share(total, "false alarm")
            entry[f"confusion@{collar}"] = _share(total, "confusion")
            entry[f"jer@{collar}"] = abs(self._jer[(labelling, collar)])
        for labelling, errors in self._counts.items():
            entry = out.setdefault(labelling, {})
            entry["count_exact"] = float(np.mean([e == 0 for e in errors])) if errors else math.nan
            entry["count_abs_error"] = float(np.mean(np.abs(errors))) if errors else math.nan
        return out


def _share(parts: dict, name: str) -> float:
    return parts[name] / parts["total"] if parts["total"] else 0.0


def _extent(reference: Annotation, hypothesis: Annotation) -> Timeline:
    both = reference.get_timeline().union(hypothesis.get_timeline())
    if not both:
        return Timeline([Segment(0.0, 1.0)])
    return Timeline([Segment(0.0, both.extent().end)])


# -- running the streaming diarizer offline ----------------------------------------------------------
@dataclass
class StreamRun:
    """What one stream produced: every live emission (with its clock) and the end-of-stream revision."""

    emissions: list[Emission]
    revision: list[tuple[float, float, str]]
    duration_s: float
    windows: int
    seconds: dict[str, float]  # compute time by step: vad (incl. windowing), embed, cluster, revise


def run_stream(
    audio: np.ndarray,
    config: DiarizerConfig,
    embed: Callable[[list[np.ndarray]], np.ndarray],
    chunk_s: float = 0.5,
    sample_rate: int = 16000,
) -> StreamRun:
    """Feed `audio` chunk by chunk through a StreamDiarizer, as the diarize stage does (one embedding
    batch per chunk), as fast as the compute allows."""
    diarizer = StreamDiarizer(config)
    step = max(int(chunk_s * sample_rate), 1)
    seconds = dict.fromkeys(("vad", "embed", "cluster", "revise"), 0.0)
    emissions: list[Emission] = []
    record = emission_recorder(diarizer, emissions)

    def embed_and_cluster(windows: list[Window]) -> None:
        t0 = time.perf_counter()
        embeddings = embed([w.samples for w in windows]) if windows else np.zeros((0, 1), np.float32)
        t1 = time.perf_counter()
        record(diarizer.add_embeddings(windows, embeddings))
        seconds["embed"] += t1 - t0
        seconds["cluster"] += time.perf_counter() - t1

    for start in range(0, len(audio), step):
        t0 = time.perf_counter()
        windows = diarizer.push_audio(audio[start : start + step])
        seconds["vad"] += time.perf_counter() - t0
        embed_and_cluster(windows)
    t0 = time.perf_counter()
    windows = diarizer.end_audio()
    seconds["vad"] += time.perf_counter() - t0
    embed_and_cluster(windows)
    return finish_run(diarizer, emissions, seconds, len(audio) / sample_rate)


def emission_recorder(
    diarizer: StreamDiarizer | SegmentationDiarizer, emissions: list[Emission]
) -> Callable[[list[TurnUpdate]], None]:
    """Appends a diarizer's updates to `emissions`, stamped with how much audio it had then."""

    def record(updates: list[TurnUpdate]) -> None:
        emissions.extend(
            Emission(diarizer.audio_s, str(u.turn_index), u.label, u.start_s, u.end_s, u.is_final)
            for u in updates
        )

    return record


def finish_run(
    diarizer: StreamDiarizer | SegmentationDiarizer,
    emissions: list[Emission],
    seconds: dict[str, float],
    duration_s: float,
) -> StreamRun:
    """End of stream: the last live updates (timed as clustering), then the revision (timed apart)."""
    t0 = time.perf_counter()
    emission_recorder(diarizer, emissions)(diarizer.finish())
    seconds["cluster"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    revision = [(u.start_s, u.end_s, u.label) for u in diarizer.revise()]
    seconds["revise"] = time.perf_counter() - t0
    return StreamRun(emissions, revision, duration_s, diarizer.window_count, seconds)


# -- evaluating a manifest ---------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalItem:
    file_id: str
    audio: Path
    rttm: Path
    uem: Path | None


def multi_speaker_items(manifest: Path | str) -> list[EvalItem]:
    """Every `speaker=multi` row of a manifest with an RTTM beside its audio (UEM when present)."""
    items = []
    for u in load_manifest(manifest):
        rttm = u.path.with_suffix(".rttm")
        if u.speaker == "multi" and rttm.is_file():
            uem = u.path.with_suffix(".uem")
            items.append(EvalItem(u.path.stem, u.path, rttm, uem if uem.is_file() else None))
    return items


@dataclass
class FileResult:
    """Hypotheses of one file, by labelling name (for plots and JSON)."""

    item: EvalItem
    reference: Annotation
    hypotheses: dict[str, Annotation]
    run: StreamRun


def evaluate_item(
    item: EvalItem,
    config: DiarizerConfig,
    embed: Callable[[list[np.ndarray]], np.ndarray],
    scorer: Scorer,
    latencies: tuple[float, ...],
    chunk_s: float = 0.5,
    baselines: bool = False,
    runner: Callable[[np.ndarray], StreamRun] | None = None,
    peers: dict[str, Callable[[np.ndarray], list[tuple[float, float, str]]]] | None = None,
    baseline_vad: VadConfig | None = None,
) -> FileResult:
    """Stream one file through the diarizer (`runner`: another diarizer mode), the baselines and the
    `peers` (whole-file systems, evaluation/peers.py), and score every labelling. The baselines cut
    speech with `baseline_vad` (default: the light diarizer's, `config.vad`)."""
    audio = decode_file(item.audio)
    reference = load_rttm(item.rttm).get(item.file_id, Annotation(uri=item.file_id))
    uem = load_uem(item.uem) if item.uem else None
    run = runner(audio) if runner is not None else run_stream(audio, config, embed, chunk_s)
    hypotheses = {"revision": annotation(run.revision, item.file_id)}
    hypotheses["live_final"] = final_live(run.emissions, item.file_id)
    for latency in latencies:
        hypotheses[f"live@{latency:g}s"] = live_at_latency(
            run.emissions, latency, chunk_s, run.duration_s, item.file_id
        )
    if baselines:
        windows = baseline_windows(audio, embed, baseline_vad or config.vad)
        hypotheses["baseline_ahc"] = annotation(reference_design(windows), item.file_id)
        hypotheses["baseline_spectral"] = annotation(speechbrain_spectral(windows), item.file_id)
    for name, peer in (peers or {}).items():
        hypotheses[name] = annotation(peer(audio), item.file_id)
    for name, hypothesis in hypotheses.items():
        scorer.add(item.file_id, name, reference, hypothesis, uem)
    return FileResult(item, reference, hypotheses, run)


def overlap_regions(annotation_: Annotation) -> Timeline:
    """Where two or more distinct labels are active at once (two turns of one label do not count)."""
    events: list[tuple[float, int]] = []
    for label in annotation_.labels():
        for seg in annotation_.label_timeline(label).support():
            events += [(seg.start, 1), (seg.end, -1)]
    regions = Timeline(uri=annotation_.uri)
    active, opened = 0, 0.0
    for t, step in sorted(events):  # at a tie an end (-1) sorts before a start: touching is no overlap
        if step > 0 and active == 1:
            opened = t
        elif step < 0 and active == 2 and t > opened:
            regions.add(Segment(opened, t))
        active += step
    return regions.support()


def plot_timeline(
    result: FileResult, path: Path, labellings: tuple[str, ...] = ("revision", "live@2s")
) -> None:
    """Reference speakers above, hypotheses below, one lane per speaker (PNG). Grey bands across the
    whole picture: reference overlap (two or more speakers at once); hatching on a hypothesis' lanes:
    that hypothesis gives two labels at once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    groups = [("ref", result.reference)] + [
        (name, result.hypotheses[name]) for name in labellings if name in result.hypotheses
    ]
    rows = [(name, lbl, ann) for name, ann in groups for lbl in ann.labels()]
    n = len(rows)
    fig, ax = plt.subplots(figsize=(12, 0.32 * n + 1.9))
    colours = {name: plt.get_cmap("tab10")(i) for i, (name, _) in enumerate(groups)}
    ref_overlap = overlap_regions(result.reference)
    for seg in ref_overlap:
        ax.axvspan(seg.start, seg.end, color="0.82", zorder=0, lw=0)
    y = n
    legend = [Patch(facecolor="0.82", label="overlap in reference (2+ speakers at once)")]
    overlap_s = [f"reference {ref_overlap.duration():.1f} s"]
    for name, ann in groups:
        lanes = len(ann.labels())
        if name != "ref":
            regions = overlap_regions(ann)
            overlap_s.append(f"{name} {regions.duration():.1f} s")
            spans = [(seg.start, seg.duration) for seg in regions]
            ax.broken_barh(
                spans,
                (y - lanes, lanes),
                facecolors="none",
                edgecolors=colours[name],
                hatch="////",
                lw=0,
                zorder=1,
            )
        for label in ann.labels():
            spans = [(s.start, s.duration) for s in ann.label_timeline(label)]
            ax.broken_barh(spans, (y - 0.8, 0.6), facecolors=colours[name], zorder=2)
            y -= 1
        ax.axhline(y, color="0.3", lw=0.6, zorder=3)
    legend.append(Patch(facecolor="white", edgecolor="0.3", hatch="////", label="ours: two labels at once"))
    legend += [
        Patch(facecolor=colours[name], label="reference" if name == "ref" else name) for name, _ in groups
    ]
    ax.set_yticks([n - i - 0.5 for i in range(n)])
    ax.set_yticklabels([f"{name}: {label}" for name, label, _ in rows], fontsize=7)
    ax.set_ylim(0, n)
    ax.set_xlabel("seconds")
    ax.set_xlim(0, result.run.duration_s)
    ax.set_title(f"{result.item.file_id} - overlapped speech: {', '.join(overlap_s)}", fontsize=9, pad=22)
    ax.legend(
        handles=legend,
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        ncol=len(legend),
        fontsize=7,
        frameon=False,
        handlelength=2.2,
    )
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
