"""`speakerflow` subcommands of the gallery: speakers, gallery export/import, bench, eval.

- `speakers list | show ID | delete ID | verify ID FILE`
- `gallery export --out FILE [--format jsonl|npz] [--model ID]`, `gallery import FILE [--force]`
- `bench gallery | enroll | verify`, `eval gallery`
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

from speakerflow.streams.topology import (
    ENROLLMENT_REQUESTS,
    ENROLLMENT_RESULTS,
    GALLERY,
    VERIFICATION_REQUESTS,
    VERIFICATION_RESULTS,
)


def subcommand_group(
    sub: argparse._SubParsersAction, name: str, help_text: str
) -> argparse._SubParsersAction:
    """The sub-command action of the group `name` (e.g. `bench`), created if no module made it yet.

    Groups such as `bench` and `eval` are shared by several `cli_<area>.py` modules; each must get the
    group through this function, because argparse refuses a second parser with the same name.
    """
    parser = sub.choices.get(name)
    if parser is None:
        parser = sub.add_parser(name, help=help_text)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return parser.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")


def _settings():
    from speakerflow.streams.settings import Settings

    return Settings.from_env()


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


# -- speakers ---------------------------------------------------------------------------------------
def cmd_speakers_list(args: argparse.Namespace) -> int:
    from speakerflow.streams.client import read_gallery_snapshot

    speakers = sorted(read_gallery_snapshot(_settings(), args.timeout).values(), key=lambda v: v.speaker_id)
    if args.model:
        speakers = [v for v in speakers if v.model_id == args.model]
    if args.json:
        for vp in speakers:
            print(json.dumps(_summary(vp)))
        return 0
    print(f"{'speaker id':<24} {'name':<24} {'model':<28} {'samples':>7} {'speech s':>9}  updated (UTC)")
    for vp in speakers:
        print(
            f"{vp.speaker_id:<24} {vp.name:<24} {vp.model_id:<28} {vp.sample_count:>7} "
            f"{vp.speech_seconds:>9.1f}  {_when(vp.updated_at_ms)}"
        )
    print(f"{len(speakers)} speakers")
    return 0


def _summary(vp) -> dict:
    return {
        "speaker_id": vp.speaker_id,
        "name": vp.name,
        "model_id": vp.model_id,
        "dim": vp.dim,
        "sample_count": vp.sample_count,
        "speech_seconds": round(vp.speech_seconds, 2),
        "updated_at": _when(vp.updated_at_ms),
        "metadata": vp.metadata,
    }


def cmd_speakers_show(args: argparse.Namespace) -> int:
    from speakerflow.gallery.portability import to_json
    from speakerflow.streams.client import read_gallery_snapshot

    vp = read_gallery_snapshot(_settings(), args.timeout).get(args.speaker_id)
    if vp is None:
        print(f"speaker {args.speaker_id!r} is not enrolled", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(to_json(vp)))
        return 0
    for key, value in _summary(vp).items():
        print(f"{key:>15}: {value}")
    head = ", ".join(f"{x:.3f}" for x in vp.embedding[:6])
    print(f"{'embedding':>15}: [{head}, ...] ({vp.dim} float32, L2-normalised)")
    return 0


def cmd_speakers_delete(args: argparse.Namespace) -> int:
    from speakerflow.streams.client import await_result, publish_enrollment, read_gallery_snapshot
    from speakerflow.streams.runtime import Publisher

    settings = _settings()
    if not args.force and args.speaker_id not in read_gallery_snapshot(settings, args.timeout):
        print(f"speaker {args.speaker_id!r} is not enrolled (use --force to delete anyway)", file=sys.stderr)
        return 1
    request_id = publish_enrollment(Publisher(settings), args.speaker_id, "", [], mode="DELETE")
    print(f"deletion request {request_id} for {args.speaker_id} published")
    if args.wait <= 0:
        return 0
    result = await_result(settings, ENROLLMENT_RESULTS, request_id, args.wait)
    if not result["accepted"]:
        print(f"refused: {result['reason']}", file=sys.stderr)
        return 1
    print(
        f"deleted {args.speaker_id}: tombstone on the gallery topic; matchers drop it as they read it, "
        "the sink deletes its database row. No enrollment audio is stored anywhere."
    )
    return 0


def cmd_speakers_verify(args: argparse.Namespace) -> int:
    from speakerflow.streams.client import await_result, publish_verification
    from speakerflow.streams.runtime import Publisher

    settings = _settings()
    file = Path(args.file)
    if not file.is_file():
        print(f"error: {file} is not a file", file=sys.stderr)
        return 2
    request_id = publish_verification(Publisher(settings), args.speaker_id, file)
    result = await_result(settings, VERIFICATION_RESULTS, request_id, args.wait)
    if args.json:
        print(json.dumps(result))
    if result["error"]:
        print(f"error: {result['error']}", file=sys.stderr)
        return 2
    if not args.json:
        decision = "ACCEPT (same speaker)" if result["accepted"] else "REJECT (different speaker)"
        print(f"decision:   {decision}")
        print(f"score:      {result['score']:.4f} (cosine)")
        print(f"confidence: {result['confidence']:.4f}")
        print(f"threshold:  {result['threshold']:.4f}")
        print(f"model:      {result['model_id']}")
    return 0 if result["accepted"] else 1


# -- gallery export / import ------------------------------------------------------------------------
def cmd_gallery_export(args: argparse.Namespace) -> int:
    from speakerflow.gallery.portability import VoiceprintFileError, model_counts, write_voiceprints
    from speakerflow.streams.client import read_gallery_snapshot

    speakers = sorted(read_gallery_snapshot(_settings(), args.timeout).values(), key=lambda v: v.speaker_id)
    if args.model:
        speakers = [v for v in speakers if v.model_id == args.model]
    try:
        count = write_voiceprints(Path(args.out), speakers, args.format)
    except VoiceprintFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    models = ", ".join(f"{m} x{n}" for m, n in sorted(model_counts(speakers).items())) or "none"
    print(f"exported {count} voiceprints to {args.out} (models: {models})")
    return 0


def cmd_gallery_import(args: argparse.Namespace) -> int:
    from speakerflow.gallery.portability import VoiceprintFileError, model_counts, read_voiceprints
    from speakerflow.streams.client import publish_voiceprints
    from speakerflow.streams.runtime import Publisher

    settings = _settings()
    try:
        voiceprints = read_voiceprints(Path(args.file), args.format)
    except (VoiceprintFileError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    models = model_counts(voiceprints)
    if len(models) > 1 and not args.force:
        print(
            f"error: the file mixes models {dict(models)}; vectors of different models are never compared. "
            "Import one model at a time, or --force to import all (each keeps its model id).",
            file=sys.stderr,
        )
        return 2
    family = settings.embedder
    if models and not any(m.startswith(family) for m in models):
        print(
            f"warning: no voiceprint was made by the configured embedder ({family}); matchers of this "
            "deployment will ignore them until a worker runs their model",
            file=sys.stderr,
        )
    ids = [vp.speaker_id for vp in voiceprints]
    if len(set(ids)) != len(ids):
        print("warning: repeated speaker ids: the last of each wins", file=sys.stderr)
    if args.dry_run:
        print(f"{len(voiceprints)} voiceprints read, models {dict(models)}; nothing published (--dry-run)")
        return 0
    count = publish_voiceprints(Publisher(settings), voiceprints)
    print(f"imported {count} voiceprints to {settings.topic('gallery')} (models {dict(models)})")
    return 0


# -- benchmarks ---------------------------------------------------------------------------------------
def cmd_bench_gallery(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from tqdm import tqdm

    from speakerflow.evaluation.gallery_bench import bench_size

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
        _plot_gallery(report, Path(args.plot))
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


def _plot_gallery(report: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, rec) = plt.subplots(1, 2, figsize=(11, 4))
    kinds = sorted({r["kind"] for size in report for r in size["results"]})
    for kind in kinds:
        points = [(s["size"], r) for s in report for r in s["results"] if r["kind"] == kind]
        sizes = [p[0] for p in points]
        lat.plot(sizes, [p[1]["single"]["p99_ms"] for p in points], marker="o", label=f"{kind} p99")
        lat.plot(sizes, [p[1]["single"]["p50_ms"] for p in points], marker=".", ls="--", label=f"{kind} p50")
        if kind != "exact":
            rec.plot(sizes, [p[1]["recall_at_1"] for p in points], marker="o", label=kind)
    for ax in (lat, rec):
        ax.set_xscale("log")
        ax.set_xlabel("voiceprints in the gallery")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    lat.set_yscale("log")
    lat.set_ylabel("single-query latency (ms)")
    rec.set_ylabel("recall@1 vs exact")
    fig.suptitle("speakerflow bench gallery")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def cmd_bench_requests(args: argparse.Namespace) -> int:
    report = run_request_bench(args.kind, args.requests, args.speech_s, args.warmup)
    print(_request_report_text(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


def _recording_with_speech(audio, speech_s: float):
    """The shortest start of `audio` holding `speech_s` seconds of VAD speech (plus a margin, so the
    enrollment gate, which runs the same VAD, sees at least that much), or None if it has less."""
    from speakerflow.processors.vad import speech_regions

    needed, total = speech_s + 0.3, 0.0
    for start, end in speech_regions(audio, 16000):
        if total + (end - start) >= needed:
            return audio[: int((start + needed - total) * 16000) + 1600]
        total += end - start
    return None


def _bench_samples(settings, speech_s: float, count: int) -> tuple[list, list[str]]:
    """(audio, speaker) samples from the shared data, each holding `speech_s` seconds of speech."""
    from speakerflow.evaluation.corpus import by_speaker, load_audio, load_manifest

    groups = by_speaker(load_manifest(settings.shared_data_dir), prefix="librispeech/test-other")
    samples, speakers = [], []
    utterances = [(s, u) for s, us in sorted(groups.items()) for u in us]
    for speaker, utterance in utterances:
        crop = _recording_with_speech(load_audio(utterance), speech_s)
        if crop is not None:
            samples.append(crop)
            speakers.append(speaker)
        if len(samples) >= count:
            break
    if not samples:
        raise RuntimeError(f"no utterance in {settings.shared_data_dir} holds {speech_s} s of speech")
    return samples, speakers


class _Arrivals:
    """Records when each key first shows up on some topics (a reader thread of its own)."""

    def __init__(self, settings, topics: list[str]) -> None:
        import threading

        from confluent_kafka import OFFSET_BEGINNING

        from speakerflow.streams.runtime import TopicReader

        # Assigned, not subscribed: readers of one process share a group id and would split partitions.
        self._reader = TopicReader(settings)
        self._reader.assign(
            [(t, p, OFFSET_BEGINNING) for t in topics for p in self._reader.partitions(t) or []]
        )
        self.seen: dict[str, tuple[float, bytes | None]] = {}
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import time

        while not self._stop.is_set():
            for msg in self._reader.poll(100, 0.05):
                now = time.perf_counter()
                key = (msg.key() or b"").decode()
                with self._lock:
                    self.seen.setdefault(key, (now, msg.value()))
                    event = self._events.get(key)
                if event is not None:
                    event.set()
        self._reader.close()

    def wait(self, key: str, timeout_s: float) -> tuple[float, bytes | None]:
        import threading

        with self._lock:
            if key in self.seen:
                return self.seen[key]
            event = self._events.setdefault(key, threading.Event())
        if not event.wait(timeout_s):
            raise TimeoutError(f"no record for {key!r} within {timeout_s} s")
        return self.seen[key]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def run_request_bench(kind: str, requests: int, speech_s: float, warmup: int) -> dict:
    """Latency of enrollment or verification requests through an embedded broker and an in-process
    worker (roles enroll and verify, no database): publish one request, wait for its output, repeat."""
    import tempfile

    from speakerflow.processors.embedding import load_embedder
    from speakerflow.streams.broker import start_embedded_broker
    from speakerflow.streams.worker import Worker

    base = _settings()
    tmp = Path(tempfile.mkdtemp(prefix="speakerflow-bench-"))
    broker = start_embedded_broker(log_path=tmp / "broker.log")
    settings = broker.run_settings(
        tmp,
        shared_data_dir=base.shared_data_dir,
        embedder=base.embedder,
        device=base.device,
        torch_threads=base.torch_threads,
    )
    embedder = load_embedder(settings.embedder, settings.device, settings.embedding_model_path)
    worker = Worker(settings, roles=("enroll", "verify"), embedder=embedder)
    try:
        worker.start()
        runner = _enroll_requests if kind == "enroll" else _verify_requests
        latencies, worker_ms, extra = runner(settings, worker, requests + warmup, speech_s)
    finally:
        worker.stop()
        broker.stop()
    import numpy as np

    measured = np.asarray(latencies[warmup:]) * 1000
    served = np.asarray(worker_ms[warmup:], float)
    return {
        "kind": kind,
        "requests": len(measured),
        "speech_s": speech_s,
        "model_id": embedder.model_id,
        "latency_ms": {
            "p50": round(float(np.percentile(measured, 50)), 1),
            "p95": round(float(np.percentile(measured, 95)), 1),
            "p99": round(float(np.percentile(measured, 99)), 1),
            "max": round(float(measured.max()), 1),
            "mean": round(float(measured.mean()), 1),
        },
        "worker_ms_mean": round(float(served.mean()), 1),  # request timestamp -> processed timestamp
        **extra,
    }


def _enroll_requests(settings, worker, count: int, speech_s: float) -> tuple[list, list, dict]:
    """Each request enrolls a new speaker; latency = publish -> its voiceprint on the gallery topic."""
    import time

    from speakerflow.schemas import codec
    from speakerflow.streams.records import enrollment_request, pcm_sample
    from speakerflow.streams.runtime import Publisher

    samples, speakers = _bench_samples(settings, speech_s, count)
    arrivals = _Arrivals(settings, [settings.topic(GALLERY)])
    results = _Arrivals(settings, [settings.topic(ENROLLMENT_RESULTS)])
    publisher = Publisher(settings)
    latencies, worker_ms, durations, refused = [], [], [], []
    try:
        for i in range(count):
            audio = samples[i % len(samples)]
            speaker_id = f"bench-{i:04d}-{speakers[i % len(samples)]}"
            record = enrollment_request(speaker_id, speaker_id, "REPLACE", [pcm_sample(audio)], f"req-{i}")
            started = time.perf_counter()
            publisher.publish(settings.topic(ENROLLMENT_REQUESTS), speaker_id, "EnrollmentRequest", record)
            publisher.flush()
            result = codec.decode("EnrollmentResult", results.wait(speaker_id, 60)[1])
            if not result["accepted"]:
                refused.append(result["reason"])
                continue
            arrived, _ = arrivals.wait(speaker_id, 10)
            latencies.append(arrived - started)
            worker_ms.append(result["processed_at_ms"] - record["requested_at_ms"])
            durations.append(len(audio) / 16000)
    finally:
        arrivals.close()
        results.close()
    extra = {"recording_s_mean": round(sum(durations) / max(len(durations), 1), 2), "refused": refused}
    return latencies, worker_ms, extra


def _verify_requests(settings, worker, count: int, speech_s: float) -> tuple[list, list, dict]:
    """Verifications of crops of held-out speech against one enrolled speaker (and of others)."""
    import time

    from speakerflow.evaluation.corpus import by_speaker, load_audio, load_manifest
    from speakerflow.schemas import codec
    from speakerflow.streams.client import await_result, publish_enrollment
    from speakerflow.streams.records import pcm_sample, verification_request
    from speakerflow.streams.runtime import Publisher

    groups = by_speaker(load_manifest(settings.shared_data_dir), prefix="librispeech/test-other")
    target = sorted(groups)[0]
    publisher = Publisher(settings)
    request_id = publish_enrollment(publisher, target, target, [u.path for u in groups[target][:4]])
    await_result(settings, ENROLLMENT_RESULTS, request_id, 60)
    deadline = time.monotonic() + 30
    while target not in worker.gallery and time.monotonic() < deadline:
        time.sleep(0.05)
    crops = [
        (speaker, load_audio(u)[: int(speech_s * 16000)])
        for speaker, utterances in sorted(groups.items())
        for u in (utterances[4:] if speaker == target else utterances[:2])
    ]
    arrivals = _Arrivals(settings, [settings.topic(VERIFICATION_RESULTS)])
    latencies, worker_ms, right = [], [], 0
    try:
        for i in range(count):
            speaker, audio = crops[i % len(crops)]
            record = verification_request(target, pcm_sample(audio), f"ver-{i}")
            started = time.perf_counter()
            publisher.publish(
                settings.topic(VERIFICATION_REQUESTS), record["request_id"], "VerificationRequest", record
            )
            publisher.flush()
            arrived, value = arrivals.wait(record["request_id"], 60)
            result = codec.decode("VerificationResult", value)
            latencies.append(arrived - started)
            worker_ms.append(result["processed_at_ms"] - record["requested_at_ms"])
            right += result["accepted"] == (speaker == target)
    finally:
        arrivals.close()
    return latencies, worker_ms, {"decisions_right": f"{right}/{count}", "target": target}


def _request_report_text(report: dict) -> str:
    lat = report["latency_ms"]
    what = "request -> voiceprint on the gallery topic" if report["kind"] == "enroll" else "request -> result"
    lines = [
        f"bench {report['kind']}: {report['requests']} sequential requests, {report['speech_s']} s of speech "
        f"each, model {report['model_id']}",
        f"  {what}: p50 {lat['p50']} ms, p95 {lat['p95']} ms, p99 {lat['p99']} ms, max {lat['max']} ms, "
        f"mean {lat['mean']} ms",
        f"  worker (request timestamp -> processed timestamp): mean {report['worker_ms_mean']} ms",
    ]
    lines += [
        f"  {k}: {v}" for k, v in report.items() if k in ("recording_s_mean", "refused", "decisions_right")
    ]
    return "\n".join(lines)


# -- evaluation ---------------------------------------------------------------------------------------
def cmd_eval_gallery(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from speakerflow.evaluation.gallery import DEFAULT_VARIANTS, EvalConfig, evaluate, pool_scores
    from speakerflow.processors.embedding import load_embedder
    from speakerflow.processors.scoring import default_calibration

    settings = _settings()
    # Small per-chunk model calls gain nothing from more intra-op threads and pay for waking them
    # (measured on a busy 2-core machine, 15 s of audio: 1.3 s on one thread, 18-60 s on two).
    torch.set_num_threads(args.threads or settings.torch_threads or 1)
    embedder = load_embedder(
        args.embedder or settings.embedder, settings.device, settings.embedding_model_path
    )
    calibration = default_calibration(embedder.model_id, args.threshold or settings.match_threshold)
    try:
        seeds = [int(part) for part in str(args.seed).split(",") if part.strip()]
    except ValueError:
        print(f"error: --seed wants integers separated by commas, got {args.seed!r}", file=sys.stderr)
        return 2
    reports = []
    for seed in seeds:
        config = EvalConfig(stranger_share=args.strangers, min_enroll_speech_s=args.min_enroll_s, seed=seed)
        bar = tqdm(desc=f"conversations (seed {seed})", unit="conv", file=sys.stderr)

        def on_conversation(done: int, total: int, bar=bar) -> None:
            bar.total = total
            bar.update(done - bar.n)

        report = evaluate(
            args.manifest,
            embedder,
            calibration,
            config,
            DEFAULT_VARIANTS,
            revision=not args.no_revision,
            progress=lambda msg: print(msg, file=sys.stderr),
            conversation_progress=on_conversation,
        )
        bar.close()
        print(f"\n== seed {seed}")
        _print_eval(report)
        reports.append(report)
    pooled = pool_scores(reports) if len(reports) > 1 else []
    if pooled:
        _print_pooled(seeds, pooled)
    if args.json:
        document = (
            reports[0].to_json()
            if len(reports) == 1
            else {"seeds": seeds, "reports": [r.to_json() for r in reports], "pooled": pooled}
        )
        Path(args.json).write_text(json.dumps(document, indent=2))
        print(f"wrote {args.json}")
    return 0


def _print_pooled(seeds: list[int], pooled: list[dict]) -> None:
    print(f"\n== pooled over seeds {', '.join(map(str, seeds))} (time-weighted)")
    print(
        f"{'matcher':<26} {'labels':<9} {'enrolled ok':>11} {'wrong name':>10} {'UNKNOWN':>8} "
        f"{'stranger UNK':>12}"
    )
    for p in pooled:
        print(
            f"{p['variant']:<26} {p['labelling']:<9} {p['enrolled_correct']:>11.2%} "
            f"{p['enrolled_wrong_name']:>10.2%} {p['enrolled_unknown']:>8.2%} {p['stranger_unknown']:>12.2%}"
        )


def _print_eval(report) -> None:
    print(
        f"\n{report.speakers} speakers: {report.enrolled} enrolled, {report.strangers} not enrolled; "
        f"{report.conversations} conversations, {report.audio_s / 60:.1f} min audio "
        f"({report.speech_s / 60:.1f} min speech); model {report.model_id}, threshold {report.threshold}"
    )
    refused = {s: r for s, r in report.not_enrolled.items() if r.startswith("enrollment refused")}
    for speaker, reason in refused.items():
        print(f"  {speaker}: {reason}")
    print(
        f"\n{'matcher':<26} {'labels':<9} {'enrolled ok':>11} {'wrong name':>10} {'UNKNOWN':>8} "
        f"{'stranger UNK':>12} {'segments ok':>11} {'enrolled segs ok':>16} {'first emit ok':>13} "
        f"{'relabels':>8}"
    )
    for s in report.scores:
        print(
            f"{s.variant:<26} {s.labelling:<9} {s.enrolled_correct:>11.2%} {s.enrolled_wrong_name:>10.2%} "
            f"{s.enrolled_unknown:>8.2%} {s.stranger_unknown:>12.2%} {s.segment_accuracy:>11.2%} "
            f"{s.enrolled_segment_accuracy:>16.2%} "
            f"{s.first_emission_enrolled_correct:>13.2%} {s.relabelled_segments:>8}"
        )
    print(f"compute: {report.seconds}")


# -- registration -------------------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the top-level parser."""
    _register_speakers(sub)
    _register_gallery(sub)
    _register_bench(subcommand_group(sub, "bench", "benchmarks (figures, not tests)"))
    _register_eval(subcommand_group(sub, "eval", "evaluations on a speech manifest"))


def _register_speakers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("speakers", help="list, show, delete or verify enrolled speakers")
    ssub = p.add_subparsers(dest="speakers_command", required=True, metavar="COMMAND")
    q = ssub.add_parser("list", help="every enrolled speaker (read from the gallery topic)")
    q.add_argument("--model", default="", help="only voiceprints of this model id")
    q.add_argument("--json", action="store_true", help="one JSON object per line")
    q.set_defaults(func=cmd_speakers_list)
    q = ssub.add_parser("show", help="one speaker's voiceprint")
    q.add_argument("speaker_id")
    q.add_argument("--json", action="store_true", help="the exported JSON form (base64 float32 vector)")
    q.set_defaults(func=cmd_speakers_show)
    q = ssub.add_parser("delete", help="delete a speaker everywhere (gallery, matchers, database)")
    q.add_argument("speaker_id")
    q.add_argument("--force", action="store_true", help="publish the deletion even if not enrolled")
    q.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the result (0: don't)")
    q.set_defaults(func=cmd_speakers_delete)
    q = ssub.add_parser("verify", help="1:1: does FILE sound like the enrolled speaker ID?")
    q.add_argument("speaker_id")
    q.add_argument("file")
    q.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the result")
    q.add_argument("--json", action="store_true", help="print the VerificationResult record")
    q.set_defaults(func=cmd_speakers_verify)
    for action in ssub.choices.values():
        action.add_argument("--timeout", type=float, default=30.0, help=argparse.SUPPRESS)


def _register_gallery(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gallery", help="export or import voiceprints (JSON lines or .npz)")
    gsub = p.add_subparsers(dest="gallery_command", required=True, metavar="COMMAND")
    q = gsub.add_parser("export", help="write every voiceprint (with its model id) to a file")
    q.add_argument("--out", required=True)
    q.add_argument("--format", choices=["jsonl", "npz"], default=None, help="default: by the file suffix")
    q.add_argument("--model", default="", help="only voiceprints of this model id")
    q.add_argument("--timeout", type=float, default=60.0, help="seconds to read the gallery topic")
    q.set_defaults(func=cmd_gallery_export)
    q = gsub.add_parser("import", help="publish voiceprints from a file to the gallery topic")
    q.add_argument("file")
    q.add_argument("--format", choices=["jsonl", "npz"], default=None, help="default: by the file suffix")
    q.add_argument("--force", action="store_true", help="import a file that mixes model ids")
    q.add_argument("--dry-run", action="store_true", help="read and check only")
    q.set_defaults(func=cmd_gallery_import)


def _register_bench(bsub: argparse._SubParsersAction) -> None:
    q = bsub.add_parser("gallery", help="gallery search: exact vs FAISS IVF, latency, memory, recall")
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
        q = bsub.add_parser(kind, help=f"latency of {what} (embedded broker + in-process worker)")
        q.add_argument("--requests", type=int, default=50)
        q.add_argument("--speech-s", type=float, default=speech_s, help="seconds of speech per sample")
        q.add_argument("--warmup", type=int, default=3)
        q.add_argument("--json", default="")
        q.set_defaults(func=cmd_bench_requests, kind=kind)


def _register_eval(esub: argparse._SubParsersAction) -> None:
    q = esub.add_parser("gallery", help="identification in simulated conversations (enrolled + strangers)")
    q.add_argument("--manifest", required=True, help="corpus folder (or its manifest.csv)")
    q.add_argument("--embedder", default="", help="default: SPEAKERFLOW_EMBEDDER")
    q.add_argument("--threshold", type=float, default=0.0, help="0: the model's default operating point")
    q.add_argument("--strangers", type=float, default=0.25, help="share of speakers never enrolled")
    q.add_argument("--min-enroll-s", type=float, default=4.0, help="enrollment speech gate for this eval")
    q.add_argument("--no-revision", action="store_true", help="skip the end-of-stream revision labelling")
    q.add_argument(
        "--threads", type=int, default=0, help="torch threads (default: SPEAKERFLOW_TORCH_THREADS or 1)"
    )
    q.add_argument(
        "--seed",
        default="0",
        help="speaker split seed; several (e.g. 1,2,3,4) run one evaluation each and add a pooled table",
    )
    q.add_argument("--json", default="")
    q.set_defaults(func=cmd_eval_gallery)
