"""Voiceprint files: JSON lines and .npz round trips, validation, model ids kept per vector."""

from __future__ import annotations

import json

import numpy as np
import pytest

from speakerflow.gallery.portability import (
    VoiceprintFileError,
    from_json,
    model_counts,
    read_voiceprints,
    to_json,
    write_voiceprints,
)
from speakerflow.gallery.voiceprint import Voiceprint


def _voiceprints(n: int = 3, dim: int = 8, model: str = "ge2e-x") -> list[Voiceprint]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        v = rng.standard_normal(dim).astype(np.float32)
        out.append(
            Voiceprint(
                f"s{i}", f"Speaker {i} é", model, v / np.linalg.norm(v), i + 1, 12.5 + i, 1000 + i, {"k": "v"}
            )
        )
    return out


@pytest.mark.parametrize("suffix", ["jsonl", "npz"])
def test_round_trip_keeps_every_field(tmp_path, suffix):
    originals = _voiceprints()
    path = tmp_path / f"gallery.{suffix}"
    assert write_voiceprints(path, originals) == 3
    back = read_voiceprints(path)
    assert [v.speaker_id for v in back] == ["s0", "s1", "s2"]
    for a, b in zip(originals, back, strict=True):
        assert (a.name, a.model_id, a.sample_count, a.speech_seconds, a.updated_at_ms, a.metadata) == (
            b.name,
            b.model_id,
            b.sample_count,
            b.speech_seconds,
            b.updated_at_ms,
            b.metadata,
        )
        np.testing.assert_array_equal(a.embedding, b.embedding)  # float32 bit-exact


def test_json_line_format_is_base64_float32_with_model_id():
    vp = _voiceprints(1)[0]
    record = to_json(vp)
    assert record["model_id"] == "ge2e-x" and record["dim"] == 8
    import base64

    raw = base64.b64decode(record["embedding_b64"])
    assert len(raw) == 8 * 4
    np.testing.assert_array_equal(np.frombuffer(raw, "<f4"), vp.embedding)
    json.dumps(record)  # plain JSON


def test_imports_are_validated_and_normalised(tmp_path):
    good = to_json(_voiceprints(1)[0])
    scaled = dict(
        good,
        embedding_b64=to_json(Voiceprint("a", "A", "m", np.full(8, 3.0, np.float32), 1, 1.0, 0))[
            "embedding_b64"
        ],
    )
    assert np.linalg.norm(from_json(scaled).embedding) == pytest.approx(1.0)
    with pytest.raises(VoiceprintFileError, match="dim says 9"):
        from_json(dict(good, dim=9))
    with pytest.raises(VoiceprintFileError, match="model_id"):
        from_json(dict(good, model_id=""))
    with pytest.raises(VoiceprintFileError, match="finite"):
        from_json(
            dict(
                good,
                embedding_b64=to_json(Voiceprint("a", "A", "m", np.zeros(8, np.float32), 1, 1.0, 0))[
                    "embedding_b64"
                ],
            )
        )
    with pytest.raises(VoiceprintFileError, match="KeyError"):
        from_json({"speaker_id": "x"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(VoiceprintFileError, match=r"bad\.jsonl:2"):
        read_voiceprints(bad)


def test_mixed_models_keep_their_ids_and_npz_needs_one_dimension(tmp_path):
    mixed = _voiceprints(2, 8, "ge2e-x") + _voiceprints(2, 8, "ecapa-y")
    path = tmp_path / "mixed.jsonl"
    write_voiceprints(path, mixed)
    assert model_counts(read_voiceprints(path)) == {"ge2e-x": 2, "ecapa-y": 2}
    with pytest.raises(VoiceprintFileError, match="one dimension"):
        write_voiceprints(tmp_path / "x.npz", _voiceprints(1, 8) + _voiceprints(1, 16))
    with pytest.raises(VoiceprintFileError, match="unknown format"):
        write_voiceprints(tmp_path / "x.csv", mixed, "csv")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(VoiceprintFileError, match="not a speakerflow"):
        read_voiceprints(tmp_path / "junk.npz")
