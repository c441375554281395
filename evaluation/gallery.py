"""Open-set identification inside conversations, offline: enrol, diarize, match, score.

The protocol (`speakerflow eval gallery --manifest PATH`):

1. Every single-speaker speaker of the manifest is split in two: speakers with several utterances
   are enrolled on the first half of them (sorted by path) and tested on the others; a speaker with
   one utterance is enrolled on its first half (in time) and tested on the second.
2. A seeded share of the speakers (`stranger_share`) is never enrolled: their test speech must be
   labelled UNKNOWN. Speakers whose enrollment the quality gates refuse are strangers too.
3. Test pieces (cut to at most `max_turn_s`) are laid out in conversations of 2-5 speakers with
   `processors.corpus.build_conversation`, and each conversation runs through the streaming
   diarizer (`processors.diarization.StreamDiarizer`, fed chunk by chunk) and the `Matcher`, exactly
   as the diarize and match stages chain them, but without Kafka.
4. Scoring uses each segment's last emission (its highest revision, so re-labelling counts): the
   share of enrolled speakers' speech time whose segment names the right speaker, the share of
   strangers' speech time labelled UNKNOWN, and per-segment accuracy (the segment's majority
   reference speaker).

The diarizer's updates are recorded once per conversation and replayed through every matcher
variant asked for, so variants are compared on identical input.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from speakerflow.evaluation.corpus import Turn, build_conversation, by_speaker, load_audio, load_manifest
from speakerflow.gallery.enrollment import EnrollmentPolicy, EnrollmentRejected, enroll
from speakerflow.gallery.matcher import Gallery, Matcher, rules_for
from speakerflow.processors.diarization import StreamDiarizer, TurnUpdate, config_for_embedder
from speakerflow.processors.embedding import Embedder
from speakerflow.processors.scoring import Calibration

SAMPLE_RATE = 16000


@dataclass(frozen=True)
class EvalConfig:
    stranger_share: float = 0.25
    min_enroll_speech_s: float = 4.0  # single-utterance halves hold ~5-8 s of speech
    max_turn_s: float = 8.0
    min_turn_s: float = 1.0
    speakers_per_conversation: tuple[int, int] = (2, 5)
    chunk_s: float = 0.5
    seed: int = 0


@dataclass(frozen=True)
class MatcherVariant:
    name: str
    exclusive: bool = Matcher.exclusive  # defaults: the Matcher's own
    relabel: bool = Matcher.relabel
    margin: float | None = None  # None: the embedder family's (`rules_for`)
    threshold: float = 0.0  # 0 = the calibration's
    sure_offset: float | None = None
    consistency: float | None = None


DEFAULT_VARIANTS = (
    MatcherVariant("default"),
    MatcherVariant("no margin rule", margin=0.0),
    MatcherVariant("no exclusive, no relabel", exclusive=False, relabel=False),
    MatcherVariant("pool the whole label", consistency=-2.0),
    MatcherVariant("each segment alone", consistency=1.0),
)


@dataclass
class Split:
    enrol: dict[str, list[np.ndarray]]
    test: dict[str, list[np.ndarray]]


@dataclass
class Conversation:
    name: str
    audio: np.ndarray
    reference: list[Turn]
    updates: list[TurnUpdate] = field(default_factory=list)  # live, in emission order
    revision: list[TurnUpdate] = field(default_factory=list)  # end-of-stream re-clustering


@dataclass
class Scores:
    variant: str
    labelling: str  # "live" or "revision"
    enrolled_speech_s: float
    enrolled_correct: float  # share of enrolled speech named right
    enrolled_wrong_name: float  # named as another enrolled speaker
    enrolled_unknown: float  # left UNKNOWN
    stranger_speech_s: float
    stranger_unknown: float  # share of strangers' speech labelled UNKNOWN
    segments: int
    segment_accuracy: float  # segments whose name (or UNKNOWN) fits their majority speaker
    enrolled_segment_accuracy: float  # the same, over segments mostly spoken by enrolled speakers
    first_emission_enrolled_correct: float  # same as enrolled_correct, before any re-labelling
    relabelled_segments: int


def split_speakers(manifest: str, config: EvalConfig, progress: Callable[[str], None]) -> Split:
    groups = by_speaker(load_manifest(manifest))
    enrol: dict[str, list[np.ndarray]] = {}
    test: dict[str, list[np.ndarray]] = {}
    for speaker, utterances in sorted(groups.items()):
        audios = [load_audio(u) for u in utterances]
        if len(audios) >= 2:
            half = (len(audios) + 1) // 2
            enrol[speaker], test[speaker] = audios[:half], audios[half:]
        else:
            middle = len(audios[0]) // 2
            enrol[speaker], test[speaker] = [audios[0][:middle]], [audios[0][middle:]]
    progress(f"{len(test)} speakers loaded")
    return Split(enrol, test)


def enroll_gallery(
    split: Split,
    embedder: Embedder,
    config: EvalConfig,
    rng: np.random.Generator,
) -> tuple[Gallery, dict[str, str]]:
    """The gallery of the enrolled speakers; returns it and why each non-enrolled speaker is not."""
    speakers = sorted(split.test)
    strangers = {
        str(s) for s in rng.choice(speakers, round(config.stranger_share * len(speakers)), replace=False)
    }
    gallery = Gallery(embedder.model_id, embedder.dim)
    policy = EnrollmentPolicy(min_speech_s=config.min_enroll_speech_s)
    not_enrolled = {s: "held out as a stranger" for s in strangers}
    for speaker in speakers:
        if speaker in strangers:
            continue
        try:
            outcome = enroll(speaker, speaker, split.enrol[speaker], embedder, 0, policy)
        except EnrollmentRejected as exc:
            not_enrolled[speaker] = f"enrollment refused: {exc}"
            continue
        gallery.upsert(outcome.voiceprint)
    return gallery, not_enrolled


def build_conversations(split: Split, config: EvalConfig, rng: np.random.Generator) -> list[Conversation]:
    """Every test piece exactly once, in conversations of a few speakers each."""
    pieces: dict[str, list[np.ndarray]] = {}
    for speaker, audios in split.test.items():
        cut = int(config.max_turn_s * SAMPLE_RATE)
        parts = [a[i : i + cut] for a in audios for i in range(0, len(a), cut)]
        pieces[speaker] = [p for p in parts if len(p) >= config.min_turn_s * SAMPLE_RATE]
    order = [s for s in rng.permutation(sorted(pieces)) if pieces[s]]
    conversations = []
    low, high = config.speakers_per_conversation
    while order:
        size = int(rng.integers(low, high + 1))
        if len(order) - size < low:  # do not leave a lone speaker behind
            size = len(order)
        members, order = order[:size], order[size:]
        turns = _turn_order({s: list(pieces[s]) for s in members}, rng)
        audio, reference = build_conversation(turns, rng)
        conversations.append(Conversation(f"conv{len(conversations):03d}", audio, reference))
    return conversations


def _turn_order(
    queues: dict[str, list[np.ndarray]], rng: np.random.Generator
) -> list[tuple[str, np.ndarray]]:
    """Interleave the speakers' pieces; never the same speaker twice in a row while others remain."""
    turns: list[tuple[str, np.ndarray]] = []
    last = None
    while any(queues.values()):
        choices = [s for s, q in queues.items() if q and s != last] or [s for s, q in queues.items() if q]
        weights = np.array([len(queues[s]) for s in choices], float)
        speaker = str(rng.choice(choices, p=weights / weights.sum()))
        turns.append((speaker, queues[speaker].pop(0)))
        last = speaker
    return turns


def diarize(conversation: Conversation, embedder: Embedder, config: EvalConfig) -> None:
    """Run the streaming diarizer over the conversation, recording its updates (and revision)."""
    diarizer = StreamDiarizer(config_for_embedder(embedder.name))
    step = int(config.chunk_s * SAMPLE_RATE)

    def embed(windows: list) -> None:
        if windows:
            embeddings = embedder.embed([w.samples for w in windows])
            conversation.updates.extend(diarizer.add_embeddings(windows, embeddings))

    for start in range(0, len(conversation.audio), step):
        embed(diarizer.push_audio(conversation.audio[start : start + step]))
    embed(diarizer.end_audio())
    conversation.updates.extend(diarizer.finish())
    conversation.revision = diarizer.revise(1)


def replay(
    conversation: Conversation,
    updates: list[TurnUpdate],
    matcher: Matcher,
    stream_id: str,
) -> tuple[dict[str, tuple], dict[str, tuple], int]:
    """Feed recorded updates to `matcher`; returns the last and the first final emission per segment
    (start, end, speaker id) and how many re-labellings were emitted."""
    last: dict[str, tuple] = {}
    first: dict[str, tuple] = {}
    relabelled = 0
    for update in updates:
        segment_id = f"{stream_id}:{update.turn_index:05d}"
        payload = (segment_id, update.start_s, update.end_s, update.is_final)
        for emission in matcher.observe(
            stream_id,
            segment_id,
            update.label,
            update.embedding,
            update.window_count,
            is_final=update.is_final,
            revision=update.revision,
            payload=payload,
        ):
            sid, start, end, final = emission.payload
            relabelled += emission.relabelled
            if not final:
                continue
            entry = (start, end, emission.identification.speaker_id, emission.revision)
            if sid not in last or emission.revision >= last[sid][3]:
                last[sid] = entry
            first.setdefault(sid, entry)
    matcher.end_stream(stream_id)
    return last, first, relabelled


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


@dataclass
class _Tally:
    enrolled: float = 0.0
    correct: float = 0.0
    wrong: float = 0.0
    unknown: float = 0.0
    stranger: float = 0.0
    stranger_unknown: float = 0.0
    segments: int = 0
    segments_right: int = 0
    enrolled_segments: int = 0
    enrolled_segments_right: int = 0

    def add(self, segments: dict[str, tuple], reference: list[Turn], enrolled: set[str]) -> None:
        for start, end, speaker_id, _ in segments.values():
            overlaps: dict[str, float] = {}
            for turn in reference:
                o = _overlap(start, end, turn.start_s, turn.end_s)
                if o <= 0:
                    continue
                overlaps[turn.speaker] = overlaps.get(turn.speaker, 0.0) + o
                if turn.speaker in enrolled:
                    self.enrolled += o
                    self.correct += o * (speaker_id == turn.speaker)
                    self.wrong += o * (speaker_id is not None and speaker_id != turn.speaker)
                    self.unknown += o * (speaker_id is None)
                else:
                    self.stranger += o
                    self.stranger_unknown += o * (speaker_id is None)
            if overlaps:
                majority = max(overlaps, key=overlaps.__getitem__)
                expected = majority if majority in enrolled else None
                self.segments += 1
                self.segments_right += speaker_id == expected
                if expected is not None:
                    self.enrolled_segments += 1
                    self.enrolled_segments_right += speaker_id == expected


def _share(part: float, whole: float) -> float:
    return round(part / whole, 4) if whole > 0 else float("nan")


def score_variant(
    conversations: list[Conversation],
    gallery: Gallery,
    calibration: Calibration,
    variant: MatcherVariant,
    labelling: str,
) -> Scores:
    enrolled = {vp.speaker_id for vp in gallery.speakers()}
    if variant.threshold > 0:
        calibration = Calibration(variant.threshold, calibration.slope)
    rules = rules_for(gallery.model_id)
    for rule in ("margin", "sure_offset", "consistency"):
        if getattr(variant, rule) is not None:
            rules[rule] = getattr(variant, rule)
    matcher = Matcher(gallery, calibration, exclusive=variant.exclusive, relabel=variant.relabel, **rules)
    last_tally, first_tally = _Tally(), _Tally()
    relabelled = 0
    for conv in conversations:
        updates = conv.updates if labelling == "live" else conv.revision
        last, first, count = replay(conv, updates, matcher, f"{conv.name}-{labelling}")
        last_tally.add(last, conv.reference, enrolled)
        first_tally.add(first, conv.reference, enrolled)
        relabelled += count
    t = last_tally
    return Scores(
        variant.name,
        labelling,
        round(t.enrolled, 1),
        _share(t.correct, t.enrolled),
        _share(t.wrong, t.enrolled),
        _share(t.unknown, t.enrolled),
        round(t.stranger, 1),
        _share(t.stranger_unknown, t.stranger),
        t.segments,
        _share(t.segments_right, t.segments),
        _share(t.enrolled_segments_right, t.enrolled_segments),
        _share(first_tally.correct, first_tally.enrolled),
        relabelled,
    )


@dataclass
class EvalReport:
    manifest: str
    model_id: str
    threshold: float
    speakers: int
    enrolled: int
    strangers: int
    not_enrolled: dict[str, str]
    conversations: int
    audio_s: float
    speech_s: float
    seconds: dict[str, float]
    scores: list[Scores]

    def to_json(self) -> dict:
        return asdict(self)


def pool_scores(reports: list[EvalReport]) -> list[dict]:
    """Per variant and labelling, the time-weighted shares over several runs (speaker splits), as if
    they were one evaluation: enrolled speech named right / wrongly / UNKNOWN, strangers' UNKNOWN."""
    groups: dict[tuple[str, str], list[Scores]] = {}
    for score in (score for report in reports for score in report.scores):
        groups.setdefault((score.variant, score.labelling), []).append(score)
    pooled = []
    for (variant, labelling), runs in groups.items():
        enrolled = sum(s.enrolled_speech_s for s in runs)
        strangers = sum(s.stranger_speech_s for s in runs)
        row: dict = {"variant": variant, "labelling": labelling, "runs": len(runs)}
        row["enrolled_speech_s"], row["stranger_speech_s"] = round(enrolled, 1), round(strangers, 1)
        for share in ("enrolled_correct", "enrolled_wrong_name", "enrolled_unknown"):
            row[share] = _share(sum(getattr(s, share) * s.enrolled_speech_s for s in runs), enrolled)
        row["stranger_unknown"] = _share(
            sum(s.stranger_unknown * s.stranger_speech_s for s in runs), strangers
        )
        pooled.append(row)
    return pooled


def evaluate(
    manifest: str,
    embedder: Embedder,
    calibration: Calibration,
    config: EvalConfig = EvalConfig(),
    variants: tuple[MatcherVariant, ...] = DEFAULT_VARIANTS,
    revision: bool = True,
    progress: Callable[[str], None] = lambda _: None,
    conversation_progress: Callable[[int, int], None] = lambda done, total: None,
) -> EvalReport:
    rng = np.random.default_rng(config.seed)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    split = split_speakers(manifest, config, progress)
    gallery, not_enrolled = enroll_gallery(split, embedder, config, rng)
    seconds["enroll"] = round(time.perf_counter() - started, 1)
    progress(f"gallery: {len(gallery)} enrolled, {len(not_enrolled)} not enrolled")
    conversations = build_conversations(split, config, rng)
    started = time.perf_counter()
    for i, conv in enumerate(conversations):
        diarize(conv, embedder, config)
        conversation_progress(i + 1, len(conversations))
    seconds["diarize"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    labellings = ("live", "revision") if revision else ("live",)
    scores = [
        score_variant(conversations, gallery, calibration, variant, labelling)
        for labelling in labellings
        for variant in variants
    ]
    seconds["match"] = round(time.perf_counter() - started, 1)
    return EvalReport(
        manifest,
        embedder.model_id,
        calibration.threshold,
        len(split.test),
        len(gallery),
        len(split.test) - len(gallery),
        dict(sorted(not_enrolled.items())),
        len(conversations),
        round(sum(len(c.audio) for c in conversations) / SAMPLE_RATE, 1),
        round(sum(t.end_s - t.start_s for c in conversations for t in c.reference), 1),
        seconds,
        scores,
    )
