"""GE2E: the LSTM speaker encoder whose weights ship inside the `resemblyzer` wheel (offline default)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from speakerflow.processors.embedding.base import (
    SAMPLE_RATE,
    CpuWorkers,
    EmbedderUnavailable,
    _autocast,
    _file_digest,
    _host_batch,
    _to_device,
    l2_normalise,
    resolve_device,
    resolve_precision,
)


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
    max_partials_per_call = 1024  # bounds the memory of one LSTM call for very long inputs

    def __init__(self, device: str = "cpu", precision: str = "auto", cpu_workers: int = 0) -> None:
        import torchaudio

        with warnings.catch_warnings():
            # resemblyzer imports webrtcvad, which imports the deprecated pkg_resources (never used here).
            warnings.filterwarnings("ignore", "pkg_resources is deprecated", UserWarning)
            from resemblyzer import VoiceEncoder

        self.device = resolve_device(device)
        if precision == "int8":
            raise EmbedderUnavailable("int8 is offered for ecapa only; ge2e runs in fp32 (or fp16 on CUDA)")
        self.precision = resolve_precision(precision, self.device)
        weights = Path(__import__("resemblyzer").__file__).parent / "pretrained.pt"
        self.model_id = f"ge2e-resemblyzer-{_file_digest(weights)}"
        self.encoder = VoiceEncoder(device=self.device, verbose=False).eval()
        self.cpu = CpuWorkers.for_device(self.device, cpu_workers)
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

    @torch.inference_mode()
    def _embed_partials(self, partials: list[np.ndarray]) -> torch.Tensor:
        """L2-normalised embeddings of equal-length partials, left on the device."""
        batch = _to_device(_host_batch(partials, len(partials[0]), self.device), self.device)
        mels = self.mel(batch).transpose(1, 2)  # (B, frames, 40) in fp32
        with _autocast(self.device, self.precision):
            return self.encoder(mels)

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
        size = self.cpu.chunk_size(len(partials), self.max_partials_per_call)
        outputs = self.cpu.map(
            self._embed_partials, [partials[i : i + size] for i in range(0, len(partials), size)]
        )
        partial_embeds = torch.cat(outputs).float().cpu().numpy()
        sums = np.zeros((len(waveforms), self.dim), np.float64)
        np.add.at(sums, np.asarray(owners), partial_embeds)
        return l2_normalise(sums)


# ---------------------------------------------------------------------------------------------------
# ECAPA-TDNN
# ---------------------------------------------------------------------------------------------------
