"""The matcher's decisions: threshold, accumulation, margin, exclusive assignment, re-labelling."""

from __future__ import annotations

import numpy as np
import pytest

from speakerflow.gallery.matcher import UNKNOWN, Gallery, Matcher
from speakerflow.gallery.voiceprint import Voiceprint
from speakerflow.processors.scoring import Calibration

DIM = 64
MODEL = "test-model"
THRESHOLD = 0.6


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


@pytest.fixture
def basis() -> np.ndarray:
    """Orthonormal directions: speakers are built from them so cosines are exact by construction."""
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((DIM, DIM)))
    return q.T.astype(np.float32)


def _at(target: np.ndarray, other: np.ndarray, cosine: float) -> np.ndarray:
    """A unit vector at `cosine` to `target`, leaning towards the orthogonal `other`."""
    return _unit(cosine * target + np.sqrt(1 - cosine**2) * other)


def _gallery(basis: np.ndarray, names: dict[str, int]) -> Gallery:
    gallery = Gallery(MODEL, DIM)
    for sid, row in names.items():
        gallery.upsert(Voiceprint(sid, sid.title(), MODEL, basis[row], 1, 20.0, 0))
    return gallery


def _matcher(gallery: Gallery, **options) -> Matcher:
    options.setdefault("margin", 0.0)  # margin tests set it; the others test one rule at a time
    options.setdefault("consistency", 0.05)
    return Matcher(gallery, Calibration(THRESHOLD), **options)


def test_gallery_ignores_other_models_and_deletes(basis):
    gallery = _gallery(basis, {"alice": 0})
    assert not gallery.upsert(Voiceprint("x", "X", "other-model", basis[1], 1, 10.0, 0))
    assert not gallery.upsert(Voiceprint("y", "Y", MODEL, np.ones(DIM + 1, np.float32), 1, 10.0, 0))
    assert len(gallery) == 1 and gallery.skipped_other_model == 2
    version = gallery.version
    assert gallery.delete("alice") and len(gallery) == 0 and gallery.version > version
    assert not gallery.delete("alice")


def _weak(basis: np.ndarray, own: int) -> np.ndarray:
    """Alice at cosine ~0.585 (< threshold): a shared off-axis part plus noise of its own (row `own`).
    Two of them are alike (cosine ~0.81), and pooling them averages the own noise away."""
    return _unit(0.6 * basis[0] + 0.7 * basis[5] + 0.45 * basis[own])


def test_threshold_and_accumulation_per_label(basis):
    gallery = _gallery(basis, {"alice": 0, "bob": 1})
    matcher = _matcher(gallery)
    first = matcher.observe("s", "s:0", "SPEAKER_00", _weak(basis, 10), 2, is_final=True)
    assert first[0].identification.speaker_id is None
    assert first[0].identification.name == UNKNOWN
    assert first[0].identification.candidates[0][0] == "alice"
    # More speech of the same label, alike but with noise of its own: the pooled evidence names her.
    second = matcher.observe("s", "s:1", "SPEAKER_00", _weak(basis, 11), 2)
    assert second[0].identification.speaker_id == "alice"
    assert second[0].identification.score > 0.6
    assert 0.5 < second[0].identification.confidence <= 1.0


def test_unlike_segments_of_one_label_are_not_pooled(basis):
    """Diarization put Bob's turn into Alice's label: Bob's turn is still Bob, Alice's still Alice."""
    gallery = _gallery(basis, {"alice": 0, "bob": 1})
    matcher = _matcher(gallery)
    alice = matcher.observe("s", "s:0", "SPEAKER_00", _at(basis[0], basis[5], 0.9), 30, is_final=True)
    bob = matcher.observe("s", "s:1", "SPEAKER_00", _at(basis[1], basis[6], 0.8), 3, is_final=True)
    assert alice[0].identification.speaker_id == "alice"
    assert bob[0].identification.speaker_id == "bob"
    assert not [e for e in bob if e.relabelled]


def test_provisional_updates_of_one_segment_do_not_count_twice(basis):
    gallery = _gallery(basis, {"alice": 0})
    matcher = _matcher(gallery)
    weak = _weak(basis, 10)
    for _ in range(5):  # the same growing segment, re-sent
        out = matcher.observe("s", "s:0", "SPEAKER_00", weak, 3)
    assert out[0].identification.speaker_id is None


def test_margin_rule_rejects_ambiguous_matches_unless_the_score_is_sure(basis):
    gallery = _gallery(basis, {"alice": 0, "bob": 1})
    between = _unit(0.63 * basis[0] + 0.62 * basis[1] + 0.47 * basis[9])  # 0.63 vs 0.62
    assert _matcher(gallery).identify(between).speaker_id == "alice"
    strict = _matcher(gallery, margin=0.05, sure_offset=0.07)
    ident = strict.identify(between)
    assert ident.speaker_id is None and ident.candidates[0][0] == "alice"
    assert strict.identify(basis[1]).speaker_id == "bob"
    # 0.72 vs 0.69: ambiguous by the margin, but above threshold + sure_offset (0.67): accepted.
    assert strict.identify(_unit(0.72 * basis[0] + 0.69 * basis[1])).speaker_id == "alice"
    assert (
        _matcher(gallery, margin=0.05, sure_offset=1.0)
        .identify(_unit(0.72 * basis[0] + 0.69 * basis[1]))
        .speaker_id
        is None
    )


def test_exclusive_assignment_gives_the_name_to_the_label_with_more_evidence(basis):
    gallery = _gallery(basis, {"alice": 0, "bob": 1})
    # Label A: lots of speech, clearly Alice. Label B: a little, close to Alice, a bit less to Bob.
    a = _at(basis[0], basis[7], 0.85)
    b = _unit(0.66 * basis[0] + 0.62 * basis[1] + 0.42 * basis[8])  # not like A: cos 0.56
    for exclusive, expected_b in ((False, "alice"), (True, "bob")):
        matcher = _matcher(gallery, exclusive=exclusive)
        matcher.observe("s", "s:0", "A", a, 20, is_final=True)
        out = matcher.observe("s", "s:1", "B", b, 2, is_final=True)
        assert out[0].identification.speaker_id == expected_b, exclusive
        assert matcher.identities("s")["A"].speaker_id == "alice"
    # With nobody else acceptable, the losing label is UNKNOWN rather than a second Alice.
    solo = _gallery(basis, {"alice": 0})
    matcher = _matcher(solo, exclusive=True)
    matcher.observe("s", "s:0", "A", a, 20, is_final=True)
    c = _unit(0.68 * basis[0] + 0.73 * basis[9])
    assert matcher.observe("s", "s:1", "C", c, 2)[0].identification.speaker_id is None
    # Other streams are independent: the same voice is Alice there too.
    assert matcher.observe("t", "t:0", "A", c, 2)[0].identification.speaker_id == "alice"


def test_labels_of_one_voice_share_the_identity_under_exclusivity(basis):
    gallery = _gallery(basis, {"alice": 0, "bob": 1})
    matcher = _matcher(gallery, exclusive=True)
    matcher.observe("s", "s:0", "A", _at(basis[0], basis[7], 0.9), 10, is_final=True)
    # Diarization split Alice into a second label: both labels' means are close to each other.
    out = matcher.observe("s", "s:1", "A2", _at(basis[0], basis[8], 0.9), 4, is_final=True)
    assert out[0].identification.speaker_id == "alice"
    assert matcher.identities("s")["A"].speaker_id == "alice"


def _early(basis: np.ndarray) -> np.ndarray:
    """Below threshold on its own (cosine 0.58 to Alice), but alike (0.83) to `_later`."""
    return _unit(0.58 * basis[0] + 0.6 * basis[5] + 0.55 * basis[10])


def _later(basis: np.ndarray) -> np.ndarray:
    return _unit(0.7 * basis[0] + 0.7 * basis[5])  # Alice at 0.71


def test_relabelling_reemits_earlier_segments_as_corrections_of_the_same_revision(basis):
    gallery = _gallery(basis, {"alice": 0, "bob": 1})
    matcher = _matcher(gallery, relabel=True, settle_windows=6)
    out = matcher.observe("s", "s:0", "A", _early(basis), 2, is_final=True, payload={"segment_id": "s:0"})
    assert [e.identification.speaker_id for e in out] == [None]
    # The label goes on talking, alike and clearly Alice; once settled, the first turn is re-emitted.
    out = matcher.observe("s", "s:1", "A", _later(basis), 8, is_final=False, payload={"segment_id": "s:1"})
    assert out[0].identification.speaker_id == "alice" and out[0].revision == 0
    relabelled = [e for e in out if e.relabelled]
    assert [e.payload["segment_id"] for e in relabelled] == ["s:0"]
    assert relabelled[0].revision == 0 and relabelled[0].identification.speaker_id == "alice"
    # Nothing changes, nothing is re-emitted.
    again = matcher.observe("s", "s:1", "A", _later(basis), 9, is_final=True, payload={"segment_id": "s:1"})
    assert [e.relabelled for e in again] == [False]
    # A deleted speaker's earlier segments are re-emitted as UNKNOWN (the name is gone everywhere).
    gallery.delete("alice")
    out = matcher.observe("s", "s:2", "A", basis[0], 4, is_final=True, payload={"segment_id": "s:2"})
    assert out[0].identification.speaker_id is None
    assert sorted((e.payload["segment_id"], e.revision) for e in out if e.relabelled) == [
        ("s:0", 0),
        ("s:1", 0),
    ]


def test_relabelling_waits_until_the_label_is_settled(basis):
    gallery = _gallery(basis, {"alice": 0})
    matcher = _matcher(gallery, relabel=True, settle_windows=20)
    matcher.observe("s", "s:0", "A", _early(basis), 2, is_final=True)
    out = matcher.observe("s", "s:1", "A", _later(basis), 8, is_final=True)
    assert out[0].identification.speaker_id == "alice"
    assert not [e for e in out if e.relabelled]  # 10 windows < 20: not settled yet
    plain = _matcher(gallery, relabel=False)
    plain.observe("s", "s:0", "A", _early(basis), 2, is_final=True)
    assert not [e for e in plain.observe("s", "s:1", "A", _later(basis), 50) if e.relabelled]


def test_a_new_diarizer_revision_replaces_the_live_labelling(basis):
    gallery = _gallery(basis, {"alice": 0, "bob": 1})
    matcher = _matcher(gallery, relabel=True, settle_windows=4)
    matcher.observe("s", "s:0", "A", _early(basis), 1, is_final=True)
    out = matcher.observe("s", "s:1", "A", _later(basis), 8, is_final=True)
    assert [(e.revision, e.relabelled) for e in out] == [(0, False), (0, True)]
    # The diarizer's end-of-stream revision 1 of s:0 moves it to another label: revision 1 it is.
    revised = matcher.observe("s", "s:0", "B", basis[1], 6, is_final=True, revision=1)
    assert revised[0].revision == 1
    assert revised[0].identification.speaker_id == "bob"


def test_end_stream_forgets_evidence(basis):
    gallery = _gallery(basis, {"alice": 0})
    matcher = _matcher(gallery)
    matcher.observe("s", "s:0", "A", basis[0], 3)
    assert matcher.streams() == ["s"]
    matcher.end_stream("s")
    assert matcher.streams() == [] and matcher.identities("s") == {}


def test_a_segment_without_windows_is_whoever_its_label_is(basis):
    """The end-of-stream pass gives overlapped speech a second voice with no windows of its own (zero
    embedding, window_count 0): it is named as its label, not scored as a zero vector."""
    gallery = _gallery(basis, {"alice": 0, "bob": 1})
    matcher = _matcher(gallery)
    matcher.observe("s", "s:0", "SPEAKER_00", _at(basis[0], basis[5], 0.9), 12, is_final=True, revision=1)
    matcher.observe("s", "s:1", "SPEAKER_01", _at(basis[1], basis[6], 0.9), 12, is_final=True, revision=1)
    overlap = matcher.observe(
        "s", "s:2", "SPEAKER_00", np.zeros(DIM, np.float32), 0, is_final=True, revision=1
    )
    assert overlap[0].identification.speaker_id == "alice"
    assert matcher.identities("s")["SPEAKER_01"].speaker_id == "bob"
    # A label heard only in overlaps has no evidence at all: UNKNOWN.
    alone = matcher.observe("s", "s:3", "SPEAKER_02", np.zeros(DIM, np.float32), 0, is_final=True, revision=1)
    assert alone[0].identification.speaker_id is None


def test_unknown_confidence_says_how_sure_unknown_is(basis):
    """UNKNOWN's confidence mirrors a name's: at least 0.5 whichever rule made it UNKNOWN, and higher
    the further the evidence is from what would have named someone."""
    gallery = _gallery(basis, {"alice": 0, "bob": 1})
    below = _matcher(gallery).identify(_at(basis[0], basis[9], 0.3))  # far below the threshold
    near = _matcher(gallery).identify(_at(basis[0], basis[9], 0.58))  # just below it
    assert below.speaker_id is None and near.speaker_id is None
    assert below.confidence > near.confidence >= 0.5
    # Above the threshold but refused by the margin rule (0.65 vs 0.64, not sure): still >= 0.5.
    ambiguous = _matcher(gallery, margin=0.05, sure_offset=0.1).identify(
        _unit(0.65 * basis[0] + 0.64 * basis[1] + 0.41 * basis[9])
    )
    assert ambiguous.speaker_id is None and ambiguous.score > THRESHOLD
    assert ambiguous.confidence >= 0.5
    # The label that lost Alice to a label with more speech: judged on who was left for it (nobody).
    solo = _matcher(_gallery(basis, {"alice": 0}), exclusive=True)
    solo.observe("s", "s:0", "A", _at(basis[0], basis[7], 0.85), 20, is_final=True)
    lost = solo.observe("s", "s:1", "C", _unit(0.68 * basis[0] + 0.73 * basis[9]), 2)[0].identification
    assert lost.speaker_id is None and lost.score > THRESHOLD and lost.confidence > 0.9


def test_margin_rule_follows_the_embedder_family():
    from speakerflow.gallery.matcher import rules_for
    from speakerflow.streams.settings import Settings
    from speakerflow.streams.stages.match import build_gallery_and_matcher

    assert rules_for("ge2e-resemblyzer-1234") == {"margin": 0.08, "sure_offset": 0.08, "consistency": 0.08}
    assert rules_for("campplus-zh_en-1234") == {"margin": 0.16, "sure_offset": 0.15, "consistency": 0.0}
    _, matcher = build_gallery_and_matcher(Settings(), "campplus-zh_en-1234", 192, Calibration(0.5))
    assert (matcher.margin, matcher.sure_offset, matcher.consistency) == (0.16, 0.15, 0.0)
    _, matcher = build_gallery_and_matcher(Settings(match_margin=0.0), "ge2e-x", 256, Calibration(0.75))
    assert (matcher.margin, matcher.sure_offset) == (0.0, 0.08)  # an explicit margin wins
