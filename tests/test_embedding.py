"""Embedders: SpeechBrain ECAPA through the real loading path (random-weight checkpoint), GE2E, errors."""

from __future__ import annotations

import csv
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from speakerflow.evaluation.ecapa_checkpoint import build_random_ecapa_checkpoint
from speakerflow.processors.audio import decode_file
from speakerflow.processors.embedding import (
    ECAPA_HUB_ID,
    EcapaEmbedder,
    EmbedderUnavailable,
    FastEcapa,
    load_embedder,
    resolve_precision,
)
from speakerflow.streams.settings import REPO_ROOT


@pytest.fixture(scope="module")
def ecapa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_ecapa_checkpoint(tmp_path_factory.mktemp("ecapa") / "small", channels=512, seed=0)


@pytest.fixture(scope="module")
def ecapa(ecapa_dir: Path) -> EcapaEmbedder:
    return EcapaEmbedder(str(ecapa_dir), "cpu")


@pytest.fixture(scope="module")
def speech(shared_data: Path) -> list[np.ndarray]:
    """Real speech of several speakers, cut to assorted lengths (0.8 to 3 s), some of them equal."""
    with open(shared_data / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["speaker"].startswith("ls-")][::7][:8]
    lengths = [48000, 32000, 32000, 24000, 12800, 40000, 32000, 30400]
    return [decode_file(shared_data / r["path"])[:n] for r, n in zip(rows, lengths, strict=True)]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _remedies_named(message: str) -> bool:
    return "make models" in message and "EMBEDDING_MODEL_PATH" in message


# -- ECAPA: loading ---------------------------------------------------------------------------------
def test_ecapa_loads_through_speechbrain_and_embeds(ecapa: EcapaEmbedder, speech: list[np.ndarray]) -> None:
    from speechbrain.inference.speaker import EncoderClassifier

    assert isinstance(ecapa.classifier, EncoderClassifier)
    assert ecapa.fast is not None, "the fast path should accept the hub architecture"
    out = ecapa.embed(speech)
    assert out.shape == (len(speech), 192) and out.dtype == np.float32 and ecapa.dim == 192
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert ecapa.embed([]).shape == (0, 192)
    with pytest.raises(ValueError, match=r"at least 0\.1 s"):
        ecapa.embed([speech[0], speech[0][:800]])


def test_model_id_follows_the_weights(ecapa: EcapaEmbedder, ecapa_dir: Path, tmp_path: Path) -> None:
    moved = Path(shutil.copytree(ecapa_dir, tmp_path / "copy"))
    # The copy's hyperparams still point at the original files; repoint them so the copy loads itself.
    yaml = moved / "hyperparams.yaml"
    yaml.write_text(yaml.read_text().replace(str(ecapa_dir), str(moved)))
    assert EcapaEmbedder(str(moved), "cpu").model_id == ecapa.model_id
    other = build_random_ecapa_checkpoint(tmp_path / "other", channels=512, seed=1)
    assert EcapaEmbedder(str(other), "cpu").model_id != ecapa.model_id


# -- ECAPA: the fast path is SpeechBrain's model ------------------------------------------------------
def test_fast_path_equals_speechbrain_encode_batch(ecapa: EcapaEmbedder, speech: list[np.ndarray]) -> None:
    ours = ecapa.embed(speech)
    stock = ecapa.embed_stock(speech)  # EncoderClassifier.encode_batch, one window per call
    assert _cos(ours, stock).min() > 0.99999
    np.testing.assert_allclose(ours, stock, atol=2e-4)


def test_fast_model_honours_relative_lengths_like_speechbrain(ecapa: EcapaEmbedder) -> None:
    """On a padded batch, FastEcapa and SpeechBrain's ECAPA_TDNN give the same rows (masked stats)."""
    model = ecapa.classifier.mods.embedding_model
    fast = FastEcapa(model).eval()
    wavs = torch.randn(3, 24000, generator=torch.Generator().manual_seed(3)) * 0.1
    wavs[1, 18000:] = 0
    wavs[2, 9000:] = 0
    lengths = torch.tensor([1.0, 0.75, 0.375])
    with torch.inference_mode():
        feats = ecapa.normalise(ecapa.features(wavs), lengths)
        reference = model(feats, lengths)[:, 0]
        ours = fast(feats, lengths)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))


def test_result_does_not_depend_on_batch_composition(ecapa: EcapaEmbedder, speech: list[np.ndarray]) -> None:
    together = ecapa.embed(speech)
    alone = np.stack([ecapa.embed([w])[0] for w in speech])
    reordered = ecapa.embed(speech[::-1])[::-1]
    assert _cos(together, alone).min() > 0.99999
    assert _cos(together, reordered).min() > 0.99999


def test_padded_buckets_stay_close_to_unpadded(ecapa_dir: Path, speech: list[np.ndarray]) -> None:
    """GPU-style bucketing (up to 10 % padding, relative lengths, mirrored padding) on CPU."""
    padded = EcapaEmbedder(str(ecapa_dir), "cpu", max_padding=0.1, cpu_micro_batch=64)
    same_length_group = [speech[1], speech[2], speech[6], speech[7]]  # 32000, 32000, 32000, 30400
    together = padded.embed(same_length_group)
    alone = np.stack([padded.embed([w])[0] for w in same_length_group])
    assert _cos(together, alone).min() > 0.999


def test_int8_stays_close_to_fp32_with_the_same_model_id(
    ecapa_dir: Path, ecapa: EcapaEmbedder, speech
) -> None:
    int8 = EcapaEmbedder(str(ecapa_dir), "cpu", precision="int8")
    assert int8.model_id == ecapa.model_id
    assert _cos(int8.embed(speech), ecapa.embed(speech)).min() > 0.995


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fp16_agrees_with_cpu_fp32(ecapa_dir: Path, ecapa: EcapaEmbedder, speech) -> None:
    gpu = EcapaEmbedder(str(ecapa_dir), "cuda:0")  # auto precision: fp16 autocast, pinned copies
    assert gpu.precision == "fp16" and gpu.model_id == ecapa.model_id
    assert _cos(gpu.embed(speech), ecapa.embed(speech)).min() > 0.999


# -- errors ------------------------------------------------------------------------------------------
def test_unknown_embedder_names_the_choices() -> None:
    with pytest.raises(EmbedderUnavailable) as err:
        load_embedder("wav2vec-speaker")
    assert "ge2e" in str(err.value) and "ecapa" in str(err.value)


@pytest.mark.parametrize("kind", ["missing", "empty", "no-weights"])
def test_missing_weights_name_both_remedies(kind: str, ecapa_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "model"
    if kind != "missing":
        target.mkdir()
    if kind == "no-weights":  # a hyperparams.yaml whose checkpoint files are not there
        text = (ecapa_dir / "hyperparams.yaml").read_text().replace(str(ecapa_dir), str(target))
        (target / "hyperparams.yaml").write_text(text)
    with pytest.raises(EmbedderUnavailable) as err:
        load_embedder("ecapa", "cpu", str(target))
    assert _remedies_named(str(err.value))


def test_precision_must_suit_the_device() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    for bad in ("fp16", "bf16", "fp8"):
        with pytest.raises(EmbedderUnavailable):
            resolve_precision(bad, cpu)
    with pytest.raises(EmbedderUnavailable):
        load_embedder("ge2e", "cpu", precision="int8")


def _hub_reachable() -> bool:
    try:
        socket.getaddrinfo("huggingface.co", 443)
        return True
    except OSError:
        return False


@pytest.mark.skipif(_hub_reachable(), reason="huggingface.co is reachable: this would download the model")
def test_hub_id_without_internet_names_both_remedies(tmp_path: Path) -> None:
    with pytest.raises(EmbedderUnavailable) as err:
        EcapaEmbedder(ECAPA_HUB_ID, "cpu", savedir=str(tmp_path / "hub"))
    assert _remedies_named(str(err.value)) and ECAPA_HUB_ID in str(err.value)


@pytest.mark.skipif(_hub_reachable(), reason="huggingface.co is reachable: this would download the model")
def test_models_download_fails_clearly_offline(tmp_path: Path) -> None:
    cli = [
        sys.executable,
        "-m",
        "speakerflow.streams.cli",
        "models",
        "download",
        "--target",
        str(tmp_path / "ecapa"),
    ]
    done = subprocess.run(cli, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "EMBEDDING_MODEL_PATH" in done.stderr and "huggingface.co" in done.stderr


# -- GE2E --------------------------------------------------------------------------------------------
def test_ge2e_rows_are_normalised_and_independent_of_the_batch(ge2e, speech: list[np.ndarray]) -> None:
    together = ge2e.embed(speech)
    assert together.shape == (len(speech), 256)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    alone = np.stack([ge2e.embed([w])[0] for w in speech])
    assert _cos(together, alone).min() > 0.99999
