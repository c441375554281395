"""`speakerflow` subcommands: bench embed, models download."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Groups such as `bench` are shared by several cli_<area> modules; this helper creates them once.
from speakerflow.streams.cli.speakers import subcommand_group

# What each backend name runs; ECAPA backends share one checkpoint so the comparison is like for like.
BACKENDS = {
    "ge2e": "GE2E (Resemblyzer weights), batched partials",
    "ecapa": "ECAPA-TDNN, speakerflow fast path (FastEcapa, fp32 on CPU / fp16 on CUDA)",
    "ecapa-int8": "ECAPA-TDNN, fast path with int8 channel x channel layers (CPU)",
    "ecapa-sb-batched": "ECAPA-TDNN, SpeechBrain encode_batch on the whole batch",
    "ecapa-stock": "ECAPA-TDNN, SpeechBrain encode_batch called once per window (the peer)",
}
DEFAULT_BATCH_SIZES = "1,2,4,8,16,32,64,128,256"
_WIDTHS = (5, 10, 12, 8, 9, 9)  # table columns after the backend name


@dataclass
class BenchRow:
    backend: str
    batch_size: int
    calls: int
    windows_per_s: float
    x_real_time: float  # seconds of audio embedded per second of compute
    rtf: float  # compute seconds per second of audio
    latency_ms_p50: float  # one embed call (one batch)
    latency_ms_p99: float


@dataclass
class BackendInfo:
    description: str
    model_id: str
    load_s: float
    rows: list[BenchRow] = field(default_factory=list)


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the top-level parser."""
    e = subcommand_group(sub, "bench", "benchmarks (figures, not tests)").add_parser(
        "embed",
        help="embedding throughput and latency per backend and batch size, beside SpeechBrain's stock path",
        description="Windows/s, real-time factor and per-batch latency of each embedding backend at each "
        "batch size on the current device. ECAPA backends use one checkpoint: EMBEDDING_MODEL_PATH "
        "or --ecapa-path, else a VoxCeleb-size ECAPA-TDNN (1024 channels) with random weights.",
    )
    e.add_argument(
        "--backends", default="ge2e,ecapa,ecapa-stock", help=f"comma-separated: {', '.join(BACKENDS)}"
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

    bench = subcommand_group(sub, "bench", "benchmarks (figures, not tests)")
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

    d = subcommand_group(sub, "models", "model weights").add_parser(
        "download",
        help="fetch speechbrain/spkrec-ecapa-voxceleb for the `ecapa` embedder (needs internet)",
    )
    d.add_argument("--target", default=None, help="directory (default: SPEAKERFLOW_DATA_DIR/models/ecapa)")
    d.set_defaults(func=cmd_models_download)


# -- bench embed ------------------------------------------------------------------------------------
def cmd_bench_embed(args: argparse.Namespace) -> int:
    import torch

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
        ecapa_path = str(_random_ecapa(Path(settings.data_dir), args.channels))

    windows = _windows(max(sizes), args.seconds)
    report: dict[str, Any] = {
        "device": device,
        "machine": _machine(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "window_seconds": args.seconds,
        "ecapa_checkpoint": ecapa_path if any(b.startswith("ecapa") for b in backends) else None,
        "backends": {},
    }
    loaded: dict[str, tuple[BackendInfo, Any]] = {}
    for backend in backends:
        try:
            loaded[backend] = _load_backend(backend, device, ecapa_path)
        except EmbedderUnavailable as exc:  # e.g. int8 on CUDA: say so, measure the others
            print(f"{backend}: skipped ({exc})")
            continue
        info = loaded[backend][0]
        print(f"{backend}: {info.description}; model {info.model_id}; loaded in {info.load_s:.1f} s")
    for row in _measure({b: embed for b, (_, embed) in loaded.items()}, windows, sizes, args):
        loaded[row.backend][0].rows.append(row)
    report["backends"] = {b: asdict(info) for b, (info, _) in loaded.items()}
    report["summary"] = _summary(report["backends"])
    _print_table(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        _plot(report, Path(args.plot))
        print(f"wrote {args.plot}")
    return 0


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


def _random_ecapa(data_dir: Path, channels: int) -> Path:
    """The random-weight ECAPA checkpoint used for speed (built once, reused by later runs)."""
    from speakerflow.evaluation.ecapa_checkpoint import build_random_ecapa_checkpoint

    directory = data_dir / "bench" / f"ecapa-random-{channels}"
    if not (directory / "hyperparams.yaml").is_file():
        print(f"building a random-weight ECAPA-TDNN ({channels} channels) in {directory}")
        build_random_ecapa_checkpoint(directory, channels=channels, speakers=7205 if channels >= 1024 else 16)
    return directory


def _windows(count: int, seconds: float) -> list:
    """`count` distinct speech-like windows (content does not change the cost of these models)."""
    import torch

    from speakerflow.evaluation.ecapa_checkpoint import synthetic_speechlike

    wav = synthetic_speechlike(count, seconds, torch.Generator().manual_seed(0))
    return [row.numpy().copy() for row in wav]


def _load_backend(backend: str, device: str, ecapa_path: str):
    from speakerflow.processors.embedding import EcapaEmbedder, Ge2eEmbedder

    started = time.perf_counter()
    if backend == "ge2e":
        embedder = Ge2eEmbedder(device)
        embed = embedder.embed
    else:
        embedder = EcapaEmbedder(ecapa_path, device, precision="int8" if backend == "ecapa-int8" else "auto")
        embed = {
            "ecapa": embedder.embed,
            "ecapa-int8": embedder.embed,
            "ecapa-sb-batched": lambda ws: _sb_batched(embedder, ws),
            "ecapa-stock": embedder.embed_stock,
        }[backend]
    info = BackendInfo(BACKENDS[backend], embedder.model_id, time.perf_counter() - started)
    return info, embed


def _sb_batched(embedder, waveforms: list) -> Any:
    """SpeechBrain's encode_batch on the whole (equal-length) batch at once: batching alone."""
    import numpy as np
    import torch

    with torch.inference_mode():
        out = embedder.classifier.encode_batch(torch.from_numpy(np.stack(waveforms)))
    return out[:, 0].float().cpu().numpy()


def _measure(
    embeds: dict[str, Any], windows: list, sizes: list[int], args: argparse.Namespace
) -> list[BenchRow]:
    """Time every backend at every batch size, interleaved call by call.

    Round-robin timing keeps the comparison fair on a shared machine: a burst of load from elsewhere
    slows every backend of that batch size alike instead of whichever happened to be running.
    """
    import numpy as np
    from tqdm import tqdm

    rows = []
    for embed in embeds.values():
        embed(windows[:1])  # first call: lazy initialisation
    for size in tqdm(sizes, desc="batch sizes", unit="size", file=sys.stderr):
        batch = windows[:size]
        for name, embed in embeds.items():
            if name != "ecapa-stock":
                embed(batch)  # a new batch shape may need its own warm-up (kernels, buffers)
        latencies: dict[str, list[float]] = {name: [] for name in embeds}
        while pending := [n for n, t in latencies.items() if sum(t) < args.min_time or len(t) < 2]:
            for name in pending:
                started = time.perf_counter()
                embeds[name](batch)
                latencies[name].append(time.perf_counter() - started)
        for name, times in latencies.items():
            per_window = float(np.sum(times)) / (len(times) * size)
            rows.append(
                BenchRow(
                    backend=name,
                    batch_size=size,
                    calls=len(times),
                    windows_per_s=1.0 / per_window,
                    x_real_time=args.seconds / per_window,
                    rtf=per_window / args.seconds,
                    latency_ms_p50=float(np.percentile(times, 50) * 1000),
                    latency_ms_p99=float(np.percentile(times, 99) * 1000),
                )
            )
    return rows


def _summary(backends: dict[str, dict]) -> dict[str, Any]:
    """Best throughput per backend, and each ECAPA variant against the stock per-window peer."""
    best = {
        name: max(info["rows"], key=lambda r: r["windows_per_s"])
        for name, info in backends.items()
        if info["rows"]
    }
    summary: dict[str, Any] = {
        name: {
            "best_batch_size": r["batch_size"],
            "windows_per_s": r["windows_per_s"],
            "x_real_time": r["x_real_time"],
        }
        for name, r in best.items()
    }
    if "ecapa-stock" in best:
        stock = best["ecapa-stock"]["windows_per_s"]
        for name, r in best.items():
            if name.startswith("ecapa") and name != "ecapa-stock":
                summary[name]["speedup_vs_stock"] = r["windows_per_s"] / stock
    return summary


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


def _machine(device: str) -> str:
    import torch

    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return torch.cuda.get_device_name(torch.device(device if device != "auto" else "cuda:0"))
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs"


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, info in report["backends"].items():
        xs = [r["batch_size"] for r in info["rows"]]
        ax.plot(xs, [r["windows_per_s"] for r in info["rows"]], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("windows per call (batch size)")
    ax.set_ylabel(f"{report['window_seconds']:g}-s windows per second")
    ax.set_title(f"speakerflow bench embed: {report['machine']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- models download --------------------------------------------------------------------------------
def cmd_models_download(args: argparse.Namespace) -> int:
    from speakerflow.processors.embedding import ECAPA_HUB_ID, EcapaEmbedder, default_models_dir
    from speakerflow.streams.settings import Settings

    target = Path(args.target or Path(Settings.from_env().data_dir) / "models" / "ecapa").resolve()
    print(f"fetching {ECAPA_HUB_ID} into {target} ...", flush=True)
    try:
        _fetch_hub_model(ECAPA_HUB_ID, target)
        embedder = EcapaEmbedder(str(target), "cpu")
    except Exception as exc:
        print(
            f"error: could not download {ECAPA_HUB_ID} ({type(exc).__name__}: {exc}).\n"
            "This needs HTTPS access to huggingface.co. Without it, copy a downloaded model directory "
            "(hyperparams.yaml, embedding_model.ckpt, mean_var_norm_emb.ckpt, classifier.ckpt, "
            "label_encoder.txt) to this machine and set EMBEDDING_MODEL_PATH to it.",
            file=sys.stderr,
        )
        return 1
    print(f"ok: {embedder.model_id}, {embedder.dim}-dim embeddings")
    if target != default_models_dir():
        print(f"use it with: export SPEAKERFLOW_EMBEDDER=ecapa EMBEDDING_MODEL_PATH={target}")
    else:
        print("use it with: export SPEAKERFLOW_EMBEDDER=ecapa")
    return 0


def _fetch_hub_model(hub_id: str, target: Path) -> None:
    """SpeechBrain's own fetching, copying real files (not cache symlinks) into `target`."""
    from speechbrain.inference.speaker import EncoderClassifier
    from speechbrain.utils.fetching import LocalStrategy

    EncoderClassifier.from_hparams(
        source=hub_id, savedir=str(target), download_only=True, local_strategy=LocalStrategy.COPY_SKIP_CACHE
    )
