"""The two baselines that `speakerflow eval diarize --baselines` runs beside the streaming diarizer.

Both see the same silero VAD regions and the same embedder as the streaming diarizer:

- `reference_design`: the product brief's reference design: 2-s windows with a 1-s step inside
  speech regions, cosine average-linkage AHC with the speaker count (2-6) chosen by the best
  silhouette, consecutive windows of one speaker merged, segments under 0.5 s dropped.
- `speechbrain_spectral`: SpeechBrain's spectral clustering (`Spec_Clust_unorm`, p-pruned cosine
  affinity, speaker count by eigengap) on the same window embeddings.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist
from sklearn.metrics import silhouette_score

from speakerflow.processors.vad import VadConfig, speech_regions

Segments = list[tuple[float, float, str]]


@dataclass(frozen=True)
class BaselineWindows:
    starts: np.ndarray
    ends: np.ndarray
    embeddings: np.ndarray


def baseline_windows(
    audio: np.ndarray,
    embed: Callable[[list[np.ndarray]], np.ndarray],
    vad: VadConfig,
    window_s: float = 2.0,
    step_s: float = 1.0,
    sample_rate: int = 16000,
) -> BaselineWindows:
    """2-s windows every 1 s inside each speech region (a shorter region is one window)."""
    starts, ends = [], []
    for region_start, region_end in speech_regions(audio, sample_rate, vad):
        t = region_start
        while True:
            end = min(t + window_s, region_end)
            starts.append(t)
            ends.append(end)
            if end >= region_end:
                break
            t += step_s
    if not starts:
        return BaselineWindows(np.zeros(0), np.zeros(0), np.zeros((0, 1), np.float32))
    pieces = [audio[int(a * sample_rate) : int(b * sample_rate)] for a, b in zip(starts, ends, strict=True)]
    return BaselineWindows(np.array(starts), np.array(ends), embed(pieces))


def ahc_with_count_heuristic(embeddings: np.ndarray, low: int = 2, high: int = 6) -> np.ndarray:
    """Average-linkage cosine AHC cut at the speaker count in [low, high] with the best silhouette."""
    n = len(embeddings)
    if n < 3:
        return np.zeros(n, np.int64)
    tree = linkage(pdist(embeddings.astype(np.float64), "cosine"), method="average")
    best, best_score = np.zeros(n, np.int64), -np.inf
    for k in range(low, min(high, n - 1) + 1):
        labels = fcluster(tree, t=k, criterion="maxclust") - 1
        if len(np.unique(labels)) < 2:
            continue
        score = silhouette_score(embeddings, labels, metric="cosine")
        if score > best_score:
            best, best_score = labels.astype(np.int64), score
    return best


def spectral_labels(embeddings: np.ndarray, p_val: float = 0.3, max_speakers: int = 10) -> np.ndarray:
    """SpeechBrain's unnormalised spectral clustering with the eigengap speaker count."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            from speechbrain.integrations.alignment.diarization import Spec_Clust_unorm
        except ImportError:  # older SpeechBrain releases
            from speechbrain.processing.diarization import Spec_Clust_unorm
    n = len(embeddings)
    if n < 3:
        return np.zeros(n, np.int64)
    clusterer = Spec_Clust_unorm(min_num_spkrs=2, max_num_spkrs=max_speakers)
    # p-pruning keeps a fraction of each row; with very few windows keep at least one neighbour.
    clusterer.do_spec_clust(embeddings.astype(np.float64), k_oracle=None, p_val=max(p_val, 2.0 / n))
    return np.asarray(clusterer.labels_, np.int64)


def windows_to_segments(
    starts: np.ndarray, ends: np.ndarray, labels: np.ndarray, step_s: float, min_segment_s: float = 0.5
) -> Segments:
    """Each window speaks for its first step (its whole length when it is the last one of a run of
    overlapping windows); consecutive windows of one speaker merge; short segments are dropped."""
    segments: list[list] = []
    for i, (start, end, label) in enumerate(zip(starts, ends, labels, strict=True)):
        next_start = starts[i + 1] if i + 1 < len(starts) else np.inf
        own_end = min(end, max(start + step_s, min(next_start, end)))
        if segments and segments[-1][2] == label and start <= segments[-1][1] + 1e-6:
            segments[-1][1] = max(segments[-1][1], own_end)
        else:
            segments.append([float(start), float(own_end), int(label)])
    return [(a, b, f"SPEAKER_{k:02d}") for a, b, k in segments if b - a >= min_segment_s]


def reference_design(windows: BaselineWindows, step_s: float = 1.0) -> Segments:
    labels = ahc_with_count_heuristic(windows.embeddings)
    return windows_to_segments(windows.starts, windows.ends, labels, step_s)


def speechbrain_spectral(windows: BaselineWindows, step_s: float = 1.0) -> Segments:
    labels = spectral_labels(windows.embeddings)
    return windows_to_segments(windows.starts, windows.ends, labels, step_s)
