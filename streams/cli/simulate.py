"""Tooling command: simulate, which builds multi-speaker conversations from a corpus (audio + RTTM +
manifest) for `eval diarize`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="build multi-speaker conversations (audio + RTTM + manifest)")
    p.add_argument("--manifest", required=True, help="corpus folder or its manifest.csv")
    p.add_argument("--speakers", default="2-6", help="speakers per conversation, e.g. 2-6 or 3")
    p.add_argument("--minutes", type=float, default=30.0, help="total minutes of audio to generate")
    p.add_argument("--file-minutes", type=float, default=3.0, help="target length of one conversation")
    p.add_argument("--overlap", type=float, default=0.0, help="fraction of speech with two speakers")
    p.add_argument("--min-speech", type=float, default=10.0, help="seconds a speaker needs to take part")
    p.add_argument("--split", choices=["all", "tune", "eval"], default="all", help="speaker partition")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_simulate)


def _speaker_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    return int(low), int(high or low)


def cmd_simulate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from speakerflow.evaluation.corpus import load_manifest
    from speakerflow.evaluation.simulation import SimulationConfig, simulate, write_conversations

    config = SimulationConfig(
        speakers=_speaker_range(args.speakers),
        minutes=args.minutes,
        file_minutes=args.file_minutes,
        overlap=args.overlap,
        min_speech_s=args.min_speech,
        split=args.split,
        seed=args.seed,
    )
    conversations = tqdm(simulate(load_manifest(args.manifest), config), desc="conversations", unit="file")
    manifest = write_conversations(conversations, args.out, config)
    summary = json.loads((Path(args.out) / "simulation.json").read_text())["files"]
    minutes = sum(f["duration_s"] for f in summary) / 60
    overlap = sum(f["overlap_s"] for f in summary) / max(sum(f["speech_s"] for f in summary), 1e-9)
    print(f"{len(summary)} conversations, {minutes:.1f} min, overlap {overlap:.1%} of speech -> {manifest}")
    return 0
