"""Conversation simulator: realistic multi-speaker recordings built from single-speaker utterances.

Each conversation picks 2-6 speakers, cuts their utterances into turns at natural pauses, and lays the
turns out in turn-taking order with pauses, optional overlapped speech and per-speaker level
differences over a faint noise floor. The reference (RTTM) marks where each speaker actually speaks:
every turn's phrases are found with an energy detector that is independent of the silero VAD the
diarizer uses, so the reference does not flatter the system under test.

Everything is drawn from one seeded generator over sorted inputs: the same seed and corpus give
byte-identical output.
"""

from __future__ import annotations

import csv
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from speakerflow.evaluation.corpus import SAMPLE_RATE, Turn, Utterance, load_audio, write_rttm

SPLITS = ("all", "tune", "eval")
_FRAME_S = 0.01  # energy-detector hop
_MIN_PAUSE_S = 0.25  # a silence at least this long separates two phrases
_BRIDGE_S = 0.3  # reference speech of one speaker closer than this is one RTTM turn
_PAD_S = 0.05  # audio kept around each phrase


@dataclass(frozen=True)
class SimulationConfig:
    """What to simulate. Durations in seconds unless named otherwise."""

    speakers: tuple[int, int] = (2, 6)  # inclusive range of speakers per conversation
    minutes: float = 30.0  # total audio to generate, over all conversations
    file_minutes: float = 3.0  # target length of one conversation (shorter if its speakers run out)
    overlap: float = 0.0  # target fraction of speech time during which two speakers talk at once
    min_speech_s: float = 10.0  # speakers with less speech in the corpus never take part
    pause_s: tuple[float, float] = (0.2, 1.2)  # pause between turns (uniform)
    overlap_s: tuple[float, float] = (0.5, 2.5)  # length of one overlap (uniform, at most half a turn)
    turn_s: tuple[float, float] = (1.5, 10.0)  # turn length range; a turn is whole phrases
    level_db: float = 6.0  # each speaker's level is drawn within +-level_db of the others
    noise_dbfs: float = -60.0  # white noise floor under the whole conversation
    split: str = "all"  # all speakers, or the tune / eval partition (disjoint, see speaker_split)
    seed: int = 0

    def __post_init__(self) -> None:
        low, high = self.speakers
        if not 2 <= low <= high:
            raise ValueError(f"speakers must be a range within 2.., got {self.speakers}")
        if not 0.0 <= self.overlap < 0.5:
            raise ValueError(f"overlap must be in [0, 0.5), got {self.overlap}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.minutes <= 0 or self.file_minutes <= 0:
            raise ValueError("minutes and file_minutes must be positive")


@dataclass
class Conversation:
    file_id: str
    audio: np.ndarray  # 16 kHz mono float32
    reference: list[Turn]  # speech of each speaker, may overlap between speakers
    speakers: list[str]
    sources: list[Utterance] = field(default_factory=list)

    @property
    def duration_s(self) -> float:
        return len(self.audio) / SAMPLE_RATE

    def speech_s(self) -> float:
        return sum(t.end_s - t.start_s for t in self.reference)

    def overlap_s(self) -> float:
        """Seconds during which at least two speakers talk."""
        return _covered_by_two(self.reference)


def speaker_split(speaker: str) -> str:
    """'tune' for about a third of the speakers (by a hash of the name), 'eval' for the rest.

    A stable partition: parameters are tuned on conversations of 'tune' speakers and the reported
    numbers come from conversations of 'eval' speakers, which the tuning never heard.
    """
    return "tune" if zlib.crc32(speaker.encode()) % 3 == 0 else "eval"


def eligible_speakers(
    utterances: list[Utterance], min_speech_s: float, split: str = "all"
) -> dict[str, list[Utterance]]:
    """Single-speaker utterances by speaker, for speakers with at least `min_speech_s` in total."""
    groups: dict[str, list[Utterance]] = {}
    for u in sorted(utterances, key=lambda u: str(u.path)):
        if u.speaker == "multi" or (split != "all" and speaker_split(u.speaker) != split):
            continue
        groups.setdefault(u.speaker, []).append(u)
    return {s: us for s, us in sorted(groups.items()) if sum(u.duration_s for u in us) >= min_speech_s}


# -- phrases: where a single-speaker recording has speech ------------------------------------------
def phrases(audio: np.ndarray, min_pause_s: float = _MIN_PAUSE_S) -> list[tuple[float, float]]:
    """Speech stretches (start_s, end_s) of a clean single-speaker recording, by frame energy.

    A frame is speech when it is within 35 dB of the loudest frame and 8 dB above the recording's
    floor (10th percentile); silences shorter than `min_pause_s` do not split a phrase.
    """
    hop = int(_FRAME_S * SAMPLE_RATE)
    count = len(audio) // hop
    if count == 0:
        return []
    frames = audio[: count * hop].astype(np.float64).reshape(count, hop)
    energy_db = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12)
    threshold = max(float(energy_db.max()) - 35.0, float(np.percentile(energy_db, 10)) + 8.0)
    active = energy_db > threshold
    out: list[tuple[float, float]] = []
    start = None
    silent = 0
    for i, on in enumerate(active):
        if on:
            if start is None:
                start = i
            silent = 0
        elif start is not None:
            silent += 1
            if silent * _FRAME_S >= min_pause_s:
                out.append((start * _FRAME_S, (i - silent + 1) * _FRAME_S))
                start, silent = None, 0
    if start is not None:
        out.append((start * _FRAME_S, (count - silent) * _FRAME_S))
    return [(a, b) for a, b in out if b - a >= 0.1]  # clicks are not speech


@dataclass
class _Piece:
    """One turn's audio and the speech inside it (seconds from the piece start)."""

    speaker: str
    audio: np.ndarray
    speech: list[tuple[float, float]]

    @property
    def duration_s(self) -> float:
        return len(self.audio) / SAMPLE_RATE


def _turns_of(speaker: str, audio: np.ndarray, rng: np.random.Generator, turn_s: tuple[float, float]):
    """Cut one utterance into turns of whole phrases, each about a random target length long."""
    found = phrases(audio)
    i = 0
    while i < len(found):
        target = float(np.clip(rng.lognormal(np.log(4.0), 0.5), *turn_s))
        j = i + 1
        while j < len(found) and found[j][1] - found[i][0] < target:
            j += 1
        first = max(found[i][0] - _PAD_S, 0.0)
        last = min(found[j - 1][1] + _PAD_S, len(audio) / SAMPLE_RATE)
        clip = audio[int(first * SAMPLE_RATE) : int(last * SAMPLE_RATE)]
        speech = [(max(a - first, 0.0), min(b - first, len(clip) / SAMPLE_RATE)) for a, b in found[i:j]]
        if found[j - 1][1] - found[i][0] >= 0.3:  # fragments shorter than this are not turns
            yield _Piece(speaker, clip, speech)
        i = j


def _active_rms(piece: _Piece) -> float:
    parts = [piece.audio[int(a * SAMPLE_RATE) : int(b * SAMPLE_RATE)] for a, b in piece.speech]
    joined = np.concatenate(parts) if parts else piece.audio
    return float(np.sqrt(np.mean(joined.astype(np.float64) ** 2))) if joined.size else 0.0


# -- one conversation ------------------------------------------------------------------------------
class _Timeline:
    """Turns placed on a growing timeline, with the bookkeeping the overlap target needs."""

    def __init__(self) -> None:
        self.placed: list[tuple[float, _Piece]] = []
        self.speech_s = 0.0
        self.overlap_s = 0.0

    @property
    def end_s(self) -> float:
        return max((start + p.duration_s for start, p in self.placed), default=0.0)

    def next_start(self, piece: _Piece, config: SimulationConfig, rng: np.random.Generator) -> float:
        if not self.placed:
            return float(rng.uniform(0.3, 1.0))
        prev_start, prev = self.placed[-1]
        prev_end = prev_start + prev.duration_s
        if config.overlap > 0 and self.overlap_s < config.overlap * self.speech_s:
            wanted = float(rng.uniform(*config.overlap_s))
            length = min(wanted, 0.5 * prev.duration_s, 0.5 * piece.duration_s)
            # Never three voices at once: stay clear of every turn before the previous one.
            earlier = max((s + p.duration_s for s, p in self.placed[:-1]), default=0.0)
            return max(prev_end - length, earlier, prev_start + 0.5 * prev.duration_s)
        return prev_end + float(rng.uniform(*config.pause_s))

    def place(self, start: float, piece: _Piece) -> None:
        if self.placed:
            prev_start, prev = self.placed[-1]
            ours = [(start + a, start + b) for a, b in piece.speech]
            theirs = [(prev_start + a, prev_start + b) for a, b in prev.speech]
            self.overlap_s += sum(max(0.0, min(b, d) - max(a, c)) for a, b in ours for c, d in theirs)
        self.speech_s += sum(b - a for a, b in piece.speech)
        self.placed.append((start, piece))


def _speaker_order(queues: dict[str, list[_Piece]], rng: np.random.Generator) -> Iterator[str]:
    """Turn-taking order: everybody early on, then speakers with more left speak more often."""
    names = sorted(queues)
    first_round = [names[i] for i in rng.permutation(len(names))]
    yield from first_round
    last = first_round[-1]
    while True:
        options = [s for s in names if s != last and queues[s]]
        if not options:
            return
        left = np.array([sum(p.duration_s for p in queues[s]) for s in options])
        last = options[int(rng.choice(len(options), p=left / left.sum()))]
        yield last


def _conversation(
    file_id: str, groups: dict[str, list[Utterance]], config: SimulationConfig, rng: np.random.Generator
) -> Conversation:
    low, high = config.speakers
    count = int(rng.integers(low, min(high, len(groups)) + 1))
    names = sorted(groups)
    chosen = sorted(names[i] for i in rng.choice(len(names), size=count, replace=False))
    queues: dict[str, list[_Piece]] = {}
    sources: list[Utterance] = []
    for speaker in chosen:
        utterances = [groups[speaker][i] for i in rng.permutation(len(groups[speaker]))]
        sources += utterances
        queues[speaker] = [
            p for u in utterances for p in _turns_of(speaker, load_audio(u), rng, config.turn_s)
        ]
    gains = {s: float(rng.uniform(-config.level_db, config.level_db)) for s in chosen}
    timeline = _Timeline()
    target_s = config.file_minutes * 60
    for speaker in _speaker_order(queues, rng):
        if timeline.end_s >= target_s:
            break
        if not queues[speaker]:  # nothing usable left of this speaker (only fragments)
            continue
        piece = queues[speaker].pop(0)
        timeline.place(timeline.next_start(piece, config, rng), piece)
    audio = _mix(timeline, gains, config, rng)
    reference = _reference(timeline)
    spoke = sorted({t.speaker for t in reference})
    return Conversation(file_id, audio, reference, spoke, sources)


def _mix(
    timeline: _Timeline, gains: dict[str, float], config: SimulationConfig, rng: np.random.Generator
) -> np.ndarray:
    total = int((timeline.end_s + float(rng.uniform(0.5, 1.5))) * SAMPLE_RATE)
    audio = np.zeros(total, np.float64)
    for start, piece in timeline.placed:
        level_db = -26.0 + gains[piece.speaker] + float(rng.normal(0.0, 1.0))
        scale = 10 ** (level_db / 20) / max(_active_rms(piece), 1e-6)
        at = int(start * SAMPLE_RATE)
        audio[at : at + len(piece.audio)] += piece.audio * scale
    audio += rng.standard_normal(total) * 10 ** (config.noise_dbfs / 20)
    peak = float(np.max(np.abs(audio))) if total else 0.0
    if peak > 0.99:  # clip guard for loud overlaps
        audio *= 0.99 / peak
    return audio.astype(np.float32)


def _reference(timeline: _Timeline) -> list[Turn]:
    """RTTM turns: each speaker's speech, stretches closer than _BRIDGE_S joined."""
    spans: dict[str, list[tuple[float, float]]] = {}
    for start, piece in timeline.placed:
        spans.setdefault(piece.speaker, []).extend((start + a, start + b) for a, b in piece.speech)
    turns: list[Turn] = []
    for speaker, items in spans.items():
        merged: list[list[float]] = []
        for a, b in sorted(items):
            if merged and a - merged[-1][1] < _BRIDGE_S:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        turns += [Turn(speaker, round(a, 3), round(b, 3)) for a, b in merged]
    return sorted(turns, key=lambda t: (t.start_s, t.speaker))


def _covered_by_two(reference: list[Turn]) -> float:
    edges = sorted([(t.start_s, 1) for t in reference] + [(t.end_s, -1) for t in reference])
    active, last, total = 0, 0.0, 0.0
    for at, step in edges:
        if active >= 2:
            total += at - last
        active += step
        last = at
    return total


def simulate(utterances: list[Utterance], config: SimulationConfig) -> Iterator[Conversation]:
    """Conversations until `config.minutes` of audio exist; deterministic for `config.seed`."""
    groups = eligible_speakers(utterances, config.min_speech_s, config.split)
    if len(groups) < config.speakers[0]:
        raise ValueError(
            f"only {len(groups)} speakers with >= {config.min_speech_s:.0f} s of speech in split "
            f"{config.split!r}; need at least {config.speakers[0]}"
        )
    rng = np.random.default_rng(config.seed)
    produced_s = 0.0
    index = failures = 0
    while produced_s < config.minutes * 60:
        conversation = _conversation(f"sim_{config.seed}_{index:03d}", groups, config, rng)
        if len(conversation.speakers) < 2:  # drawn speakers without usable speech: draw again
            failures += 1
            if failures > 100:
                raise ValueError("the corpus does not yield conversations of two or more speakers")
            continue
        produced_s += conversation.duration_s
        index += 1
        yield conversation


def write_conversations(
    conversations: Iterator[Conversation] | list[Conversation], out_dir: Path | str, config: SimulationConfig
) -> Path:
    """FLAC + RTTM + UEM per conversation, a manifest.csv (speaker=multi rows) and a summary JSON."""
    import soundfile as sf

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    summary = []
    for conv in conversations:
        sf.write(out / f"{conv.file_id}.flac", conv.audio, SAMPLE_RATE, subtype="PCM_16")
        write_rttm(out / f"{conv.file_id}.rttm", conv.file_id, conv.reference)
        (out / f"{conv.file_id}.uem").write_text(f"{conv.file_id} 1 0.000 {conv.duration_s:.3f}\n")
        licenses = sorted({u.license for u in conv.sources} - {""})
        rows.append(
            {
                "path": f"{conv.file_id}.flac",
                "speaker": "multi",
                "duration_s": f"{conv.duration_s:.3f}",
                "sample_rate": str(SAMPLE_RATE),
                "source_repo": f"speakerflow-simulate(seed={config.seed})",
                "license": "+".join(licenses) or "see sources",
            }
        )
        summary.append(
            {
                "file_id": conv.file_id,
                "speakers": conv.speakers,
                "duration_s": round(conv.duration_s, 3),
                "speech_s": round(conv.speech_s(), 3),
                "overlap_s": round(conv.overlap_s(), 3),
            }
        )
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(
            fh,
            ["path", "speaker", "duration_s", "sample_rate", "source_repo", "license"],
            lineterminator="\n",
        )
        writer.writeheader()
        writer.writerows(rows)
    config_json = {k: getattr(config, k) for k in config.__dataclass_fields__}
    (out / "simulation.json").write_text(json.dumps({"config": config_json, "files": summary}, indent=1))
    return manifest
