"""The evaluation and verification commands, run in-process on a few real utterances with GE2E."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from speakerflow.processors.scoring import load_calibration
from speakerflow.streams.cli import main

# Short files, so that decoding and VAD stay fast: two speakers with several utterances, two speakers
# with one (split in halves), and two sub-second FSDD digits.
TINY = [
    "librispeech/test-other/1688/1688-142285-0002.flac",
    "librispeech/test-other/1688/1688-142285-0009.flac",
    "librispeech/test-other/1998/1998-15444-0007.flac",
    "librispeech/test-other/1998/1998-15444-0008.flac",
    "librispeech/train-clean-100/19/19-198-0000.flac",
    "librispeech/train-clean-100/328/328-129766-0000.flac",
    "fsdd/jackson/0_jackson_0.flac",
    "fsdd/jackson/1_jackson_0.flac",
]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The commands set torch's thread count process-wide (SPEAKERFLOW_TORCH_THREADS); give the rest of
    the session its own count back. One thread: GE2E and VAD run several times faster than with two
    when other processes compete for the two cores."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_manifest(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> Path:
    """A manifest folder of a few ../shared/data files (symlinked, same layout and rows)."""
    monkeypatch.setenv("SPEAKERFLOW_TORCH_THREADS", "1")
    monkeypatch.setenv("SPEAKERFLOW_DATA_DIR", str(tmp_path / "data"))  # no calibration of the user's
    monkeypatch.setenv("SPEAKERFLOW_EMBEDDER", "ge2e")
    monkeypatch.setenv("SPEAKERFLOW_DEVICE", "cpu")
    monkeypatch.delenv("SPEAKERFLOW_CALIBRATION_DIR", raising=False)
    monkeypatch.delenv("SPEAKERFLOW_MATCH_THRESHOLD", raising=False)
    folder = tmp_path / "corpus"
    with (shared_data / "manifest.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        rows = [row for row in reader if row["path"] in TINY]
        fields = reader.fieldnames
    assert len(rows) == len(TINY)
    for row in rows:
        target = folder / row["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(shared_data / row["path"])
    with (folder / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return folder


def test_eval_verify_writes_summary_and_det(tiny_manifest: Path, tmp_path: Path, capsys) -> None:
    out, plots = tmp_path / "verify.json", tmp_path / "plots"
    argv = ["eval", "verify", "--manifest", str(tiny_manifest), "--crop", "full,2", "--asnorm", "3"]
    assert main([*argv, "--json", str(out), "--plot", str(plots)]) == 0
    printed = capsys.readouterr().out
    assert "EER" in printed and "fsdd" in printed

    summary = json.loads(out.read_text())
    # 8 files -> 10 items (two single-utterance speakers split in halves) -> 45 trials, of which
    # target: 1688 (1), 1998 (1), the two halves of 19 and of 328 (2), the two digits (1).
    assert summary["corpus"]["items"] == 10
    assert summary["trials"] == {"target": 5, "nontarget": 40}
    assert set(summary["conditions"]) == {"full", "full+asnorm", "2s", "2s+asnorm"}
    for name, entry in summary["conditions"].items():
        assert 0.0 <= entry["eer"] <= 1.0, name
        assert 0.0 <= entry["min_dcf"] <= 1.0, name
        assert set(entry["by_source"]) == {"fsdd", "librispeech"}
        # Both items of LibriSpeech: 8 items, 28 pairs, 4 of them same-speaker.
        assert entry["by_source"]["librispeech"]["within_source"]["trials"] == {"target": 4, "nontarget": 24}
    full = summary["conditions"]["full"]
    assert full["at_threshold"]["threshold"] == summary["threshold"]["value"]
    assert 0.0 <= full["at_threshold"]["far"] <= 1.0 and 0.0 <= full["at_threshold"]["frr"] <= 1.0
    assert summary["model_id"].startswith("ge2e-")
    for png in summary["plots"]:
        assert Path(png).read_bytes()[:4] == b"\x89PNG"


def test_eval_identify_and_calibrate(tiny_manifest: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "identify.json"
    assert main(["eval", "identify", "--manifest", str(tiny_manifest), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["speakers"] == 5 and report["probes"] == 5
    assert 0.0 <= report["closed_set"]["top1"] <= report["closed_set"]["top5"] <= 1.0
    configured = report["open_set"]["configured"]
    assert 0.0 <= configured["false_accept"] <= 1.0 and 0.0 <= configured["false_reject"] <= 1.0
    assert configured["threshold"] == report["threshold"]["value"]
    assert set(report["cross_fitted"]) <= {"eer", "far1", "far0.1", "far0.01", "open1"}

    assert main(["calibrate", "--manifest", str(tiny_manifest)]) == 0
    printed = capsys.readouterr().out
    assert "far0.01" in printed and "<- SPEAKERFLOW_OPERATING_POINT" in printed
    record = load_calibration(tmp_path / "data" / "calibration", report["model_id"])
    assert record is not None and record["trials"] == {"target": 5, "nontarget": 40}
    assert set(record["thresholds"]) == {"eer", "far1", "far0.1", "far0.01", "open1"}
    # open1: fitted on 1:N identification, each of the 5 speakers left out in turn; 1 % of 5 unknown
    # probes rounds down to none, so none passes at the fitted threshold.
    assert record["identification"] == {"speakers": 5, "probes": 5}
    assert record["rates"]["open1"]["false_accept"] == 0.0 and "1:N" in printed


ENROLL = [
    "librispeech/test-other/1688/1688-142285-0003.flac",
    "librispeech/test-other/1688/1688-142285-0004.flac",
]


def verify_argv(shared_data: Path, test: str) -> list[str]:
    return ["verify", "--enroll", *[str(shared_data / f) for f in ENROLL], "--test", str(shared_data / test)]


def test_verify_accepts_the_same_speaker(tiny_manifest: Path, shared_data: Path, capsys) -> None:
    assert main(verify_argv(shared_data, "librispeech/test-other/1688/1688-142285-0005.flac")) == 0
    printed = capsys.readouterr().out
    fields = dict(line.split(":", 1) for line in printed.splitlines() if ":" in line)
    assert fields["decision"].split()[0] == "ACCEPT"
    score, threshold = float(fields["score"].split()[0]), float(fields["threshold"].split()[0])
    assert score >= threshold and float(fields["confidence"]) > 0.5
    assert "family default" in fields["threshold"]  # no calibration file in this data dir


def test_verify_rejects_another_speaker(tiny_manifest: Path, shared_data: Path, capsys) -> None:
    argv = verify_argv(shared_data, "librispeech/test-other/1998/1998-15444-0007.flac")
    assert main([*argv, "--json"]) == 1  # exit status 1: rejected
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["decision"] == "reject"
    assert result["score"] < result["threshold"] and result["confidence"] < 0.5
    assert result["model_id"].startswith("ge2e-")


def test_verify_reports_bad_audio(tiny_manifest: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "not-audio.wav"
    bad.write_bytes(b"this is not audio")
    assert main(["verify", "--enroll", str(bad), "--test", str(bad)]) == 2
    assert "cannot be decoded" in capsys.readouterr().err


def test_verify_needs_its_arguments(tiny_manifest: Path, capsys) -> None:
    assert main(["verify", "--enroll", "a.wav"]) == 2
    assert main(["verify", "--speaker", "alice"]) == 2  # no FILE
    assert "exactly one audio FILE" in capsys.readouterr().err


def test_a_missing_manifest_is_one_line_not_a_traceback(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "sim_clean"
    assert main(["bench", "diarize", "--manifest", str(missing), "--minutes", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0] and "manifest.csv" in err[0]
