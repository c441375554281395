"""A two-voice clip for the segmentation diarizer and its peers: A talks [0, 10) s, B [6, 16) s."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from speakerflow.processors.audio import decode_file

RATE = 16000
A_FILE = "librispeech/test-other/1688/1688-142285-0000.flac"
B_FILE = "librispeech/test-other/2609/2609-156975-0002.flac"
B_AT, A_END, END = 6.0, 10.0, 16.0  # A talks [0, 10), B talks [6, 16): both in [6, 10)


def two_voice_mix(shared_data: Path) -> np.ndarray:
    a = decode_file(shared_data / A_FILE)[: int(A_END * RATE)]
    b = decode_file(shared_data / B_FILE)[: int((END - B_AT) * RATE)]
    out = np.zeros(int(END * RATE), np.float32)
    out[: len(a)] += a / np.abs(a).max() * 0.5
    out[int(B_AT * RATE) : int(B_AT * RATE) + len(b)] += b / np.abs(b).max() * 0.5
    return out
