"""How far clustering alone could take the segmentation diarizer: its DER when every local speaker of
every window is given the reference speaker it overlaps most (an oracle, one-to-one per window), beside
the real revision, on the same windows. What the oracle still gets wrong is the segmentation model's
(speech it does not detect, overlap it does not count) and the aggregation's; clustering cannot fix it.

    python -m speakerflow.evaluation.segmentation_floor --manifest /tmp/ami [--set onset=0.4 ...]

DER from pyannote.metrics, collar 0.25, overlap scored, split into single-speaker and overlapped
reference regions (where the reference has two or more speakers at once).
"""

from __future__ import annotations

import argparse
import math

import numpy as np
from pyannote.core import Annotation, Timeline
from scipy.optimize import linear_sum_assignment
from tqdm import tqdm

from speakerflow.evaluation.diarization import (
    Scorer,
    annotation,
    load_rttm,
    load_uem,
    multi_speaker_items,
    overlap_regions,
)
from speakerflow.evaluation.overlap_runner import feed_overlap_stream
from speakerflow.processors.audio import decode_file
from speakerflow.processors.embedding import load_embedder
from speakerflow.processors.overlap_diarization import SegmentationDiarizer, overlap_config
from speakerflow.processors.segmentation import Segmenter


def reference_frames(reference: Annotation, labels: list[str], frames: int, frame_s: float) -> np.ndarray:
    """(frames, speakers) bool: who the reference says talks in each diarizer frame."""
    out = np.zeros((frames, len(labels)), bool)
    for segment, _, label in reference.itertracks(yield_label=True):
        out[int(segment.start / frame_s) : math.ceil(segment.end / frame_s), labels.index(label)] = True
    return out


def oracle_mapping(diarizer: SegmentationDiarizer, reference: Annotation, labels: list[str]) -> np.ndarray:
    """(windows, 3) reference speaker index per local speaker: the one whose speech its active frames
    cover most, matched one-to-one within each window (cannot-link, as the real clustering)."""
    cfg = diarizer.config
    starts, activity = diarizer.windows()
    frames = math.ceil(diarizer.audio_s * cfg.sample_rate / cfg.frame_step)
    truth = reference_frames(reference, labels, frames, diarizer.frame_s)
    mapping = np.full(activity.shape[::2], -1, np.int64)
    centres = (cfg.first_centre + cfg.frame_step * np.arange(activity.shape[1])) // cfg.frame_step
    for window, start in enumerate(starts):
        at = centres + start // cfg.frame_step
        inside = (at >= 0) & (at < frames)
        shared = np.zeros((activity.shape[2], len(labels)))
        for local in range(activity.shape[2]):
            if activity[window, :, local].max() < cfg.tau_active:
                continue
            talking = (activity[window, :, local] >= cfg.onset) & inside
            shared[local] = truth[at[talking]].sum(axis=0)
        for local, speaker in zip(*linear_sum_assignment(-shared), strict=True):
            if shared[local, speaker] > 0:
                mapping[window, local] = speaker
    return mapping


def add_by_region(scorer: Scorer, file_id: str, name: str, reference: Annotation, hypothesis, uem) -> None:
    """Score the whole file, then its single-speaker and its overlapped reference regions apart."""
    scorer.add(file_id, name, reference, hypothesis, uem)
    whole = uem if uem is not None else Timeline([reference.get_timeline().extent()])
    overlapped = overlap_regions(reference).crop(whole)
    single = whole.extrude(overlapped)
    scorer.add(file_id, f"{name}@single", reference.crop(single), hypothesis.crop(single), single)
    if len(overlapped):
        scorer.add(
            file_id, f"{name}@overlap", reference.crop(overlapped), hypothesis.crop(overlapped), overlapped
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", required=True, help="folder with manifest.csv and RTTM references")
    parser.add_argument("--embedder", default="campplus")
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="OverlapConfig field"
    )
    args = parser.parse_args(argv)
    embedder = load_embedder(args.embedder)
    config = overlap_config(2.0, dict(item.split("=", 1) for item in args.set), embedder.name)
    segmenter = Segmenter()
    config.check_grid(segmenter.grid)
    scorer = Scorer(collars=(0.25,))
    items = multi_speaker_items(args.manifest)
    for item in tqdm(items, desc="files", unit="file"):
        reference = load_rttm(item.rttm)[item.file_id]
        uem = load_uem(item.uem) if item.uem else None
        diarizer = SegmentationDiarizer(config)
        feed_overlap_stream(diarizer, decode_file(item.audio), segmenter, embedder.embed)
        diarizer.finish()
        labels = sorted(reference.labels())
        revision = annotation([(u.start_s, u.end_s, u.label) for u in diarizer.revise()], item.file_id)
        oracle = diarizer.labelling(oracle_mapping(diarizer, reference, labels))
        named = annotation(
            [(u.start_s, u.end_s, labels[int(u.label.split("_")[1])]) for u in oracle], item.file_id
        )
        add_by_region(scorer, item.file_id, "revision", reference, revision, uem)
        add_by_region(scorer, item.file_id, "oracle", reference, named, uem)
    print(f"{len(items)} files of {args.manifest}, {embedder.model_id}; DER % at collar 0.25 (miss/FA/conf)")
    for name, t in scorer.totals().items():
        parts = "/".join(f"{100 * t[f'{part}@0.25']:.1f}" for part in ("missed", "false_alarm", "confusion"))
        print(f"{name:<18} {100 * t['der@0.25']:5.1f}  ({parts})")


if __name__ == "__main__":
    main()
