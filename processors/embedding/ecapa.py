"""ECAPA-TDNN: SpeechBrain's `speechbrain/spkrec-ecapa-voxceleb`, from the hub or a local dir, loaded by
SpeechBrain's own `EncoderClassifier`; inference runs the loaded modules' weights through a time-major
GEMM formulation (`FastEcapa`) that is checked against SpeechBrain's forward at load, optionally with
int8 linear layers on CPU (`quantize_int8`).
"""

from __future__ import annotations

import copy
import logging
import warnings
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
    _host_batch,
    _length_buckets,
    _state_digest,
    _to_device,
    l2_normalise,
    resolve_device,
    resolve_precision,
)

log = logging.getLogger(__name__)

ECAPA_HUB_ID = "speechbrain/spkrec-ecapa-voxceleb"
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")
# SpeechBrain's dilated convolutions reflect-pad up to 4 frames, so a few frames are the hard floor.
ECAPA_MIN_SAMPLES = SAMPLE_RATE // 10
# Largest relative difference FastEcapa may show against SpeechBrain's own forward at load time.
FAST_PATH_TOLERANCE = 1e-3

REMEDIES = (
    "Either run `make models` on a machine with internet access (it downloads "
    f"{ECAPA_HUB_ID} into .data/models/ecapa), or set EMBEDDING_MODEL_PATH to a local SpeechBrain "
    "checkpoint directory (hyperparams.yaml, embedding_model.ckpt, mean_var_norm_emb.ckpt, "
    "classifier.ckpt, label_encoder.txt)."
)


def _bn_affine(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of an eval-mode SpeechBrain BatchNorm1d wrapper."""
    bn = norm.norm
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return scale.clone(), (bn.bias.detach() - bn.running_mean * scale).clone()


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.weight.data = weight.detach().clone().contiguous()
    if bias is not None:
        layer.bias.data = bias.detach().clone()
    return layer


def _reflect_context_index(frames: int, kernel: int, dilation: int) -> torch.Tensor:
    """Frame indices of every kernel tap for every output frame, reflect-padded like SpeechBrain."""
    half = (kernel - 1) // 2 * dilation
    taps = torch.arange(frames)[:, None] + (torch.arange(kernel)[None, :] * dilation - half)
    taps = torch.where(taps < 0, -taps, taps)
    taps = torch.where(taps > frames - 1, 2 * (frames - 1) - taps, taps)
    return taps.reshape(-1)


class _Tdnn(nn.Module):
    """SpeechBrain's TDNNBlock (conv -> ReLU -> BatchNorm), time-major: one GEMM over gathered taps.

    SpeechBrain pads every convolution (even 1x1) with a reflect copy and runs channel-major convs;
    here a k-tap dilated conv is one `index_select` of the taps followed by a Linear, and a 1x1 conv is
    a Linear on the features directly. The eval-mode BatchNorm becomes one fused multiply-add.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        conv = block.conv.conv
        if conv.groups != 1:
            raise NotImplementedError("grouped convolutions")
        weight = conv.weight.detach()  # (out, in, kernel)
        self.kernel, self.dilation = weight.shape[2], conv.dilation[0]
        self.linear = _linear(weight.permute(0, 2, 1).reshape(weight.shape[0], -1), conv.bias)
        scale, shift = _bn_affine(block.norm)
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)
        self._taps: dict[tuple[int, torch.device], torch.Tensor] = {}

    def context(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == 1:
            return x
        frames = x.shape[1]
        taps = self._taps.get((frames, x.device))
        if taps is None:
            taps = _reflect_context_index(frames, self.kernel, self.dilation).to(x.device)
            self._taps[(frames, x.device)] = taps
        return x.index_select(1, taps).reshape(x.shape[0], frames, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.linear(self.context(x)).relu_()
        # Follow the GEMM's dtype: under fp16 autocast the activations then stay fp16 (half the memory
        # traffic) instead of being promoted to fp32 by the fp32 BatchNorm vectors.
        return torch.addcmul(self.shift.to(z.dtype), z, self.scale.to(z.dtype))


class _SeRes2Block(nn.Module):
    """SpeechBrain's SERes2NetBlock, time-major; the Res2Net outputs land in one preallocated tensor."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        if block.shortcut is not None:
            raise NotImplementedError("SE-Res2Net blocks with a shortcut convolution")
        self.tdnn1 = _Tdnn(block.tdnn1)
        self.res2 = nn.ModuleList(_Tdnn(b) for b in block.res2net_block.blocks)
        self.scale = block.res2net_block.scale
        self.tdnn2 = _Tdnn(block.tdnn2)
        se = block.se_block
        self.se1 = _linear(se.conv1.conv.weight[:, :, 0], se.conv1.conv.bias)
        self.se2 = _linear(se.conv2.conv.weight[:, :, 0], se.conv2.conv.bias)

    def forward(self, x: torch.Tensor, frame_weights: torch.Tensor) -> torch.Tensor:
        h = self.tdnn1(x)
        pieces = h.chunk(self.scale, dim=2)
        width = pieces[0].shape[2]
        mixed = torch.empty_like(h)
        mixed[..., :width] = pieces[0]
        y = pieces[1]
        for i in range(1, self.scale):
            y = self.res2[i - 1](pieces[i] if i == 1 else pieces[i] + y)
            mixed[..., i * width : (i + 1) * width] = y
        h = self.tdnn2(mixed)
        squeeze = (h * frame_weights).sum(1, keepdim=True)  # masked mean over valid frames
        gate = torch.sigmoid(self.se2(torch.relu(self.se1(squeeze))))
        return torch.addcmul(x, h, gate)


class FastEcapa(nn.Module):
    """The weights of a loaded SpeechBrain `ECAPA_TDNN`, computed time-major with fewer copies.

    Same function as `ECAPA_TDNN.forward(feats, lengths)` (relative lengths, masked statistics), to
    float rounding. Two exact rewrites save work: no reflect-pad copy before 1x1 convs, and the
    attention's global context `W [x; mean; std]` is computed as `W_x x + (W_m mean + W_s std)`
    instead of repeating mean and std over every frame (two thirds of that layer's multiply-adds).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        asp = model.asp
        if not asp.global_context:
            raise NotImplementedError("attentive pooling without global context")
        self.block0 = _Tdnn(model.blocks[0])
        self.blocks = nn.ModuleList(_SeRes2Block(b) for b in model.blocks[1:])
        self.mfa = _Tdnn(model.mfa)
        self.eps = asp.eps
        channels = model.channels[-1]
        attention = asp.tdnn.conv.conv.weight.detach()[:, :, 0]  # (att, 3 * channels)
        self.att_frames = _linear(attention[:, :channels], asp.tdnn.conv.conv.bias)
        self.att_global = _linear(attention[:, channels:], None)
        att_scale, att_shift = _bn_affine(asp.tdnn.norm)
        self.register_buffer("att_scale", att_scale)
        self.register_buffer("att_shift", att_shift)
        self.att_out = _linear(asp.conv.conv.weight[:, :, 0], asp.conv.conv.bias)
        pool_scale, pool_shift = _bn_affine(model.asp_bn)
        self.register_buffer("pool_scale", pool_scale)
        self.register_buffer("pool_shift", pool_shift)
        self.fc = _linear(model.fc.conv.weight[:, :, 0], model.fc.conv.bias)

    def _stats(self, x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted mean and std over time; `weights` sum to 1 over time (per channel or shared).

        SpeechBrain's two-pass formula (no E[x^2] - mean^2 cancellation), with in-place steps: these
        tensors are the largest of the model and fresh allocations of them cost page faults.
        """
        mean = (weights * x).sum(1)
        spread = (x - mean.unsqueeze(1)).square_().mul_(weights)
        return mean, torch.sqrt(spread.sum(1).clamp_(self.eps))

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, frames, n_mels) normalised features, relative lengths (B,) -> (B, dim) embeddings."""
        frames = feats.shape[1]
        positions = torch.arange(frames, device=feats.device, dtype=lengths.dtype)
        mask = (positions[None, :] < lengths[:, None] * frames).unsqueeze(2).float()  # as SpeechBrain
        frame_weights = mask / mask.sum(1, keepdim=True)
        x = self.block0(feats)
        outputs = []
        for block in self.blocks:
            x = block(x, frame_weights)
            outputs.append(x)
        h = self.mfa(torch.cat(outputs, dim=2))
        mean, std = self._stats(h, frame_weights)
        context = self.att_global(torch.cat([mean, std], dim=1)).unsqueeze(1)
        z = (self.att_frames(h) + context).relu_()
        z = torch.tanh(torch.addcmul(self.att_shift.to(z.dtype), z, self.att_scale.to(z.dtype)))
        attention = self.att_out(z).masked_fill(mask == 0, float("-inf"))
        mean, std = self._stats(h, torch.softmax(attention.float(), dim=1))
        pooled = torch.addcmul(self.pool_shift, torch.cat([mean, std], dim=1), self.pool_scale)
        return self.fc(pooled)


# The channels x channels 1x1 layers hold ~88 % of ECAPA's multiply-adds; quantising only them keeps
# the input layer (log-mel), the Res2Net branches, attention and the output layer in fp32, which
# measured closer to fp32 (min cosine 0.9996 vs 0.9991 for every Linear, 1024-channel model).
INT8_LAYERS = ("tdnn1", "tdnn2", "mfa")


def quantize_int8(model: nn.Module, layers: Sequence[str] = INT8_LAYERS) -> nn.Module:
    """A copy of `model` whose Linear layers named in `layers` run int8.

    Weights are quantised per output channel, activations dynamically per call (fbgemm).
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    chosen = {
        name: per_channel_dynamic_qconfig
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(part in layers for part in name.split("."))
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao eager quantisation is deprecated in favour of torchao
        return quantize_dynamic(copy.deepcopy(model), chosen, dtype=torch.qint8)


def default_models_dir() -> Path:
    """Where `speakerflow models download` puts the hub model by default (the repository's .data/)."""
    return Path(__file__).resolve().parents[2] / ".data" / "models" / "ecapa"


def _load_classifier(source: str, savedir: str | None, device: torch.device) -> nn.Module:
    """SpeechBrain's own EncoderClassifier from a local directory or a hub id, or EmbedderUnavailable.

    A hub id is looked up in `default_models_dir()` first (files fetched there load without network).
    """
    from speechbrain.inference.speaker import EncoderClassifier
    from speechbrain.utils.fetching import FetchConfig

    local = Path(source).expanduser()
    if local.is_dir():
        if not (local / "hyperparams.yaml").is_file():
            raise EmbedderUnavailable(
                f"{local} holds no hyperparams.yaml, so no SpeechBrain model. {REMEDIES}"
            )
        source = savedir = str(local.resolve())
    elif source.startswith(("/", ".", "~")) or local.exists():
        raise EmbedderUnavailable(f"EMBEDDING_MODEL_PATH {source!r} is not a directory. {REMEDIES}")
    savedir = savedir or str(default_models_dir())
    offline = Path(savedir, "hyperparams.yaml").is_file()
    try:
        classifier = EncoderClassifier.from_hparams(
            source=source,
            savedir=savedir,
            run_opts={"device": str(device)},
            fetch_config=FetchConfig(allow_network=not offline),
        )
    except Exception as exc:
        raise EmbedderUnavailable(
            f"cannot load the ECAPA-TDNN weights from {source!r} ({type(exc).__name__}: {exc}). {REMEDIES}"
        ) from exc
    classifier.eval()
    return classifier


class EcapaEmbedder:
    """SpeechBrain ECAPA-TDNN loaded by SpeechBrain's own `EncoderClassifier`.

    `embed` groups inputs of similar length (at most `max_padding` of a row is padding), pads them
    into one batch with relative lengths (so normalisation and pooling ignore the padding), computes
    SpeechBrain's `compute_features` and `mean_var_norm` modules, then the embedding model as
    `FastEcapa` under `torch.inference_mode()`. On CPU the batch is cut into micro-batches of
    `cpu_micro_batch` windows: CPU GEMMs gain nothing from larger batches, while the activations of a
    few windows stay in cache. With `int8` every window runs alone, because dynamic quantisation picks
    its activation scale per call and a window's embedding must not depend on its batch neighbours.
    """

    name = "ecapa"

    def __init__(
        self,
        source: str = "",
        device: str = "cpu",
        savedir: str | None = None,
        precision: str = "auto",
        max_padding: float | None = None,
        cpu_micro_batch: int = 4,
        gpu_max_batch: int = 512,
        cpu_workers: int = 0,
    ) -> None:
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.source = source or ECAPA_HUB_ID
        # Padding only buys larger batches, which pay on a GPU; on a CPU group equal lengths only.
        self.max_padding = (
            max_padding if max_padding is not None else (0.05 if self.device.type == "cuda" else 0.0)
        )
        self.micro_batch = 1 if self.precision == "int8" else cpu_micro_batch
        if self.device.type == "cuda":
            self.micro_batch = gpu_max_batch
        self.cpu = CpuWorkers.for_device(self.device, cpu_workers)
        self.classifier = _load_classifier(self.source, savedir, self.device)
        mods = self.classifier.mods
        self.features, self.normalise = mods.compute_features, mods.mean_var_norm
        self.model_id = f"ecapa-{_state_digest(mods.embedding_model, mods.compute_features)}"
        self.fast = self._fast_model(mods.embedding_model)
        self.dim = int(self._embed_batch(torch.zeros(1, SAMPLE_RATE // 2), [SAMPLE_RATE // 2]).shape[1])

    def _fast_model(self, model: nn.Module) -> nn.Module | None:
        """FastEcapa for this checkpoint if its architecture is supported and it agrees, else None."""
        try:
            fast = FastEcapa(model).to(self.device).eval()
        except (NotImplementedError, AttributeError) as exc:
            log.warning(
                "ECAPA fast path unavailable for this checkpoint (%s); using SpeechBrain's forward", exc
            )
            return None
        probe = torch.randn(2, SAMPLE_RATE // 2, generator=torch.Generator().manual_seed(0)) * 0.1
        lengths = torch.tensor([1.0, 0.8], device=self.device)
        with torch.inference_mode():
            feats = self.normalise(self.features(probe.to(self.device)), lengths)
            reference = model(feats, lengths)[:, 0]
            ours = fast(feats, lengths)
        error = float((reference - ours).abs().max() / reference.abs().max())
        if error > FAST_PATH_TOLERANCE:
            log.warning("ECAPA fast path differs from SpeechBrain's forward (%.2g); not using it", error)
            return None
        return quantize_int8(fast) if self.precision == "int8" else fast

    @torch.inference_mode()
    def _embed_batch(self, batch: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        """Raw (B, dim) embeddings of a padded host batch, left on the device."""
        wavs = _to_device(batch, self.device)
        relative = torch.tensor([n / batch.shape[1] for n in lengths], dtype=torch.float32).to(self.device)
        feats = self.normalise(self.features(wavs), relative)  # fp32: log-mel needs the range
        with _autocast(self.device, self.precision):
            if self.fast is None:
                return self.classifier.mods.embedding_model(feats, relative)[:, 0].float()
            return self.fast(feats, relative).float()

    def embed(self, waveforms: Sequence[np.ndarray]) -> np.ndarray:
        if not waveforms:
            return np.zeros((0, self.dim), np.float32)
        wavs = [np.asarray(w, np.float32) for w in waveforms]
        too_short = [len(w) for w in wavs if len(w) < ECAPA_MIN_SAMPLES]
        if too_short:
            raise ValueError(
                f"ECAPA needs windows of at least {ECAPA_MIN_SAMPLES / SAMPLE_RATE:.1f} s "
                f"({ECAPA_MIN_SAMPLES} samples); got {len(too_short)} shorter ({min(too_short)} samples)"
            )
        jobs = [
            rows
            for group in _length_buckets([len(w) for w in wavs], self.max_padding)
            for rows in _chunks(group, self.cpu.chunk_size(len(group), self.micro_batch))
        ]

        def run(rows: list[int]) -> torch.Tensor:
            longest = max(len(wavs[i]) for i in rows)
            host = _host_batch([wavs[i] for i in rows], longest, self.device, reflect=True)
            return self._embed_batch(host, [len(wavs[i]) for i in rows])

        results = self.cpu.map(run, jobs)
        out = np.zeros((len(wavs), self.dim), np.float32)
        out[[i for rows in jobs for i in rows]] = torch.cat(results).cpu().numpy()  # one device sync
        return l2_normalise(out)

    @torch.inference_mode()
    def embed_stock(self, waveforms: Sequence[np.ndarray]) -> np.ndarray:
        """SpeechBrain's own `encode_batch`, one window per call: the reference the fast path matches."""
        rows = [
            self.classifier.encode_batch(torch.from_numpy(np.asarray(w, np.float32))[None]) for w in waveforms
        ]
        return l2_normalise(torch.cat(rows)[:, 0].float().cpu().numpy())
