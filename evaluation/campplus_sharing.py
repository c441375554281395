"""Would sharing CAM++'s front end between overlapping windows keep the embeddings? (issue #13)

`python -m speakerflow.evaluation.campplus_sharing --files 40` embeds 1.5-s windows every 0.5 s (the
light diarizer's windows) of LibriSpeech and VCTK utterances (first 12 s of each) two ways and prints
the distribution of the cosine between them:

- per window (what runs): fbank of the window, minus its mean over the window, through all of CAM++;
- shared: fbank, FCM head and first TDNN layer computed once over the whole stretch, the TDNN output
  cut per window (stride 2: 74 frames from frame 25 k) and the CAM blocks run per window.

A shared computation cannot subtract each window's own mean, so the variants are: the window's own
mean anyway (an upper bound: only the head's zero padding at window edges differs), the stretch's mean,
a running mean from the stretch start, a sliding mean over the last 1.5 s; and, to separate the two
effects, the stretch's mean with per-window computation. The issue keeps sharing only if every window
stays within cosine 0.99 of the per-window embedding.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

WINDOW_FRAMES = 148  # a 1.5-s window: 1 + (24000 - 400) // 160
HOP_FRAMES = 50  # 0.5 s
MAX_SECONDS = 12.0


def _utterances(data: Path, files: int) -> list[Path]:
    with open(data / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["path"].startswith(("librispeech/", "vctk/"))]
    rng = np.random.default_rng(0)
    rng.shuffle(rows)
    return [data / r["path"] for r in rows[:files]]


def cosines(files: list[Path]) -> dict[str, np.ndarray]:
    import torch
    from torch.nn.functional import normalize
    from torchaudio.compliance import kaldi

    from speakerflow.processors.audio import decode_file
    from speakerflow.processors.embedding.campplus import MEL_BINS, CampplusEmbedder

    model = CampplusEmbedder("cpu", fast=False).model
    blocks = torch.nn.Sequential(*list(model.xvector.children())[1:])

    def front(feats: torch.Tensor) -> torch.Tensor:  # (T, 80) of a stretch -> TDNN output (1, C, T/2)
        return model.xvector.tdnn(model.head(feats.T[None]))

    def cut(shared: torch.Tensor, starts: list[int]) -> torch.Tensor:
        rows = torch.stack([shared[0, :, s // 2 : s // 2 + (WINDOW_FRAMES + 1) // 2] for s in starts])
        return normalize(blocks(rows), dim=1)

    out: dict[str, list[torch.Tensor]] = {
        k: []
        for k in (
            "own mean, shared",
            "stretch mean, per window",
            "stretch mean, shared",
            "running mean, shared",
            "sliding 1.5-s mean, shared",
        )
    }
    with torch.inference_mode():
        for path in files:
            wav = decode_file(path)[: int(MAX_SECONDS * 16000)]
            fbank = kaldi.fbank(
                torch.from_numpy(wav)[None], num_mel_bins=MEL_BINS, sample_frequency=16000, dither=0.0
            )
            frames = fbank.shape[0]
            starts = list(range(0, frames - WINDOW_FRAMES + 1, HOP_FRAMES))
            if len(starts) < 2:
                continue
            windows = [fbank[s : s + WINDOW_FRAMES] for s in starts]
            reference = normalize(model(torch.stack([w - w.mean(0) for w in windows])), dim=1)

            def score(rows: torch.Tensor) -> torch.Tensor:
                return (rows * reference).sum(1)  # noqa: B023 (used inside the loop only)

            own = [cut(front(fbank - w.mean(0)), [s])[0] for w, s in zip(windows, starts, strict=True)]
            out["own mean, shared"].append(score(torch.stack(own)))
            stretch = fbank - fbank.mean(0)
            per_window = normalize(
                model(torch.stack([stretch[s : s + WINDOW_FRAMES] for s in starts])), dim=1
            )
            out["stretch mean, per window"].append(score(per_window))
            out["stretch mean, shared"].append(score(cut(front(stretch), starts)))
            running = fbank.cumsum(0) / torch.arange(1, frames + 1)[:, None]
            out["running mean, shared"].append(score(cut(front(fbank - running), starts)))
            sums = torch.cat([torch.zeros(1, MEL_BINS), fbank.cumsum(0)])
            index = torch.arange(frames)
            low = (index - WINDOW_FRAMES + 1).clamp(min=0)
            sliding = (sums[index + 1] - sums[low]) / (index + 1 - low)[:, None]
            out["sliding 1.5-s mean, shared"].append(score(cut(front(fbank - sliding), starts)))
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    from speakerflow.streams.settings import Settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--files", type=int, default=40, help="utterances (LibriSpeech and VCTK, seeded order)"
    )
    parser.add_argument("--data", default="", help="corpus folder (default: the shared data)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # a figure, not a race: one thread behaves on a shared machine
    data = Path(args.data or Settings.from_env().shared_data_dir)
    results = cosines(_utterances(data, args.files))
    print(f"cosine to the per-window embedding, 1.5-s windows every 0.5 s, {args.files} utterances")
    print(f"{'variant':<28} {'windows':>7} {'min':>7} {'p1':>7} {'p5':>7} {'median':>7} {'>= 0.99':>8}")
    for name, values in results.items():
        print(
            f"{name:<28} {len(values):>7} {values.min():>7.4f} {np.percentile(values, 1):>7.4f} "
            f"{np.percentile(values, 5):>7.4f} {np.median(values):>7.4f} {np.mean(values >= 0.99):>8.1%}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
