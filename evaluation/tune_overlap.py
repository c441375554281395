"""Grid search of the segmentation diarizer's thresholds on the tuning sets (never on held-out data).

    python -m speakerflow.evaluation.tune_overlap /tmp/ami /tmp/sim_tune_ov /tmp/sim_tune_clean

Rule: every candidate is scored on each tuning set (DER, collar 0.25, overlap scored); the value kept is
the one with the lowest mean of the per-set DERs. Online thresholds (delta_new, rho_update, tau_active)
are chosen on live@2s, the offline ones (offline_threshold, min_cluster_size) on the revision, then
onset on the mean of both. Segmentation outputs and embeddings are cached by input, so only the first
pass pays for the models.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import pickle
import sys
import time
from dataclasses import replace

import numpy as np
import torch

from speakerflow.evaluation.diarization import (
    Scorer,
    annotation,
    live_at_latency,
    load_rttm,
    load_uem,
    multi_speaker_items,
)
from speakerflow.evaluation.overlap_runner import run_overlap_stream
from speakerflow.processors.audio import decode_file
from speakerflow.processors.embedding import load_embedder
from speakerflow.processors.overlap_diarization import OverlapConfig, overlap_config
from speakerflow.processors.segmentation import Segmenter


def _key(array: np.ndarray) -> bytes:
    return hashlib.sha1(np.ascontiguousarray(array, np.float32).tobytes()).digest()


class Cached:
    """Memoises a batch function row by row (same input row, same output row)."""

    def __init__(self, fn) -> None:
        self.fn, self.cache = fn, {}

    def __call__(self, rows):
        keys = [_key(r) for r in rows]
        todo = [i for i, k in enumerate(keys) if k not in self.cache]
        if todo:
            out = self.fn(
                [rows[i] for i in todo] if isinstance(rows, list) else np.stack([rows[i] for i in todo])
            )
            for i, value in zip(todo, out, strict=True):
                self.cache[keys[i]] = value
        return np.stack([self.cache[k] for k in keys]) if keys else self.fn(rows)


def load_sets(folders: list[str]) -> dict[str, list]:
    sets = {}
    for folder in folders:
        items = []
        for item in multi_speaker_items(folder):
            reference = load_rttm(item.rttm)[item.file_id]
            uem = load_uem(item.uem) if item.uem else None
            items.append((item.file_id, decode_file(item.audio), reference, uem))
        sets[folder] = items
    return sets


def score(sets, config: OverlapConfig, segment, embed) -> dict[str, dict[str, float]]:
    """Per set: revision and live@2s DER (collar 0.25)."""
    out = {}
    for name, items in sets.items():
        scorer = Scorer(collars=(0.25,))
        for file_id, audio, reference, uem in items:
            run = run_overlap_stream(audio, config, segment, embed)
            scorer.add(file_id, "revision", reference, annotation(run.revision, file_id), uem)
            live = live_at_latency(run.emissions, 2.0, 0.5, run.duration_s, file_id)
            scorer.add(file_id, "live@2s", reference, live, uem)
        totals = scorer.totals()
        out[name] = {k: totals[k]["der@0.25"] for k in ("revision", "live@2s")}
    return out


def mean(result: dict, labelling: str) -> float:
    return float(np.mean([r[labelling] for r in result.values()]))


def search(sets, base: OverlapConfig, grid: dict[str, list], labelling: str, segment, embed) -> OverlapConfig:
    best, best_value = base, float("inf")
    for values in itertools.product(*grid.values()):
        config = replace(base, **dict(zip(grid, values, strict=True)))
        started = time.perf_counter()
        result = score(sets, config, segment, embed)
        value = (
            mean(result, labelling)
            if labelling != "both"
            else (mean(result, "revision") + mean(result, "live@2s")) / 2
        )
        per_set = " ".join(f"{r['revision']:.3f}/{r['live@2s']:.3f}" for r in result.values())
        print(
            dict(zip(grid, values, strict=True)),
            f"{labelling} {value:.4f}  rev/live per set: {per_set} ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
        if value < best_value:
            best, best_value = config, value
    print("chosen:", {k: getattr(best, k) for k in grid}, flush=True)
    return best


# Per embedder: cosine distances between CAM++ embeddings run larger than GE2E's, so its grid sits higher.
GRIDS = {
    "ge2e": (
        {"delta_new": [0.2, 0.25, 0.3, 0.35, 0.4], "rho_update": [0.1, 0.2, 0.3], "tau_active": [0.5, 0.6]},
        {"offline_threshold": [0.4, 0.5, 0.6, 0.7, 0.8, 0.9], "min_cluster_size": [1, 4, 8]},
    ),
    "campplus": (
        {"delta_new": [0.4, 0.5, 0.6, 0.7, 0.8], "rho_update": [0.1, 0.2, 0.3], "tau_active": [0.5]},
        {"offline_threshold": [0.8, 0.9, 1.0, 1.1, 1.2, 1.3], "min_cluster_size": [1, 4, 8]},
    ),
}


def main(folders: list[str]) -> None:
    torch.set_num_threads(1)
    segmenter = Segmenter()
    embedder = load_embedder(os.environ.get("TUNE_EMBEDDER", "ge2e"))
    print("embedder:", embedder.model_id, flush=True)
    segment, embed = Cached(segmenter), Cached(embedder.embed)
    sets = load_sets(folders)
    saved = os.environ.get("TUNE_SEGMENTATION_CACHE", "")  # segmentation outputs kept between runs
    if saved and os.path.isfile(saved):
        with open(saved, "rb") as f:
            segment.cache = pickle.load(f)
    score(sets, overlap_config(), segment, embed)  # fills the caches
    if saved:
        with open(saved, "wb") as f:
            pickle.dump(segment.cache, f)
    online, offline = GRIDS[embedder.name]
    config = overlap_config()
    config = search(sets, config, online, "live@2s", segment, embed)
    config = search(sets, config, offline, "revision", segment, embed)
    config = search(
        sets, config, {"onset": [0.4, 0.5, 0.6], "max_gap_s": [0.1, 0.25, 0.5]}, "both", segment, embed
    )
    print("final:", config, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
