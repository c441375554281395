"""Speaker embedders behind one interface: variable-length 16 kHz waveforms in, L2-normalised rows out.

Every embedder has a `model_id` that is stored with each voiceprint, so vectors of different models are
never compared. Models are never switched silently: asking for one that cannot load raises
`EmbedderUnavailable` with the remedy.

- `ge2e`: the GE2E LSTM encoder whose weights ship inside the `resemblyzer` wheel (offline default).
- `ecapa`: SpeechBrain's ECAPA-TDNN (`speechbrain/spkrec-ecapa-voxceleb`), from the hub or a local dir.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
ECAPA_HUB_ID = "speechbrain/spkrec-ecapa-voxceleb"


class EmbedderUnavailable(RuntimeError):
    """The requested embedding model cannot be loaded; the message names the remedies."""


class Embedder(Protocol):
    name: str
    model_id: str
    dim: int
    device: torch.device

    def embed(self, waveforms: Sequence[np.ndarray]) -> np.ndarray:
        """(N, dim) float32, each row L2-normalised; waveforms are 16 kHz mono float32."""
        ...


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EmbedderUnavailable(f"device {device!r} was requested but CUDA is not available here")
    return resolved


def l2_normalise(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return (matrix / np.maximum(norms, 1e-12)).astype(np.float32)


class Ge2eEmbedder:
    """GE2E (Resemblyzer) with batched, length-uniform partials.

    Each waveform is cut into 1.6-s partials (the length the model was trained on), every partial of
    the whole batch runs through the LSTM in one call, and a waveform's embedding is the normalised
    mean of its partials, as in Resemblyzer's `embed_utterance`. The mel filterbank is computed with
    torch (same parameters as Resemblyzer's librosa call) so that it batches and runs on the device.
    """

    name = "ge2e"
    dim = 256
    partial_frames = 160  # 1.6 s at 100 frames/s
    partial_step = 80  # 50 % overlap between partials of long inputs
    min_coverage = 0.75  # a trailing partial must be at least this full to count
    target_dbfs = -30.0  # Resemblyzer's volume normalisation (increase only)

    def __init__(self, device: str = "cpu") -> None:
        import torchaudio
        from resemblyzer import VoiceEncoder

        self.device = resolve_device(device)
        weights = Path(__import__("resemblyzer").__file__).parent / "pretrained.pt"
        self.model_id = f"ge2e-resemblyzer-{_file_digest(weights)}"
        self.encoder = VoiceEncoder(device=self.device, verbose=False).eval()
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=SAMPLE_RATE,
            n_fft=400,
            hop_length=160,
            n_mels=40,
            norm="slaney",
            mel_scale="slaney",
            pad_mode="constant",
            power=2.0,
        ).to(self.device)

    def _normalise_volume(self, wav: np.ndarray) -> np.ndarray:
        rms = float(np.sqrt(np.mean(wav.astype(np.float64) ** 2))) if wav.size else 0.0
        if rms <= 1e-8:
            return wav
        gain_db = self.target_dbfs - 20 * np.log10(rms)
        return wav * np.float32(10 ** (gain_db / 20)) if gain_db > 0 else wav

    def _partials(self, wav: np.ndarray) -> list[np.ndarray]:
        """Fixed-length (1.6 s) slices of `wav`, zero-padded, covering it."""
        hop = 160
        span = (self.partial_frames - 1) * hop + 1  # samples that give exactly `partial_frames` frames
        if len(wav) <= span:
            return [np.pad(wav, (0, span - len(wav)))]
        out = []
        step = self.partial_step * hop
        for start in range(0, len(wav), step):
            piece = wav[start : start + span]
            if start > 0 and len(piece) < self.min_coverage * span:
                break
            out.append(np.pad(piece, (0, span - len(piece))))
            if start + span >= len(wav):
                break
        return out

    @torch.inference_mode()
    def embed(self, waveforms: Sequence[np.ndarray]) -> np.ndarray:
        if not waveforms:
            return np.zeros((0, self.dim), np.float32)
        owners: list[int] = []
        partials: list[np.ndarray] = []
        for i, wav in enumerate(waveforms):
            pieces = self._partials(self._normalise_volume(np.asarray(wav, np.float32)))
            partials.extend(pieces)
            owners.extend([i] * len(pieces))
        batch = torch.from_numpy(np.stack(partials)).to(self.device)
        mels = self.mel(batch).transpose(1, 2)  # (B, frames, 40)
        partial_embeds = self.encoder(mels).float().cpu().numpy()
        sums = np.zeros((len(waveforms), self.dim), np.float64)
        np.add.at(sums, np.asarray(owners), partial_embeds)
        return l2_normalise(sums)


class EcapaEmbedder:
    """SpeechBrain ECAPA-TDNN loaded by SpeechBrain's own `EncoderClassifier`.

    Inputs of similar length are grouped so that padding stays small; relative lengths are passed so
    that statistics pooling ignores the padding.
    """

    name = "ecapa"

    def __init__(self, source: str = "", device: str = "cpu", savedir: str | None = None) -> None:
        from speechbrain.inference.speaker import EncoderClassifier

        self.device = resolve_device(device)
        source = source or ECAPA_HUB_ID
        local = Path(source)
        try:
            self.classifier = EncoderClassifier.from_hparams(
                source=str(local) if local.is_dir() else source,
                savedir=savedir or str(local if local.is_dir() else Path(".data") / "models" / "ecapa"),
                run_opts={"device": str(self.device)},
            )
        except Exception as exc:
            raise EmbedderUnavailable(
                f"cannot load the ECAPA-TDNN weights from {source!r} ({type(exc).__name__}: {exc}). "
                "Either run `make models` on a machine with internet access (it downloads "
                f"{ECAPA_HUB_ID} into .data/models/ecapa), or set EMBEDDING_MODEL_PATH to a local "
                "SpeechBrain checkpoint directory (hyperparams.yaml, embedding_model.ckpt, ...)."
            ) from exc
        self.classifier.eval()
        ckpt = Path(self.classifier.hparams.pretrainer.paths.get("embedding_model", source))
        digest = _file_digest(ckpt) if ckpt.is_file() else hashlib.sha1(source.encode()).hexdigest()[:8]
        self.model_id = f"ecapa-{digest}"
        with torch.inference_mode():
            probe = self.classifier.encode_batch(torch.zeros(1, SAMPLE_RATE, device=self.device))
        self.dim = int(probe.shape[-1])

    @torch.inference_mode()
    def embed(self, waveforms: Sequence[np.ndarray]) -> np.ndarray:
        out = np.zeros((len(waveforms), self.dim), np.float32)
        for group in _length_buckets([len(w) for w in waveforms]):
            longest = max(len(waveforms[i]) for i in group)
            batch = np.zeros((len(group), longest), np.float32)
            for row, i in enumerate(group):
                batch[row, : len(waveforms[i])] = waveforms[i]
            lens = torch.tensor([len(waveforms[i]) / longest for i in group])
            emb = self.classifier.encode_batch(torch.from_numpy(batch).to(self.device), lens.to(self.device))
            out[group] = emb.squeeze(1).float().cpu().numpy()
        return l2_normalise(out)


def _length_buckets(lengths: list[int], max_padding: float = 0.2) -> list[list[int]]:
    """Group indices so that within a group the shortest is at least (1 - max_padding) of the longest."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[i] >= (1 - max_padding) * lengths[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _file_digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()[:8]


def load_embedder(name: str, device: str = "cpu", model_path: str = "") -> Embedder:
    """The embedder called `name`; raises EmbedderUnavailable (never falls back to another model)."""
    if name == "ge2e":
        return Ge2eEmbedder(device=device)
    if name == "ecapa":
        return EcapaEmbedder(source=model_path, device=device)
    raise EmbedderUnavailable(f"unknown embedder {name!r}: choose 'ge2e' or 'ecapa'")
