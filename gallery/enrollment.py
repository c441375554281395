"""Turning enrollment audio into a voiceprint, with quality gates that say why a sample is refused."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from speakerflow.gallery.voiceprint import Voiceprint
from speakerflow.processors.embedding import Embedder
from speakerflow.processors.vad import speech_only

SAMPLE_RATE = 16000


@dataclass(frozen=True)
class EnrollmentPolicy:
    """Quality gates.

    min_speech_s: net speech (after VAD) needed for a reliable voiceprint.
    max_total_s: longest audio accepted in one request (guards memory and latency).
    max_clipped_fraction: share of samples at full scale above which audio is too distorted.
    min_level_dbfs: speech quieter than this (RMS) is too faint to trust.
    min_consistency: lowest cosine of any 3-s speech window to the sample's centroid; a second voice
        in the sample pulls some windows far from the centroid (families without a `voices_cut`).
    max_split_similarity: the windows are split in two groups (average-linkage clustering); when the
        smaller group holds at least `min_split_share` of them and the two group centroids are less
        alike than this cosine, the sample holds two voices. Tuned for GE2E on ../shared/data, where
        one speaker's groups sit at 0.89-0.92 and two speakers' at 0.59-0.83. Used for embedder
        families without a `voices_cut` (CAM++'s single speakers split as low as 0.72 here).
    voices_cut: per embedder family, the AHC cut (cosine distance, average linkage) at which short
        windows (`voice_window_s` every `voice_hop_s`) of the speech are clustered into voices; the
        sample is refused when a second voice holds at least `min_second_voice_windows` windows and
        `min_second_voice_share` of them. CAM++ uses its end-of-stream diarization cut (see README,
        enrollment gates, for the measured separation).
    """

    min_speech_s: float = 10.0
    max_total_s: float = 600.0
    max_clipped_fraction: float = 0.01
    min_level_dbfs: float = -50.0
    min_consistency: float = 0.45
    max_split_similarity: float = 0.80
    min_split_share: float = 0.2
    window_s: float = 3.0
    voices_cut: tuple[tuple[str, float], ...] = (("campplus", 0.62),)
    voice_window_s: float = 1.5
    voice_hop_s: float = 0.75
    min_second_voice_windows: int = 3
    min_second_voice_share: float = 0.1


class EnrollmentRejected(ValueError):
    """A sample failed a quality gate; the message is meant for the person enrolling."""


@dataclass(frozen=True)
class EnrollmentOutcome:
    voiceprint: Voiceprint
    speech_seconds: float
    quality: float  # mean cosine of the speech windows (3 s; 1.5 s with a voices_cut) to the centroid, 0..1


def enroll(
    speaker_id: str,
    name: str,
    samples: Sequence[np.ndarray],
    embedder: Embedder,
    now_ms: int,
    policy: EnrollmentPolicy = EnrollmentPolicy(),
    metadata: dict[str, str] | None = None,
) -> EnrollmentOutcome:
    """Check `samples` (16 kHz mono float32) and build the voiceprint; raises EnrollmentRejected."""
    if not samples:
        raise EnrollmentRejected("no audio samples in the request")
    total_s = sum(len(s) for s in samples) / SAMPLE_RATE
    if total_s > policy.max_total_s:
        raise EnrollmentRejected(
            f"{total_s:.0f} s of audio is more than the {policy.max_total_s:.0f} s allowed"
        )
    speech = [speech_only(s, SAMPLE_RATE) for s in samples]
    speech_s = sum(len(s) for s in speech) / SAMPLE_RATE
    if speech_s < policy.min_speech_s:
        raise EnrollmentRejected(
            f"only {speech_s:.1f} s of speech found (after removing silence); at least "
            f"{policy.min_speech_s:.0f} s is needed"
        )
    joined = np.concatenate(speech)
    _check_levels(joined, policy)
    cut = dict(policy.voices_cut).get(embedder.name)
    if cut is None:
        window_embeddings, centroid = _check_consistency(joined, embedder, policy)
    else:
        # One call for the short windows and the whole speech, so the embedder batches them together.
        short = _windows(joined, policy.voice_window_s, policy.voice_hop_s)
        rows = embedder.embed([*short, joined])
        window_embeddings, centroid = rows[:-1], rows[-1]
        _check_voices(window_embeddings, cut, policy)
    agreement = window_embeddings @ centroid
    voiceprint = Voiceprint(
        speaker_id, name, embedder.model_id, centroid, len(samples), speech_s, now_ms, dict(metadata or {})
    )
    return EnrollmentOutcome(voiceprint, speech_s, float(np.clip(agreement.mean(), 0.0, 1.0)))


def _check_consistency(
    joined: np.ndarray, embedder: Embedder, policy: EnrollmentPolicy
) -> tuple[np.ndarray, np.ndarray]:
    """GE2E's gates: 3-s windows near the centroid, and no two-group split; (window rows, centroid)."""
    windows = _windows(joined, policy.window_s)
    window_embeddings = embedder.embed(windows)
    centroid = embedder.embed([joined])[0]
    agreement = window_embeddings @ centroid
    if len(windows) > 1 and float(agreement.min()) < policy.min_consistency:
        raise EnrollmentRejected(
            "the sample does not sound like one speaker throughout (window agreement "
            f"{float(agreement.min()):.2f} < {policy.min_consistency:.2f}); enroll one voice per request"
        )
    _check_one_voice(window_embeddings, policy)
    return window_embeddings, centroid


def _check_one_voice(embeddings: np.ndarray, policy: EnrollmentPolicy) -> None:
    if len(embeddings) < 3:
        return
    from scipy.cluster.hierarchy import fcluster, linkage

    groups = fcluster(linkage(embeddings, "average", metric="cosine"), 2, "maxclust")
    share = min(np.mean(groups == 1), np.mean(groups == 2))
    centroids = [embeddings[groups == g].mean(axis=0) for g in (1, 2)]
    similarity = float(
        centroids[0] @ centroids[1] / np.linalg.norm(centroids[0]) / np.linalg.norm(centroids[1])
    )
    if share >= policy.min_split_share and similarity < policy.max_split_similarity:
        raise EnrollmentRejected(
            f"the sample seems to hold two voices ({share:.0%} of it sounds unlike the rest, similarity "
            f"{similarity:.2f} < {policy.max_split_similarity:.2f}); enroll one speaker per request"
        )


def _check_voices(embeddings: np.ndarray, cut: float, policy: EnrollmentPolicy) -> None:
    """Refuse a sample whose short windows cluster into two voices, the second one not negligible."""
    if len(embeddings) < 2 * policy.min_second_voice_windows:
        return
    from speakerflow.processors.offline_clustering import ahc

    sizes = np.sort(np.bincount(ahc(embeddings, cut)))[::-1]
    second = int(sizes[1]) if len(sizes) > 1 else 0
    share = second / len(embeddings)
    if second >= policy.min_second_voice_windows and share >= policy.min_second_voice_share:
        voices = int(np.sum(sizes >= policy.min_second_voice_windows))
        seconds = (second - 1) * policy.voice_hop_s + policy.voice_window_s
        raise EnrollmentRejected(
            f"the sample holds {voices} voices (a second voice speaks for about {seconds:.0f} s, "
            f"{share:.0%} of the speech); "
            "enroll one speaker per request"
        )


def _check_levels(speech: np.ndarray, policy: EnrollmentPolicy) -> None:
    clipped = float(np.mean(np.abs(speech) >= 0.999))
    if clipped > policy.max_clipped_fraction:
        raise EnrollmentRejected(f"{clipped:.1%} of the speech is clipped; record at a lower gain")
    level = 20 * np.log10(max(float(np.sqrt(np.mean(speech.astype(np.float64) ** 2))), 1e-10))
    if level < policy.min_level_dbfs:
        raise EnrollmentRejected(
            f"speech level {level:.0f} dBFS is too quiet (minimum {policy.min_level_dbfs:.0f})"
        )


def _windows(speech: np.ndarray, window_s: float, hop_s: float = 0.0) -> list[np.ndarray]:
    """Windows of `window_s` every `hop_s` (default: back to back) covering `speech`."""
    size = int(window_s * SAMPLE_RATE)
    step = int(hop_s * SAMPLE_RATE) or size
    if len(speech) <= size:
        return [speech]
    return [speech[i : i + size] for i in range(0, len(speech) - size + 1, step)]


def score_files(embedder: Embedder, enrol: Sequence[np.ndarray], test: np.ndarray) -> float:
    """Cosine score of `test` speech against a voiceprint of the `enrol` speech (no quality gates): the
    files' embeddings weighted by their speech, as a gallery voiceprint weighs its samples."""
    vectors = embedder.embed([*enrol, test])
    weights = np.array([len(e) for e in enrol], np.float64)
    voiceprint = (vectors[:-1] * weights[:, None]).sum(0)
    voiceprint /= max(float(np.linalg.norm(voiceprint)), 1e-12)
    return float(voiceprint @ vectors[-1])
