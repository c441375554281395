"""`speakerflow loadtest`: N live conversations at real-time pace through a worker, measured end to end.

Latency is the time an identified segment reaches this process minus the capture time of the newest
audio it covers (`source_capture_ts_ms`), counted two ways:
- first label: updates that label audio no earlier update of the stream covered (provisional extensions,
  and final turns too short to have had one): audio captured -> a name for it on the output topic;
- final: the first final record of each turn. A turn is final only once the diarizer has committed the
  next speaker, so this latency includes the configured lookahead (`SPEAKERFLOW_LATENCY_S`) by design.
End-of-stream revisions and identity corrections re-state old audio on purpose and are left out.
Lag is what the load generator produced to the audio topic minus what the diarize group has committed,
counted by us (the embedded broker's end offsets cannot be trusted, see FACTS.md).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from speakerflow.evaluation.scenario import librispeech_scenario
from speakerflow.schemas import codec
from speakerflow.streams.broker import broker_for_run
from speakerflow.streams.records import pcm_chunk
from speakerflow.streams.runtime import Publisher, TopicReader, consume_available, group_consumer, now_ms
from speakerflow.streams.settings import REPO_ROOT, Settings
from speakerflow.streams.topology import AUDIO, DEADLETTER, SEGMENTS_IDENTIFIED, create_topics

SAMPLE_RATE = 16000
CHUNK_S = 0.5


@dataclass
class LoadResult:
    streams: int
    minutes: float
    segments: int  # live updates counted (first labels)
    latency_p50_s: float  # first label
    latency_p95_s: float
    latency_p99_s: float
    final_p50_s: float
    final_p95_s: float
    max_lag_chunks: int
    final_lag_chunks: int
    worker_cpu_percent: float  # mean over the run; 200 % = both cores of this machine
    worker_rss_mb: float  # peak
    dead_letters: int
    timeline: list[tuple[float, float]] = field(default_factory=list, repr=False)  # (t, first-label latency)
    final_timeline: list[tuple[float, float]] = field(default_factory=list, repr=False)
    samples: list[tuple[float, float, float, int]] = field(
        default_factory=list, repr=False
    )  # t, cpu, rss, lag
    workers: int = 1  # worker processes in the consumer group
    diarizer: str = ""  # the workers' diarizer mode (light | segmentation), from their "worker ready" line
    model_id: str = ""  # the workers' embedding model, from the same line

    def holds(self, p95_limit_s: float = 2.0) -> bool:
        return self.segments > 0 and self.latency_p95_s <= p95_limit_s


def conversations(data_dir: Path, streams: int, seconds: float) -> list[np.ndarray]:
    """`streams` different conversations, each looped to `seconds` of audio."""
    out = []
    for i in range(streams):
        audio = librispeech_scenario(data_dir, turns=10, seed=1000 + i).audio
        repeats = int(np.ceil(seconds * SAMPLE_RATE / len(audio)))
        out.append(np.tile(audio, repeats)[: int(seconds * SAMPLE_RATE)])
    return out


class Player(threading.Thread):
    """Sends every stream's next chunk each CHUNK_S, like N phones talking at once."""

    def __init__(self, settings: Settings, audios: list[np.ndarray], run_id: str) -> None:
        super().__init__(daemon=True)
        self.publisher = Publisher(settings)
        self.topic = settings.topic(AUDIO)
        self.audios = audios
        self.stream_ids = [f"load-{run_id}-{i:03d}" for i in range(len(audios))]
        self.sent_by_stream = [0] * len(audios)

    def run(self) -> None:
        size = int(CHUNK_S * SAMPLE_RATE)
        total = max(len(a) for a in self.audios)
        origin = time.monotonic()
        origin_ms = now_ms()
        for tick, start in enumerate(range(0, total, size)):
            wait = origin + (tick + 1) * CHUNK_S - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            for i, audio in enumerate(self.audios):
                if start >= len(audio):
                    continue
                record = pcm_chunk(
                    self.stream_ids[i],
                    tick,
                    origin_ms + int(tick * CHUNK_S * 1000),
                    audio[start : start + size],
                    start + size >= len(audio),
                    {"source": "loadtest"},
                )
                self.publisher.publish(self.topic, self.stream_ids[i], "AudioChunk", record)
                self.sent_by_stream[i] += 1
            self.publisher.poll()
        self.publisher.flush()


class LatencyProbe(threading.Thread):
    def __init__(self, settings: Settings, prefix: str) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        self.prefix = prefix
        self.stopping = threading.Event()
        self.assigned = threading.Event()  # joined its group: records from now on arrive when produced
        self.timeline: list[tuple[float, float]] = []  # first labels
        self.final_timeline: list[tuple[float, float]] = []
        self.started = time.monotonic()

    def run(self) -> None:
        consumer = group_consumer(
            self.settings,
            f"loadtest-probe-{uuid.uuid4().hex[:8]}",
            [self.settings.topic(SEGMENTS_IDENTIFIED)],
            on_assign=lambda _consumer, _partitions: self.assigned.set(),
        )
        news = SegmentNews()
        try:
            while not self.stopping.is_set():
                for msg in consume_available(consumer, 500, 0.1):
                    if msg.error() is not None or msg.value() is None:
                        continue
                    seg = codec.decode("IdentifiedSegment", msg.value())
                    if not seg["stream_id"].startswith(self.prefix):
                        continue
                    first, final = news.classify(seg)
                    at = time.monotonic() - self.started
                    latency = (now_ms() - seg["source_capture_ts_ms"]) / 1000
                    if first:
                        self.timeline.append((at, latency))
                    if final:
                        self.final_timeline.append((at, latency))
        finally:
            consumer.close()


class SegmentNews:
    """Tells which identified-segment records are news: a first label for audio, or a turn's first final."""

    def __init__(self) -> None:
        self._labelled_to: dict[str, float] = {}  # stream -> end of the audio it has labels for
        self._finals: set[str] = set()

    def classify(self, seg: dict) -> tuple[bool, bool]:
        """(labels audio not labelled before, is the first final record of its turn)."""
        if seg["revision"] > 0:  # the end-of-stream revision re-states old audio on purpose
            return False, False
        stream = seg["stream_id"]
        first = seg["end_s"] > self._labelled_to.get(stream, -1.0) + 1e-6
        if first:
            self._labelled_to[stream] = seg["end_s"]
        # Identity corrections re-send a final turn: only its first final record counts.
        final = seg["is_final"] and seg["segment_id"] not in self._finals
        if final:
            self._finals.add(seg["segment_id"])
        return first, final


def _proc_samples(processes: list[subprocess.Popen]) -> tuple[float, float]:
    """(cpu seconds, rss MB) of the worker processes together."""
    cpu, rss = zip(*(_proc_sample(w.pid) for w in processes), strict=True)
    return sum(cpu), sum(rss)


def _proc_sample(pid: int) -> tuple[float, float]:
    """(cpu seconds so far, rss MB) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    return cpu, rss


def _committed(reader: TopicReader, topic: str, partitions: int) -> int:
    offsets = reader.committed([(topic, p) for p in range(partitions)], timeout_s=5)
    return sum(max(tp.offset, 0) for tp in offsets)


def run_loadtest(
    settings: Settings, streams: int, minutes: float, log_dir: Path, workers: int = 1
) -> LoadResult:
    run_id = uuid.uuid4().hex[:6]
    settings = replace(settings, topic_prefix=f"load{run_id}", group_prefix=f"load{run_id}")
    create_topics(settings)
    audios = conversations(Path(settings.shared_data_dir), streams, minutes * 60)
    processes = _start_workers(settings, log_dir, f"{streams}", workers)
    try:
        probe = LatencyProbe(settings, f"load-{run_id}-")
        probe.start()
        # A probe still joining its group would get the first seconds' records late, all at once.
        if not probe.assigned.wait(60):
            raise RuntimeError("the latency probe got no partitions in 60 s")
        player = Player(settings, audios, run_id)
        lag_reader = TopicReader(settings, settings.group("diarize"))
        samples = []
        cpu0, _ = _proc_samples(processes)
        t0 = probe.started = time.monotonic()  # one time axis for latencies and CPU
        player.start()
        while player.is_alive() or time.monotonic() - t0 < minutes * 60 + 5:
            time.sleep(1.0)
            if any(w.poll() is not None for w in processes):
                raise RuntimeError(f"a worker died; see the worker logs in {log_dir}")
            cpu, rss = _proc_samples(processes)
            lag = sum(player.sent_by_stream) - _committed(
                lag_reader, settings.topic(AUDIO), settings.partitions
            )
            samples.append((time.monotonic() - t0, cpu, rss, lag))
        probe.stopping.set()
        probe.join(timeout=10)
        lag_reader.close()
    finally:
        for w in processes:
            w.terminate()
        for w in processes:
            w.wait(timeout=30)
    result = _summarise(streams, minutes, probe, samples, cpu0, _dead_letters(settings))
    result.workers = workers
    result.diarizer, result.model_id = worker_modes(log_dir, f"{streams}", settings)
    return result


def worker_modes(log_dir: Path, tag: str, settings: Settings) -> tuple[str, str]:
    """(diarizer mode, embedding model id) as the worker processes of one run announced them at start,
    refusing a run whose workers disagree with each other or with `settings`."""
    modes = set()
    for log_path in sorted(log_dir.glob(f"worker-{tag}-*.log")):
        ready = re.search(r"worker ready: .*", log_path.read_text())
        fields = dict(re.findall(r"(\w+)=(\S+)", ready.group(0))) if ready else {}
        modes.add((fields.get("diarizer", "?"), fields.get("model", "?")))
    if len(modes) != 1 or next(iter(modes))[0] != settings.diarizer:
        raise RuntimeError(f"workers in {log_dir} run {sorted(modes)}, not diarizer {settings.diarizer}")
    return next(iter(modes))


def measured(settings: Settings, results: list[LoadResult] | None = None) -> str:
    """What a run measures: the settings the worker processes get (`Settings.child_env`) and, once they
    ran, the diarizer mode and model id they announced."""
    ran = sorted({(r.diarizer, r.model_id) for r in results or []})
    what = "; ".join(f"diarizer {d}, model {m}" for d, m in ran) or (
        f"diarizer {settings.diarizer}, embedder {settings.embedder}"
    )
    threads = settings.torch_threads
    return f"{what}, SPEAKERFLOW_LATENCY_S {settings.latency_s:g}, torch threads {threads}/worker"


def _summarise(streams, minutes, probe: LatencyProbe, samples, cpu0, dead) -> LoadResult:
    timeline = probe.timeline
    latencies = np.array([lat for _, lat in timeline]) if timeline else np.zeros(1)
    finals = np.array([lat for _, lat in probe.final_timeline]) if probe.final_timeline else np.zeros(1)
    elapsed = samples[-1][0] if samples else 1.0
    cpu_pct = 100 * (samples[-1][1] - cpu0) / elapsed if samples else 0.0
    cpu_series = [
        (t, 100 * (c - pc) / max(t - pt, 1e-6), r, lag)
        for (t, c, r, lag), (pt, pc, _, _) in zip(samples[1:], samples[:-1], strict=False)
    ]
    return LoadResult(
        streams,
        minutes,
        len(timeline),
        *(float(np.percentile(latencies, q)) for q in (50, 95, 99)),
        *(float(np.percentile(finals, q)) for q in (50, 95)),
        max((s[3] for s in samples), default=0),
        samples[-1][3] if samples else 0,
        round(cpu_pct, 1),
        round(max((s[2] for s in samples), default=0.0), 1),
        dead,
        timeline,
        probe.final_timeline,
        cpu_series,
    )


def _dead_letters(settings: Settings) -> int:
    consumer = group_consumer(settings, f"loadtest-dlq-{uuid.uuid4().hex[:8]}", [settings.topic(DEADLETTER)])
    count, quiet_since = 0, time.monotonic()
    while time.monotonic() - quiet_since < 3:
        msgs = [m for m in consume_available(consumer, 500, 0.2) if m.error() is None]
        count += len(msgs)
        if msgs:
            quiet_since = time.monotonic()
    consumer.close()
    return count


def _start_workers(settings: Settings, log_dir: Path, tag: str, count: int) -> list[subprocess.Popen]:
    """`count` worker processes in one consumer group (they share the partitions), once all are ready."""
    log_dir.mkdir(parents=True, exist_ok=True)
    started = []
    for i in range(count):
        log_path = log_dir / f"worker-{tag}-{i}.log"
        log = open(log_path, "w")  # noqa: SIM115 - handed to the child
        process = subprocess.Popen(
            [sys.executable, "-m", "speakerflow.streams.cli", "worker", "--roles", "diarize,match"],
            env=settings.child_env(),
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        started.append((process, log_path))
    deadline = time.monotonic() + 180
    for process, log_path in started:
        while "worker ready" not in log_path.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                for p, _ in started:
                    p.kill()
                raise RuntimeError(f"worker did not start; see {log_path}")
            time.sleep(0.2)
    return [p for p, _ in started]


def plot(results: list[LoadResult], path: Path, subtitle: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_first, ax_final, ax_cpu) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    for r in results:
        for ax, series, p95 in (
            (ax_first, r.timeline, r.latency_p95_s),
            (ax_final, r.final_timeline, r.final_p95_s),
        ):
            if series:
                t, lat = zip(*series, strict=True)
                ax.plot(t, lat, ".", ms=2, alpha=0.4, label=f"{r.streams} streams (p95 {p95:.2f} s)")
        if r.samples:
            ax_cpu.plot([s[0] for s in r.samples], [s[1] for s in r.samples], label=f"{r.streams} streams")
    ax_first.axhline(2.0, color="red", lw=1, ls="--", label="2 s target")
    ax_first.set_ylabel("first label (s)")
    ax_final.set_ylabel("final turn (s)")
    for ax in (ax_first, ax_final):
        ax.set_yscale("log")
        ax.legend(loc="upper left", fontsize=8)
    ax_cpu.set_ylabel("worker CPU (%; 200 = 2 cores)")
    ax_cpu.set_xlabel("time since start (s)")
    ax_cpu.legend(loc="upper left", fontsize=8)
    title = "speakerflow loadtest: audio captured -> identified segment, live streams at real-time pace"
    fig.suptitle(f"{title}\n{subtitle}" if subtitle else title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(results: list[LoadResult]) -> str:
    rows = [
        "| streams | workers | minutes | first labels | first label p50 / p95 / p99 (s) | "
        "final turn p50 / p95 (s) | max lag (chunks) | worker CPU | worker RSS (MB) | dead letters |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r.streams} | {r.workers} | {r.minutes:g} | {r.segments} | "
            f"{r.latency_p50_s:.2f} / {r.latency_p95_s:.2f} / {r.latency_p99_s:.2f} | "
            f"{r.final_p50_s:.2f} / {r.final_p95_s:.2f} | {r.max_lag_chunks} | "
            f"{r.worker_cpu_percent:.0f} % | {r.worker_rss_mb:.0f} | {r.dead_letters} |"
        )
    return "\n".join(rows)


def run_sweep(
    settings: Settings, counts: list[int], minutes: float, out_dir: Path, workers: int = 1
) -> list[LoadResult]:
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    print(f"loadtest measures: {measured(settings)}", flush=True)
    with broker_for_run(settings, out_dir) as settings:
        for n in counts:
            print(f"loadtest: {n} streams x {minutes:g} min, {workers} worker process(es) ...", flush=True)
            result = run_loadtest(settings, n, minutes, out_dir, workers)
            results.append(result)
            print(format_table([result]).splitlines()[-1], flush=True)
    plot(results, out_dir / "loadtest.png", measured(settings, results))
    series = ("timeline", "final_timeline", "samples")
    summary = [{k: v for k, v in asdict(r).items() if k not in series} for r in results]
    (out_dir / "loadtest.json").write_text(json.dumps(summary, indent=2))
    return results
