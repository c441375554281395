"""Build a SpeechBrain ECAPA-TDNN checkpoint directory with random weights.

The hub model `speechbrain/spkrec-ecapa-voxceleb` cannot be fetched on offline machines, yet tests and
benchmarks must load ECAPA through SpeechBrain's real `EncoderClassifier.from_hparams` path. This writes
a directory in exactly the hub's layout (`hyperparams.yaml` whose pretrainer paths point at the
directory, `embedding_model.ckpt`, `classifier.ckpt`, `mean_var_norm_emb.ckpt`, `label_encoder.txt`)
with seeded random weights. The BatchNorm running statistics are calibrated on a few seconds of
synthetic audio, so activations have realistic scales (fp16 / int8 agreement measured on such a model
means something; with untouched running stats the deep layers saturate).
"""

from __future__ import annotations

from pathlib import Path

import torch

SAMPLE_RATE = 16000
# The hub model: channels [1024]*4 + [3072]. The small variant keeps SpeechBrain's class defaults.
VOXCELEB_CHANNELS = 1024
SMALL_CHANNELS = 512

_HYPERPARAMS = """\
# ECAPA-TDNN in the layout of speechbrain/spkrec-ecapa-voxceleb, random weights ({description}).
n_mels: 80
pretrained_path: {directory}
out_n_neurons: {speakers}

compute_features: !new:speechbrain.lobes.features.Fbank
    n_mels: !ref <n_mels>

mean_var_norm: !new:speechbrain.processing.features.InputNormalization
    norm_type: sentence
    std_norm: False

embedding_model: !new:speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN
    input_size: !ref <n_mels>
    channels: [{c}, {c}, {c}, {c}, {c3}]
    kernel_sizes: [5, 3, 3, 3, 1]
    dilations: [1, 2, 3, 4, 1]
    attention_channels: 128
    lin_neurons: {dim}

classifier: !new:speechbrain.lobes.models.ECAPA_TDNN.Classifier
    input_size: {dim}
    out_neurons: !ref <out_n_neurons>

mean_var_norm_emb: !new:speechbrain.processing.features.InputNormalization
    norm_type: global
    std_norm: False

modules:
    compute_features: !ref <compute_features>
    mean_var_norm: !ref <mean_var_norm>
    embedding_model: !ref <embedding_model>
    mean_var_norm_emb: !ref <mean_var_norm_emb>
    classifier: !ref <classifier>

label_encoder: !new:speechbrain.dataio.encoder.CategoricalEncoder

pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        embedding_model: !ref <embedding_model>
        mean_var_norm_emb: !ref <mean_var_norm_emb>
        classifier: !ref <classifier>
        label_encoder: !ref <label_encoder>
    paths:
        embedding_model: !ref <pretrained_path>/embedding_model.ckpt
        mean_var_norm_emb: !ref <pretrained_path>/mean_var_norm_emb.ckpt
        classifier: !ref <pretrained_path>/classifier.ckpt
        label_encoder: !ref <pretrained_path>/label_encoder.txt
"""


def synthetic_speechlike(batch: int, seconds: float, generator: torch.Generator) -> torch.Tensor:
    """(batch, samples) of amplitude-modulated coloured noise with pitch-like harmonics.

    Not speech, but its spectrum and level vary over time like speech does, which is all that BatchNorm
    calibration and speed measurements need.
    """
    n = int(seconds * SAMPLE_RATE)
    t = torch.arange(n) / SAMPLE_RATE
    noise = torch.randn(batch, n, generator=generator)
    coloured = torch.cumsum(noise, dim=1)
    coloured = coloured - torch.nn.functional.avg_pool1d(coloured[:, None], 401, 1, 200)[:, 0, :n]
    f0 = 90 + 160 * torch.rand(batch, 1, generator=generator)
    voiced = sum(torch.sin(2 * torch.pi * f0 * k * t) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * torch.sin(2 * torch.pi * (2 + 3 * torch.rand(batch, 1, generator=generator)) * t)
    wav = envelope * (0.6 * voiced + 0.05 * coloured)
    return (0.1 * wav / wav.abs().amax(dim=1, keepdim=True)).float()


def build_random_ecapa_checkpoint(
    directory: Path | str,
    channels: int = SMALL_CHANNELS,
    seed: int = 0,
    embedding_dim: int = 192,
    speakers: int = 16,
    calibration_seconds: float = 8.0,
) -> Path:
    """Write a loadable SpeechBrain ECAPA checkpoint with random weights to `directory` and return it.

    `channels=1024` gives the VoxCeleb-size model (20.8 M parameters), 512 a small one (6.2 M) for fast
    tests. The same arguments give the same weights (and model id); another seed gives other weights.
    """
    from speechbrain.dataio.encoder import CategoricalEncoder
    from speechbrain.lobes.features import Fbank
    from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN, Classifier
    from speechbrain.processing.features import InputNormalization

    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ECAPA_TDNN(
            80,
            channels=[channels] * 4 + [channels * 3],
            kernel_sizes=[5, 3, 3, 3, 1],
            dilations=[1, 2, 3, 4, 1],
            attention_channels=128,
            lin_neurons=embedding_dim,
        )
        classifier = Classifier(embedding_dim, out_neurons=speakers)
    features = Fbank(n_mels=80)
    sentence_norm = InputNormalization(norm_type="sentence", std_norm=False)
    emb_norm = InputNormalization(norm_type="global", std_norm=False)

    # Calibrate BatchNorm running stats (cumulative average) and the embedding normaliser in train mode.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    emb_norm.train()
    with torch.no_grad():
        for _ in range(max(1, int(calibration_seconds // 8))):
            wav = synthetic_speechlike(4, 2.0, generator)
            feats = sentence_norm(features(wav), torch.ones(len(wav)))
            emb = model(feats)
            emb_norm(emb, torch.ones(len(emb)))
    model.eval()

    torch.save(model.state_dict(), directory / "embedding_model.ckpt")
    torch.save(classifier.state_dict(), directory / "classifier.ckpt")
    emb_norm._save(directory / "mean_var_norm_emb.ckpt")
    labels = CategoricalEncoder()
    labels.update_from_iterable([f"spk{i:05d}" for i in range(speakers)])
    labels.save(directory / "label_encoder.txt")
    (directory / "hyperparams.yaml").write_text(
        _HYPERPARAMS.format(
            description=f"channels={channels}, seed={seed}",
            directory=directory,
            speakers=speakers,
            c=channels,
            c3=channels * 3,
            dim=embedding_dim,
        )
    )
    return directory
