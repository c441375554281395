"""Speaker embedders behind one interface: variable-length 16 kHz waveforms in, L2-normalised rows out.

Every embedder has a `model_id` that is stored with each voiceprint, so vectors of different models are
never compared. Models are never switched silently: asking for one that cannot load raises
`EmbedderUnavailable` with the remedy.

- `ge2e`: the GE2E LSTM encoder whose weights ship inside the `resemblyzer` wheel (offline default).
- `ecapa`: SpeechBrain's ECAPA-TDNN (`speechbrain/spkrec-ecapa-voxceleb`), from the hub or a local dir,
  loaded by SpeechBrain's own `EncoderClassifier`; inference runs the loaded modules' weights through
  a time-major GEMM formulation (`FastEcapa`) that is checked against SpeechBrain's forward at load.

Precision: `auto` is fp32 on CPU and fp16 autocast on CUDA. `bf16` (CUDA autocast) and `int8` (CPU,
dynamic quantisation of the linear layers, opt-in: it changes the numbers, see README) are explicit
choices. The precision does not enter `model_id`: it is the same model, and GPU (fp16) and CPU (fp32)
workers must share one gallery.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

SAMPLE_RATE = 16000
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


def resolve_precision(precision: str, device: torch.device) -> str:
    """The concrete precision for `device`: auto = fp16 on CUDA, fp32 on CPU."""
    if precision not in PRECISIONS:
        raise EmbedderUnavailable(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if device.type == "cuda" and precision == "int8":
        raise EmbedderUnavailable("int8 is a CPU path; use fp16 or bf16 on CUDA")
    if device.type == "cpu" and precision in ("fp16", "bf16"):
        # No fp16/bf16 matrix units on common x86 CPUs: it would be slower, not faster.
        raise EmbedderUnavailable(f"{precision} is a CUDA path; use fp32 or int8 on CPU")
    return precision


def l2_normalise(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return (matrix / np.maximum(norms, 1e-12)).astype(np.float32)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if device.type == "cuda" and precision in ("fp16", "bf16"):
        return torch.autocast("cuda", dtype=torch.float16 if precision == "fp16" else torch.bfloat16)
    return contextlib.nullcontext()


def _host_batch(
    rows: Sequence[np.ndarray], length: int, device: torch.device, reflect: bool = False
) -> torch.Tensor:
    """Padded (len(rows), length) float32 batch in host memory, pinned when it goes to CUDA.

    Pinned memory lets the copy run asynchronously (`non_blocking=True`), so the host prepares the
    next batch while the device still computes this one. `reflect` pads with the signal mirrored
    instead of zeros: padded frames are masked out of every statistic, but convolutions near the end
    still see them, and mirrored speech disturbs a row far less than digital silence does (measured
    with 6 % padding: min cosine to the unpadded embedding 0.9996 mirrored, 0.9975 zeros).
    """
    batch = torch.zeros((len(rows), length), dtype=torch.float32, pin_memory=device.type == "cuda")
    view = batch.numpy()
    for i, row in enumerate(rows):
        view[i, : len(row)] = row
        if reflect and 1 < len(row) < length:
            view[i, len(row) :] = np.pad(row, (0, length - len(row)), mode="reflect")[len(row) :]
    return batch


_COPY_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` on `device`. On CUDA the copy runs on a side stream, so it overlaps the kernels of the
    previous batch that are still queued on the compute stream, instead of waiting behind them."""
    if device.type != "cuda":
        return host.to(device)
    copy_stream = _COPY_STREAMS.get(device)
    if copy_stream is None:
        copy_stream = _COPY_STREAMS[device] = torch.cuda.Stream(device)
    compute = torch.cuda.current_stream(device)
    with torch.cuda.stream(copy_stream):
        on_device = host.to(device, non_blocking=True)
    compute.wait_stream(copy_stream)
    on_device.record_stream(compute)  # allocated on the copy stream, used on the compute stream
    return on_device


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


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class CpuWorkers:
    """Data parallelism over windows on CPU: N threads, each running torch with one intra-op thread.

    On this class of machine one window's GEMMs already run near a core's peak on one thread, and
    splitting every op over cores costs synchronisation; running whole micro-batches side by side on
    single-threaded workers measured 7-15 % faster than intra-op threads. torch's thread count is a
    per-thread (OpenMP) setting, so the workers do not change the caller's. With one job (or one
    worker) the caller runs it itself, with its own intra-op threads, which keeps single-window
    latency low.
    """

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        self._pool: ThreadPoolExecutor | None = None
        if self.workers > 1:
            self._pool = ThreadPoolExecutor(
                self.workers, thread_name_prefix="embed-cpu", initializer=torch.set_num_threads, initargs=(1,)
            )

    @classmethod
    def for_device(cls, device: torch.device, workers: int = 0) -> CpuWorkers:
        """`workers` threads on CPU (0: as many as the caller's torch threads); none on a GPU."""
        if device.type != "cpu":
            return cls(1)
        return cls(workers or torch.get_num_threads())

    def map(self, fn: Callable[[T], R], jobs: list[T]) -> list[R]:
        if self._pool is None or len(jobs) < 2:
            return [fn(job) for job in jobs]
        return list(self._pool.map(fn, jobs))

    def chunk_size(self, items: int, most: int) -> int:
        """Rows per job: at most `most`, small enough that every worker gets one."""
        return max(1, min(most, -(-items // self.workers)))


def _file_digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()[:8]


def _state_digest(*modules: nn.Module) -> str:
    """Digest of the modules' weights and buffers: same weights, same id, wherever they were loaded."""
    digest = hashlib.sha1()
    for module in modules:
        for key, value in sorted(module.state_dict().items()):
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------
# GE2E
# ---------------------------------------------------------------------------------------------------
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
    return Path(__file__).resolve().parents[1] / ".data" / "models" / "ecapa"


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


def load_embedder(
    name: str, device: str = "cpu", model_path: str = "", precision: str = "auto", cpu_workers: int = 0
) -> Embedder:
    """The embedder called `name`; raises EmbedderUnavailable (never falls back to another model).

    `cpu_workers`: windows embedded side by side on CPU (0: the caller's torch thread count).
    """
    if name == "ge2e":
        return Ge2eEmbedder(device=device, precision=precision, cpu_workers=cpu_workers)
    if name == "ecapa":
        return EcapaEmbedder(source=model_path, device=device, precision=precision, cpu_workers=cpu_workers)
    raise EmbedderUnavailable(
        f"unknown embedder {name!r}: choose 'ge2e' (offline, weights in the resemblyzer wheel) or 'ecapa' "
        f"(SpeechBrain ECAPA-TDNN). {REMEDIES}"
    )
