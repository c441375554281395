"""`speakerflow` subcommands of diarization: simulate, eval diarize, bench diarize."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from speakerflow.streams.cli.speakers import subcommand_group

DEFAULT_LATENCIES = "0.5,1,2,5"


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the top-level parser."""
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

    p = subcommand_group(sub, "eval", "evaluations on a speech manifest").add_parser(
        "diarize", help="DER/JER of live and revised diarization on a manifest's multi-speaker files"
    )
    p.add_argument("--manifest", required=True, help="corpus folder or its manifest.csv")
    p.add_argument("--latency", default=DEFAULT_LATENCIES, help="live latencies to score (seconds)")
    p.add_argument("--chunk-s", type=float, default=0.5, help="audio chunk length fed to the diarizer")
    p.add_argument("--json", default="", help="write the full report (totals and per file) here")
    p.add_argument("--plot", default="", help="folder for one timeline PNG per file")
    p.add_argument("--baselines", action="store_true", help="also run the two baselines")
    p.add_argument("--embedder", default="", help="embedder name (default: SPEAKERFLOW_EMBEDDER)")
    p.add_argument("--limit", type=int, default=0, help="only the first N files")
    p.set_defaults(func=cmd_eval_diarize)

    p = subcommand_group(sub, "bench", "benchmarks (figures, not tests)").add_parser(
        "diarize", help="real-time factor of live diarization (VAD + windows + embedding + clustering)"
    )
    p.add_argument("--manifest", required=True, help="corpus folder with multi-speaker files")
    p.add_argument("--minutes", type=float, default=10.0, help="stop after this much audio")
    p.add_argument("--chunk-s", type=float, default=0.5)
    p.add_argument("--json", default="", help="write the figures here")
    p.set_defaults(func=cmd_bench_diarize)


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


def _embedder(name: str):
    import torch

    from speakerflow.processors.embedding import load_embedder
    from speakerflow.streams.settings import Settings

    settings = Settings.from_env()
    if settings.torch_threads:  # one thread each is what a loaded worker gives a stream's VAD
        torch.set_num_threads(settings.torch_threads)
    return load_embedder(name or settings.embedder, settings.device, settings.embedding_model_path)


def _percent(value: float) -> str:
    return f"{100 * value:5.1f}"


def print_totals(totals: dict[str, dict], out=sys.stdout) -> None:
    print(
        f"{'labelling':<18} {'DER':>6} {'miss':>5} {'FA':>5} {'conf':>5} | {'DER c0':>6} | "
        f"{'JER':>6} | {'count ok':>8}  (collar 0.25 s unless c0; %)",
        file=out,
    )
    for name, t in totals.items():
        print(
            f"{name:<18} {_percent(t['der@0.25'])} {_percent(t['missed@0.25'])} "
            f"{_percent(t['false_alarm@0.25'])} {_percent(t['confusion@0.25'])} | {_percent(t['der@0.0'])} | "
            f"{_percent(t['jer@0.25'])} | {_percent(t['count_exact'])}",
            file=out,
        )


def cmd_eval_diarize(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from speakerflow.evaluation.diarization import Scorer, evaluate_item, multi_speaker_items, plot_timeline
    from speakerflow.streams.settings import Settings
    from speakerflow.streams.stages.diarize import diarizer_config

    items = multi_speaker_items(args.manifest)
    if args.limit:
        items = items[: args.limit]
    if not items:
        print(f"error: no speaker=multi rows with an RTTM in {args.manifest}", file=sys.stderr)
        return 2
    latencies = tuple(float(x) for x in args.latency.split(",") if x.strip())
    config = diarizer_config(Settings.from_env())
    embedder = _embedder(args.embedder)
    scorer = Scorer()
    plot_dir = Path(args.plot) if args.plot else None
    if plot_dir:
        plot_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    audio_s = 0.0
    for item in tqdm(items, desc="files", unit="file"):
        result = evaluate_item(item, config, embedder.embed, scorer, latencies, args.chunk_s, args.baselines)
        audio_s += result.run.duration_s
        if plot_dir:
            shown = ("revision", f"live@{2:g}s" if 2.0 in latencies else "live_final")
            plot_timeline(result, plot_dir / f"{item.file_id}.png", shown)
    totals = scorer.totals()
    print(f"{len(items)} files, {audio_s / 60:.1f} min of audio, {time.perf_counter() - started:.0f} s")
    print_totals(totals)
    if args.json:
        report = {
            "manifest": str(args.manifest),
            "embedder": embedder.model_id,
            "config": _config_json(config),
            "latencies": latencies,
            "chunk_s": args.chunk_s,
            "totals": totals,
            "files": scorer.rows,
        }
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"report written to {args.json}")
    return 0


def _config_json(config) -> dict:
    from dataclasses import asdict

    return asdict(config)


def cmd_bench_diarize(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from speakerflow.evaluation.diarization import multi_speaker_items, run_stream
    from speakerflow.processors.audio import decode_file
    from speakerflow.streams.settings import Settings
    from speakerflow.streams.stages.diarize import diarizer_config

    config = diarizer_config(Settings.from_env())
    embedder = _embedder("")
    embedder.embed([decode_file(multi_speaker_items(args.manifest)[0].audio)[:32000]])  # warm-up
    totals = dict.fromkeys(("vad", "embed", "cluster", "revise"), 0.0)
    audio_s = 0.0
    windows = 0
    files = 0
    for item in tqdm(multi_speaker_items(args.manifest), desc="files", unit="file"):
        run = run_stream(decode_file(item.audio), config, embedder.embed, args.chunk_s)
        for key, value in run.seconds.items():
            totals[key] += value
        audio_s += run.duration_s
        windows += run.windows
        files += 1
        if audio_s >= args.minutes * 60:
            break
    live = totals["vad"] + totals["embed"] + totals["cluster"]
    figures = {
        "embedder": embedder.model_id,
        "files": files,
        "audio_s": round(audio_s, 1),
        "windows": windows,
        "seconds": {k: round(v, 3) for k, v in totals.items()},
        "rtf_live": live / audio_s,
        "rtf_by_step": {k: v / audio_s for k, v in totals.items()},
        "rtf_with_revision": (live + totals["revise"]) / audio_s,
    }
    print(f"{files} files, {audio_s / 60:.1f} min of audio, {windows} windows ({embedder.model_id})")
    for key in ("vad", "embed", "cluster", "revise"):
        print(f"  {key:<8} {totals[key]:7.2f} s   RTF {totals[key] / audio_s:.4f}")
    rtf = figures["rtf_live"]
    print(f"live diarization RTF {rtf:.4f} (one core-second per {1 / rtf:.0f} s of audio)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0
