"""The segmentation diarizer: powerset decoding, overlap on real speech, cannot-link, snapshots, latency."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from mixes import A_END, B_AT, END, RATE, two_voice_mix

from speakerflow.processors.audio import decode_file
from speakerflow.processors.overlap_clustering import IncrementalClustering, offline_assign
from speakerflow.processors.overlap_diarization import OverlapConfig, SegmentationDiarizer, overlap_config
from speakerflow.processors.segmentation import Segmenter, powerset_to_multilabel


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    torch.set_num_threads(1)
    return Segmenter()


@pytest.fixture(scope="module")
def mix(shared_data) -> np.ndarray:
    return two_voice_mix(shared_data)


def feed(diarizer, audio, segmenter, embed, start=0, stop=None, step=8000, log=None):
    """Push audio[start:stop] in `step`-sample chunks (and end the stream when stop is None)."""
    stop = len(audio) if stop is None else stop
    updates = []

    def process(chunks):
        activity = segmenter(np.stack([c.samples for c in chunks])) if chunks else np.zeros((0, 0, 3))
        speakers = diarizer.add_segmentation(chunks, activity)
        out = diarizer.add_embeddings(speakers, embed([s.samples for s in speakers]))
        if log is not None:
            log.append((round(diarizer.audio_s * RATE), round(diarizer.committed_s * RATE), out))
        updates.extend(out)

    for i in range(start, stop, step):
        process(diarizer.push_audio(audio[i : min(i + step, stop)]))
    if stop == len(audio):
        process(diarizer.end_audio())
        updates.extend(diarizer.finish())
    return updates


def labels_in(segments, lo, hi, frame=0.05) -> list[set[str]]:
    times = np.arange(lo, hi, frame)
    return [{u.label for u in segments if u.start_s <= t < u.end_s} for t in times]


def test_powerset_decoding_gives_speaker_probabilities(segmenter) -> None:
    # classes: none, 1, 2, 3, 1+2, 1+3, 2+3
    log_probs = torch.log(
        torch.tensor([[[0, 0, 0, 0, 1, 0, 0], [1, 0, 0, 0, 0, 0, 0]]], dtype=torch.float32) + 1e-9
    )
    multi = powerset_to_multilabel(log_probs, segmenter._mapping)
    assert np.allclose(multi[0, 0].numpy(), [1, 1, 0], atol=1e-6)
    assert np.allclose(multi[0, 1].numpy(), [0, 0, 0], atol=1e-6)
    windows = np.random.default_rng(0).normal(0, 0.1, (2, 5 * RATE)).astype(np.float32)
    out = segmenter(windows)
    assert out.shape == (2, segmenter.frames(5 * RATE), 3)
    assert out.min() >= 0 and out.max() <= 1 + 1e-5
    OverlapConfig().check_grid(segmenter.grid)


def test_two_speakers_and_their_overlap_are_found(mix, segmenter, ge2e) -> None:
    diarizer = SegmentationDiarizer()
    feed(diarizer, mix, segmenter, ge2e.embed)
    revision = diarizer.revise()
    alone_a = labels_in(revision, 1.0, B_AT - 0.5)
    both = labels_in(revision, B_AT + 0.5, A_END - 0.5)
    alone_b = labels_in(revision, A_END + 0.5, END - 1.0)
    a = max({lbl for s in alone_a for lbl in s}, key=lambda x: sum(x in s for s in alone_a))
    b = max({lbl for s in alone_b for lbl in s}, key=lambda x: sum(x in s for s in alone_b))
    assert a != b
    assert np.mean([s == {a} for s in alone_a if s]) > 0.9
    assert np.mean([s == {b} for s in alone_b if s]) > 0.9
    assert np.mean([s == {a, b} for s in both]) > 0.5  # pauses in read speech leave one voice at times
    assert np.mean([len(s) == 2 for s in alone_a + alone_b]) < 0.05


def test_cannot_link_two_local_speakers_never_share_a_global_one() -> None:
    same = np.ones((3, 4), np.float32)
    activity = np.full((50, 3), 0.9, np.float32)
    clustering = IncrementalClustering(delta_new=0.5)
    first = clustering.assign(same, np.ones(3, bool), activity)
    second = clustering.assign(same, np.ones(3, bool), activity)
    for mapping in (first, second):
        assert len(set(mapping.tolist())) == 3 and (mapping >= 0).all()
    labels = offline_assign(np.ones((6, 4)), np.array([0, 0, 0, 1, 1, 2]), threshold=0.5)
    for owner in range(3):
        members = labels[np.array([0, 0, 0, 1, 1, 2]) == owner]
        members = members[members >= 0]  # a local speaker with no cluster left is dropped, not merged
        assert len(members) and len(set(members.tolist())) == len(members)


def synthetic_stream(config: OverlapConfig, seconds: float, voice_of, on_step=None) -> list:
    """Drive a diarizer without models: one local speaker talks through every window (probability 0.9),
    and its embedding is `voice_of(window centre in seconds)` plus a little noise. Returns every update."""
    rng = np.random.default_rng(0)
    diarizer = SegmentationDiarizer(config)
    grid = config.grid
    frames = (config.window_samples - grid.size) // grid.step + 1
    activity = np.zeros((frames, 3), np.float32)
    activity[:, 0] = 0.9
    updates = []

    def process(chunks):
        speakers = diarizer.add_segmentation(
            chunks, np.stack([activity] * len(chunks)) if chunks else activity[None][:0]
        )
        centres = [
            (s.chunk * config.hop_samples + config.hop_samples - config.window_samples / 2) / RATE
            for s in speakers
        ]
        embeddings = (
            np.stack([voice_of(t) + 0.05 * rng.standard_normal(8) for t in centres])
            if speakers
            else np.zeros((0, 8))
        )
        updates.extend(diarizer.add_embeddings(speakers, embeddings.astype(np.float32)))
        if on_step is not None:
            on_step(diarizer)

    step = config.hop_samples
    for _ in range(0, int(seconds * RATE), step):
        process(diarizer.push_audio(np.zeros(step, np.float32)))
    process(diarizer.end_audio())
    return updates + diarizer.finish()


def test_live_reclustering_splits_two_voices_the_online_pass_merged() -> None:
    voice_a, voice_b = np.eye(8)[0], np.eye(8)[1]

    def voice_of(t: float) -> np.ndarray:
        return voice_a if t < 20 else voice_b

    # delta_new 1.5: online matching accepts any centroid, so B is merged into A's speaker
    merged = OverlapConfig(delta_new=1.5, recluster_every_s=0.0)
    assert {u.label for u in synthetic_stream(merged, 40, voice_of) if u.end_s > u.start_s} == {"SPEAKER_00"}
    repaired = synthetic_stream(replace(merged, recluster_every_s=5.0), 40, voice_of)
    final = sorted((u for u in repaired if u.is_final and u.end_s > u.start_s), key=lambda u: u.start_s)
    # committed labels never change: A keeps SPEAKER_00 (and B's first seconds, committed before a
    # re-clustering had enough of B to split it off); from then on B has a label of its own
    assert [u.label for u in final] == ["SPEAKER_00", "SPEAKER_01"]
    assert final[0].start_s == 0 and 20 < final[1].start_s < 31 and final[1].end_s > 39


def test_stable_windows_never_change_but_later_ones_may() -> None:
    """Only windows up to `stable_windows` may go into immutable snapshot blocks: live re-clustering
    relabels the windows after them (here: B's first windows, once B is split off A)."""
    seen: list[tuple[int, int, np.ndarray]] = []

    def record(diarizer) -> None:
        with np.load(io.BytesIO(diarizer.window_rows(0, diarizer.window_count))) as rows:
            seen.append((diarizer.stable_windows, diarizer.window_count, rows["w_mapping"]))

    config = OverlapConfig(delta_new=1.5, recluster_every_s=5.0)
    synthetic_stream(config, 40, lambda t: np.eye(8)[0] if t < 20 else np.eye(8)[1], on_step=record)
    final = seen[-1][2]
    changed_later = False
    for stable, count, mapping in seen:
        assert np.array_equal(mapping[:stable], final[:stable])
        changed_later |= not np.array_equal(mapping[stable:count], final[stable:count])
    assert changed_later


def test_live_reclustering_before_any_speaker_was_opened_online() -> None:
    """Local speakers too faint to open a speaker online (mean activity under rho_update) are all the
    history holds when the first re-clustering runs: it opens one for them, and the stream is labelled."""
    config = OverlapConfig(rho_update=0.95, recluster_every_s=2.0)
    updates = synthetic_stream(config, 8, lambda t: np.eye(8)[0])
    last = {u.turn_index: u for u in updates if u.end_s > u.start_s}
    assert last and all(u.is_final for u in last.values())
    assert synthetic_stream(replace(config, recluster_every_s=0.0), 8, lambda t: np.eye(8)[0]) == []


def test_a_retired_speaker_is_never_matched_again() -> None:
    clustering = IncrementalClustering(delta_new=0.5)
    voices = np.eye(4)[:2]
    clustering.assign(voices, np.ones(2, bool), np.full((10, 2), 0.9))
    clustering.rebase({0: voices[0] * 3})  # an offline pass found speaker 1 to be speaker 0
    assert clustering.retired.tolist() == [False, True]
    again = clustering.assign(voices[1:], np.ones(1, bool), np.full((10, 1), 0.9))
    assert again.tolist() == [2]  # a new speaker, not the retired id
    copy = IncrementalClustering()
    copy.load_state(clustering.state())
    assert copy.retired.tolist() == clustering.retired.tolist()


@pytest.mark.parametrize("recluster_every_s", [10.0, 2.0])  # 2 s: live re-clustering before the cut too
def test_snapshot_restore_continues_identically(mix, segmenter, ge2e, recluster_every_s) -> None:
    config = OverlapConfig(recluster_every_s=recluster_every_s)
    whole = SegmentationDiarizer(config)
    expected = feed(whole, mix, segmenter, ge2e.embed)
    first = SegmentationDiarizer(config)
    cut = int(9.0 * RATE)
    before = feed(first, mix, segmenter, ge2e.embed, stop=cut)
    split = first.window_count // 2
    assert 0 < split <= first.stable_windows < first.window_count  # blocks hold only settled windows
    restored = SegmentationDiarizer.restore(first.snapshot(windows_from=split), [first.window_rows(0, split)])
    after = feed(restored, mix, segmenter, ge2e.embed, start=cut)
    got = before + after

    def key(u):
        return (u.turn_index, u.label, round(u.start_s, 6), round(u.end_s, 6), u.is_final, u.window_count)

    assert [key(u) for u in got] == [key(u) for u in expected]
    assert all(np.array_equal(a.embedding, b.embedding) for a, b in zip(got, expected, strict=True))
    assert [key(u) for u in restored.revise()] == [key(u) for u in whole.revise()]


def test_no_frame_waits_longer_than_the_latency(mix, segmenter, ge2e) -> None:
    config = OverlapConfig(latency_s=2.0)
    log = []
    feed(SegmentationDiarizer(config), mix, segmenter, ge2e.embed, log=log)
    latency = int(config.latency_s * RATE)
    frame = config.frame_step
    for audio, committed, updates in log:
        # every frame that ended `latency` samples ago or earlier is committed ...
        assert committed >= min(audio - latency - frame, audio) or committed == len(mix)
        # ... final turns never reach beyond it; provisional ones may, up to the audio heard so far
        assert all(round(u.end_s * RATE) <= committed + 1 for u in updates if u.is_final)
        assert all(round(u.end_s * RATE) <= audio for u in updates)


def test_a_new_voice_is_labelled_provisionally_before_its_frames_are_committed(mix, segmenter, ge2e) -> None:
    """B starts at 6 s: a provisional turn with B's label covers B's audio before any of B's frames is
    committed (that takes about `latency_s`), under the turn index B's first final turn keeps."""
    config = OverlapConfig(latency_s=2.0)
    log = []
    updates = feed(SegmentationDiarizer(config), mix, segmenter, ge2e.embed, log=log)
    b_label = next(u.label for u in updates if u.is_final and u.start_s < 12.0 < u.end_s)  # B alone
    b_first = min((u for u in updates if u.is_final and u.label == b_label), key=lambda u: u.start_s)
    first_seen = next(
        audio for audio, _, out in log if any(u.label == b_label and u.end_s > b_first.start_s for u in out)
    )
    first_committed = next(audio for audio, committed, _ in log if committed > b_first.start_s * RATE)
    assert first_seen < first_committed
    seen = next(u for _, _, out in log for u in out if u.label == b_label)
    assert seen.turn_index == b_first.turn_index and not seen.is_final


def test_every_turn_ends_final_even_after_a_tentative_turn_no_commit_took(
    mix, segmenter, campplus, shared_data
) -> None:
    """A consumer's last version of every segment is final. On this AMI excerpt a tentative new turn
    (index 4) is shown that no committed turn takes, so it is withdrawn as an empty final segment."""
    ami = decode_file(shared_data / "ami/ami_trn06.flac")
    for audio in (mix, ami):
        config = overlap_config(embedder="campplus")
        updates = feed(SegmentationDiarizer(config), audio, segmenter, campplus.embed, step=RATE // 2)
        last = {u.turn_index: u for u in updates}
        assert all(u.is_final for u in last.values())
        withdrawn = [u for u in last.values() if u.end_s == u.start_s]
        assert all(u.window_count == 0 for u in withdrawn)
    assert withdrawn  # the AMI excerpt's tentative turn 4


def test_the_window_step_comes_from_the_settings_and_keeps_the_tuned_values() -> None:
    from speakerflow.streams.settings import Settings
    from speakerflow.streams.stages.diarize import segmentation_config

    default = segmentation_config(Settings.from_env({}), "campplus")
    packed = segmentation_config(Settings.from_env({"SPEAKERFLOW_SEGMENTATION_HOP_S": "1"}), "campplus")
    assert (default.hop_s, packed.hop_s) == (0.5, 1.0)
    assert packed.delta_new == default.delta_new == overlap_config(embedder="campplus").delta_new
    assert segmentation_config(Settings.from_env({}), "campplus", {"hop_s": "0.25"}).hop_s == 0.25


def test_the_oracle_floor_labels_each_voice_with_its_reference_speaker(mix, segmenter, ge2e) -> None:
    """evaluation/segmentation_floor.py: local speakers mapped to the reference speaker they overlap most;
    on the two-voice clip that gives A alone, both in the overlap, B alone (speech pauses aside)."""
    from pyannote.core import Annotation, Segment

    from speakerflow.evaluation.segmentation_floor import oracle_mapping

    reference = Annotation()
    reference[Segment(0, A_END)] = "A"
    reference[Segment(B_AT, END)] = "B"
    diarizer = SegmentationDiarizer(OverlapConfig())
    feed(diarizer, mix, segmenter, ge2e.embed)
    segments = diarizer.labelling(oracle_mapping(diarizer, reference, ["A", "B"]))
    names = {"SPEAKER_00": "A", "SPEAKER_01": "B"}
    for lo, hi, expected in ((1.0, 5.5, {"A"}), (7.0, 9.5, {"A", "B"}), (11.0, 15.0, {"B"})):
        heard = [{names[label] for label in frame} for frame in labels_in(segments, lo, hi)]
        assert np.mean([frame <= expected for frame in heard]) > 0.95, (lo, hi, heard)  # nobody else
        assert np.mean([frame == expected for frame in heard]) > 0.6, (lo, hi, heard)  # pauses aside
