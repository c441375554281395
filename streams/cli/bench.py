"""Tooling commands that measure speed: bench embed | sink | identify | gallery | enroll | verify | diarize.

They parse, call speakerflow.evaluation (imported lazily, inside each command: the `[eval]` extra) and
print.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from speakerflow.streams.cli.common import diarizer_arguments, group
from speakerflow.streams.cli.common import embedder as configured_embedder

# Kept here so that `--help` needs no evaluation import; evaluation/embed_bench.py describes each one.
BACKEND_NAMES = (
    "campplus",
    "campplus-stock",
    "ge2e",
    "ecapa",
    "ecapa-int8",
    "ecapa-sb-batched",
    "ecapa-stock",
)
DEFAULT_BATCH_SIZES = "1,2,4,8,16,32,64,128,256"
_WIDTHS = (5, 10, 12, 8, 9, 9)  # table columns after the backend name


def register(sub: argparse._SubParsersAction) -> None:
    bench = group(sub, "bench", "benchmarks (figures, not tests)")
    e = bench.add_parser(
        "embed",
        help="embedding throughput and latency per backend and batch size, beside SpeechBrain's stock path",
        description="Windows/s, real-time factor and per-batch latency of each embedding backend at each "
        "batch size on the current device. ECAPA backends use one checkpoint: EMBEDDING_MODEL_PATH "
        "or --ecapa-path, else a VoxCeleb-size ECAPA-TDNN (1024 channels) with random weights.",
    )
    e.add_argument(
        "--backends",
        default="campplus,ge2e,ecapa,ecapa-stock",
        help=f"comma-separated: {', '.join(BACKEND_NAMES)}",
    )
    e.add_argument("--batch-sizes", default=DEFAULT_BATCH_SIZES, help="comma-separated windows per call")
    e.add_argument("--seconds", type=float, default=2.0, help="window length in seconds")
    e.add_argument("--min-time", type=float, default=3.0, help="least seconds timed per batch size")
    e.add_argument("--device", default=None, help="auto, cpu or cuda:N (default: SPEAKERFLOW_DEVICE)")
    e.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads and embedding workers (default: all cores)"
    )
    e.add_argument("--ecapa-path", default=None, help="SpeechBrain ECAPA directory (default: see above)")
    e.add_argument("--channels", type=int, default=1024, help="channels of the random-weight ECAPA")
    e.add_argument("--json", default=None, help="write the results to this JSON file")
    e.add_argument("--plot", default=None, help="write windows/s against batch size to this PNG")
    e.set_defaults(func=cmd_bench_embed)

    s = bench.add_parser(
        "sink",
        help="segments/s the PostgreSQL sink writes, draining a backlog on the segments topic",
        description="Puts provisional and final updates of --segments segments on the segments topic, then "
        "times the sink draining them into a scratch database (DATABASE_URL's server, else embedded).",
    )
    s.add_argument("--segments", type=int, default=20000, help="segments in the backlog (2 updates each)")
    s.add_argument("--batch", default="50,500,2000", help="sink batch sizes to compare (comma list)")
    s.add_argument("--out", default=".data/bench", help="folder for sink.json and logs")
    s.set_defaults(func=cmd_bench_sink)

    i = bench.add_parser(
        "identify",
        help="latency of POST /identify sync=true on a long upload, against a real worker and gateway",
        description="Starts a worker process (all stages) and the gateway process, enrols three speakers "
        "over HTTP, then times POST /identify (sync=true) on a --seconds conversation.",
    )
    i.add_argument("--seconds", type=float, default=60.0, help="length of the uploaded conversation")
    i.add_argument("--runs", type=int, default=10, help="timed requests (after one warm-up)")
    i.add_argument("--out", default=".data/bench", help="folder for identify.json and logs")
    i.set_defaults(func=cmd_bench_identify)
    for parser in (s, i):
        parser.add_argument(
            "--broker",
            choices=["embedded", "configured"],
            default="embedded",
            help="start an embedded broker for the run, or use KAFKA_BOOTSTRAP_SERVERS",
        )

    q = bench.add_parser("gallery", help="gallery search: exact vs FAISS IVF, latency, memory, recall")
    q.add_argument("--size", default="10000,100000,1000000", help="comma-separated gallery sizes")
    q.add_argument("--dim", type=int, default=192)
    q.add_argument("--queries", type=int, default=1000, help="queries for recall (latency uses 500)")
    q.add_argument("--batch", type=int, default=64, help="queries per batched search")
    q.add_argument("--hnsw", action="store_true", help="also measure FAISS HNSW, for comparison")
    q.add_argument("--hnsw-max", type=int, default=1_000_000, help="largest size to build HNSW for")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--json", default="", help="write the figures to this JSON file")
    q.add_argument("--plot", default="", help="write latency and recall plots to this PNG")
    q.set_defaults(func=cmd_bench_gallery)
    for kind, speech_s, what in (
        ("enroll", 10.0, "enrollment request -> voiceprint on the gallery topic"),
        ("verify", 3.0, "verification request -> result"),
    ):
        q = bench.add_parser(kind, help=f"latency of {what} (embedded broker + in-process worker)")
        q.add_argument("--requests", type=int, default=50)
        q.add_argument("--speech-s", type=float, default=speech_s, help="seconds of speech per sample")
        q.add_argument("--warmup", type=int, default=3)
        q.add_argument("--json", default="")
        q.set_defaults(func=cmd_bench_requests, kind=kind)

    p = bench.add_parser(
        "diarize", help="real-time factor of live diarization (VAD + windows + embedding + clustering)"
    )
    p.add_argument("--manifest", required=True, help="corpus folder with multi-speaker files")
    p.add_argument("--minutes", type=float, default=10.0, help="stop after this much audio")
    p.add_argument("--chunk-s", type=float, default=0.5)
    p.add_argument("--json", default="", help="write the figures here")
    diarizer_arguments(p)
    p.set_defaults(func=cmd_bench_diarize)


def cmd_bench_embed(args: argparse.Namespace) -> int:
    import torch

    from speakerflow.evaluation.embed_bench import (
        BACKENDS,
        BackendInfo,
        load_backend,
        machine,
        measure,
        plot,
        random_ecapa,
        speechlike_windows,
        summary,
    )
    from speakerflow.processors.embedding import EmbedderUnavailable
    from speakerflow.streams.settings import Settings

    settings = Settings.from_env()
    for chatty in ("speechbrain.utils.fetching", "speechbrain.utils.parameter_transfer"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        print(
            f"error: unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}",
            file=sys.stderr,
        )
        return 2
    sizes = sorted({int(s) for s in args.batch_sizes.split(",") if s.strip()})
    # The device's capacity, not one worker's share: all cores unless told otherwise.
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device = args.device or settings.device
    ecapa_path = args.ecapa_path or settings.embedding_model_path
    if any(b.startswith("ecapa") for b in backends) and not ecapa_path:
        ecapa_path = str(random_ecapa(Path(settings.data_dir), args.channels))

    windows = speechlike_windows(max(sizes), args.seconds)
    report: dict[str, Any] = {
        "device": device,
        "machine": machine(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "window_seconds": args.seconds,
        "ecapa_checkpoint": ecapa_path if any(b.startswith("ecapa") for b in backends) else None,
        "backends": {},
    }
    loaded: dict[str, tuple[BackendInfo, Any]] = {}
    for backend in backends:
        try:
            loaded[backend] = load_backend(backend, device, ecapa_path)
        except EmbedderUnavailable as exc:  # e.g. int8 on CUDA: say so, measure the others
            print(f"{backend}: skipped ({exc})")
            continue
        info = loaded[backend][0]
        print(f"{backend}: {info.description}; model {info.model_id}; loaded in {info.load_s:.1f} s")
    for row in measure(
        {b: embed for b, (_, embed) in loaded.items()}, windows, sizes, args.min_time, args.seconds
    ):
        loaded[row.backend][0].rows.append(row)
    report["backends"] = {b: asdict(info) for b, (info, _) in loaded.items()}
    report["summary"] = summary(report["backends"])
    _print_table(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot(report, Path(args.plot))
        print(f"wrote {args.plot}")
    return 0


def _print_table(report: dict[str, Any]) -> None:
    print(
        f"\n{report['machine']}; torch {report['torch']}, {report['threads']} threads; "
        f"{report['window_seconds']:g}-s windows"
    )
    header = ("backend", "batch", "windows/s", "x real time", "RTF", "p50 ms", "p99 ms")
    print(f"{header[0]:<18} " + " ".join(f"{h:>{w}}" for h, w in zip(header[1:], _WIDTHS, strict=True)))
    for info in report["backends"].values():
        for r in info["rows"]:
            cells = (
                f"{r['batch_size']}",
                f"{r['windows_per_s']:.1f}",
                f"{r['x_real_time']:.1f}",
                f"{r['rtf']:.4f}",
                f"{r['latency_ms_p50']:.1f}",
                f"{r['latency_ms_p99']:.1f}",
            )
            print(f"{r['backend']:<18} " + " ".join(f"{c:>{w}}" for c, w in zip(cells, _WIDTHS, strict=True)))
    print()
    for name, s in report["summary"].items():
        versus = (
            f", {s['speedup_vs_stock']:.2f}x the stock per-window peer" if "speedup_vs_stock" in s else ""
        )
        print(
            f"{name}: best {s['windows_per_s']:.1f} windows/s ({s['x_real_time']:.1f}x real time) "
            f"at batch {s['best_batch_size']}{versus}"
        )


def cmd_bench_sink(args: argparse.Namespace) -> int:
    from speakerflow.evaluation.service_bench import run_sink_bench, write_json

    out = Path(args.out)
    batches = [int(b) for b in args.batch.split(",") if b.strip()]
    results = run_sink_bench(_service_settings(args), args.segments, batches, out)
    print("\n| sink batch | segments | updates | group join (s) | drain (s) | segments/s | updates/s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r.batch_size} | {r.segments} | {r.records} | {r.join_s:.1f} | {r.drain_s:.1f} | "
            f"{r.segments_per_s:,.0f} | {r.records_per_s:,.0f} |"
        )
    write_json(out / "sink.json", results)
    print(f"json: {out / 'sink.json'}")
    return 0


def cmd_bench_identify(args: argparse.Namespace) -> int:
    from speakerflow.evaluation.service_bench import run_identify_bench, write_json

    out = Path(args.out)
    r = run_identify_bench(_service_settings(args), args.seconds, args.runs, out)
    print("\n| upload | requests | p50 (s) | p95 (s) | max (s) | x real time (p50) | segments | named time |")
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {r.audio_s:g} s | {r.runs} | {r.latency_p50_s:.2f} | {r.latency_p95_s:.2f} "
        f"| {r.latency_max_s:.2f} | {r.x_real_time:.0f}x | {r.segments} | {100 * r.named_share:.0f} % |"
    )
    write_json(out / "identify.json", [r])
    print(f"json: {out / 'identify.json'}")
    return 0


def _service_settings(args: argparse.Namespace):
    from dataclasses import replace

    from speakerflow.streams.settings import Settings

    settings = Settings.from_env()
    return replace(settings, broker_profile="embedded") if args.broker == "embedded" else settings


def cmd_bench_gallery(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from tqdm import tqdm

    from speakerflow.evaluation.gallery_bench import bench_size, plot_gallery

    sizes = [int(float(s)) for s in args.size.split(",") if s.strip()]
    report = []
    bar = tqdm(total=len(sizes), desc="gallery sizes", unit="size", file=sys.stderr)
    for size in sizes:
        result = bench_size(
            size,
            args.dim,
            queries=args.queries,
            batch=args.batch,
            hnsw=args.hnsw and size <= args.hnsw_max,
            seed=args.seed,
            progress=lambda msg: bar.set_postfix_str(msg[:60]),
        )
        bar.update(1)
        report.append(asdict(result))
        _print_gallery_result(result)
    bar.close()
    if args.json:
        Path(args.json).write_text(json.dumps({"sizes": report}, indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        plot_gallery(report, Path(args.plot))
        print(f"wrote {args.plot}")
    return 0


def _print_gallery_result(result) -> None:
    print(
        f"\n== {result.size:,} voiceprints x {result.dim} dims; {result.queries} queries "
        f"(exact top-1 is the query's own speaker for {result.target_is_exact_top1:.1%})"
    )
    print(
        f"{'index':<38} {'build s':>8} {'mem MB':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'batch ms/q':>10} {'recall@1':>8}  params"
    )
    for r in result.results:
        recall = "exact" if r.recall_at_1 is None else f"{r.recall_at_1:.4f}"
        print(
            f"{r.kind:<38} {r.build_s:>8.2f} {r.memory_mb:>8.0f} {r.single.p50_ms:>8.3f} "
            f"{r.single.p99_ms:>8.3f} {r.batch_per_query_ms:>10.4f} {recall:>8}  {r.params}"
        )
        if r.update_ms is not None:
            print(f"{'':<38} update {r.update_ms:.3f} ms, delete {r.delete_ms:.3f} ms (one speaker)")
        for point in r.sweep:
            knob = "nprobe" if "nprobe" in point else "ef_search"
            print(
                f"{'':<38} {knob} {point[knob]:>4}: recall@1 {point['recall_at_1']:.4f}, "
                f"p50 {point['p50_ms']:.3f} ms, p99 {point['p99_ms']:.3f} ms"
            )


def cmd_bench_requests(args: argparse.Namespace) -> int:
    from speakerflow.evaluation.request_bench import report_text, run_request_bench

    report = run_request_bench(args.kind, args.requests, args.speech_s, args.warmup)
    print(report_text(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


def cmd_bench_diarize(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from speakerflow.evaluation.diarization import multi_speaker_items, run_stream
    from speakerflow.evaluation.overlap_runner import configured_runner
    from speakerflow.processors.audio import decode_file

    embedder = configured_embedder("")
    embedder.embed([decode_file(multi_speaker_items(args.manifest)[0].audio)[:32000]])  # warm-up
    runner, config = configured_runner(args.diarizer, embedder, args.set, args.chunk_s)
    steps = ("segment", "embed", "cluster", "revise") if runner else ("vad", "embed", "cluster", "revise")
    totals = dict.fromkeys(steps, 0.0)
    audio_s = 0.0
    windows = 0
    files = 0
    for item in tqdm(multi_speaker_items(args.manifest), desc="files", unit="file"):
        audio = decode_file(item.audio)
        run = runner(audio) if runner else run_stream(audio, config, embedder.embed, args.chunk_s)
        for key, value in run.seconds.items():
            totals[key] += value
        audio_s += run.duration_s
        windows += run.windows
        files += 1
        if audio_s >= args.minutes * 60:
            break
    live = sum(v for k, v in totals.items() if k != "revise")
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
    for key in steps:
        print(f"  {key:<8} {totals[key]:7.2f} s   RTF {totals[key] / audio_s:.4f}")
    rtf = figures["rtf_live"]
    print(f"live diarization RTF {rtf:.4f} (one core-second per {1 / rtf:.0f} s of audio)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0
