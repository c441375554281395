"""Latency of enrollment and verification requests (`speakerflow bench enroll|verify`): an embedded
broker and an in-process worker (roles enroll and verify, no database); one request at a time is
published and its output awaited on the output topic by a reader thread of its own."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from speakerflow.streams.settings import Settings
from speakerflow.streams.topology import (
    ENROLLMENT_REQUESTS,
    ENROLLMENT_RESULTS,
    GALLERY,
    VERIFICATION_REQUESTS,
    VERIFICATION_RESULTS,
)


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


class Arrivals:
    """Records when each key first shows up on some topics (a reader thread of its own)."""

    def __init__(self, settings, topics: list[str]) -> None:
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

    base = Settings.from_env()
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
    from speakerflow.schemas import codec
    from speakerflow.streams.records import enrollment_request, pcm_sample
    from speakerflow.streams.runtime import Publisher

    samples, speakers = _bench_samples(settings, speech_s, count)
    arrivals = Arrivals(settings, [settings.topic(GALLERY)])
    results = Arrivals(settings, [settings.topic(ENROLLMENT_RESULTS)])
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
    arrivals = Arrivals(settings, [settings.topic(VERIFICATION_RESULTS)])
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


def report_text(report: dict) -> str:
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
