"""`speakerflow speakers ...` and `speakerflow gallery export|import` against a real broker and worker."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from speakerflow.evaluation.corpus import by_speaker, load_manifest
from speakerflow.gallery.portability import read_voiceprints, write_voiceprints
from speakerflow.gallery.voiceprint import Voiceprint
from speakerflow.streams.cli import main
from speakerflow.streams.client import await_result, publish_enrollment
from speakerflow.streams.runtime import Publisher
from speakerflow.streams.topology import ENROLLMENT_RESULTS
from speakerflow.streams.worker import Worker

pytestmark = pytest.mark.integration

SPEAKER, OTHER = "ls-3080", "ls-1688"


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def _eventually(check, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_speakers_and_gallery_commands(settings, ge2e, shared_data, monkeypatch, capsys, tmp_path):
    for name, value in {
        "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "SPEAKERFLOW_BROKER_PROFILE": "embedded",
        "SPEAKERFLOW_TOPIC_PREFIX": settings.topic_prefix,
        "SPEAKERFLOW_GROUP_PREFIX": settings.group_prefix,
        "SPEAKERFLOW_PARTITIONS": str(settings.partitions),
        "SPEAKERFLOW_EMBEDDER": "ge2e",
        "SPEAKERFLOW_LOG_LEVEL": "WARNING",
    }.items():
        monkeypatch.setenv(name, value)
    groups = by_speaker(load_manifest(shared_data), prefix="librispeech/test-other")
    worker = Worker(settings, roles=("enroll", "verify"), embedder=ge2e)
    worker.start()
    try:
        request_id = publish_enrollment(
            Publisher(settings), SPEAKER, "Speaker 3080", [u.path for u in groups[SPEAKER][:3]]
        )
        result = await_result(settings, ENROLLMENT_RESULTS, request_id, 60)
        assert result["accepted"], result["reason"]
        _eventually(lambda: SPEAKER in worker.gallery, 30)

        code, out = _cli(capsys, "speakers", "list", "--json")
        listed = [json.loads(line) for line in out.splitlines()]
        assert code == 0 and [s["speaker_id"] for s in listed] == [SPEAKER]
        assert listed[0]["model_id"] == ge2e.model_id and listed[0]["speech_seconds"] >= 10
        code, out = _cli(capsys, "speakers", "show", SPEAKER)
        assert code == 0 and "Speaker 3080" in out
        assert _cli(capsys, "speakers", "show", "nobody")[0] == 1

        # 1:1 verification: the speaker's own held-out speech is accepted, someone else's rejected.
        code, out = _cli(capsys, "verify", "--speaker", SPEAKER, str(groups[SPEAKER][7].path))
        assert code == 0 and "ACCEPT" in out and ge2e.model_id in out, out
        code, out = _cli(capsys, "verify", "--speaker", SPEAKER, str(groups[OTHER][0].path), "--json")
        verdict = json.loads(out.splitlines()[0])
        assert code == 1 and not verdict["accepted"] and verdict["score"] < verdict["threshold"]
        assert _cli(capsys, "verify", "--speaker", "nobody", str(groups[OTHER][0].path))[0] == 2

        # Export, delete, import back: the speaker is recognised again from the imported vector.
        exported = tmp_path / "gallery.npz"
        assert _cli(capsys, "gallery", "export", "--out", str(tmp_path / "gallery.jsonl"))[0] == 0
        assert _cli(capsys, "gallery", "export", "--out", str(exported))[0] == 0
        [saved] = read_voiceprints(exported)
        np.testing.assert_array_equal(saved.embedding, worker.gallery.get(SPEAKER).embedding)
        assert [v.speaker_id for v in read_voiceprints(tmp_path / "gallery.jsonl")] == [SPEAKER]

        code, out = _cli(capsys, "speakers", "delete", SPEAKER)
        assert code == 0 and "deleted" in out
        _eventually(lambda: SPEAKER not in worker.gallery, 10)
        assert _cli(capsys, "speakers", "list", "--json")[1] == ""
        assert _cli(capsys, "speakers", "delete", SPEAKER)[0] == 1  # no longer enrolled

        mixed = tmp_path / "mixed.jsonl"
        stranger = Voiceprint("x", "X", "ecapa-other", np.ones(192, np.float32) / np.sqrt(192), 1, 10.0, 0)
        write_voiceprints(mixed, [saved, stranger])
        assert _cli(capsys, "gallery", "import", str(mixed))[0] == 2  # refuses to mix models
        assert _cli(capsys, "gallery", "import", str(exported))[0] == 0
        _eventually(lambda: SPEAKER in worker.gallery, 10)
        code, out = _cli(capsys, "verify", "--speaker", SPEAKER, str(groups[SPEAKER][7].path))
        assert code == 0 and "ACCEPT" in out
    finally:
        worker.stop()
