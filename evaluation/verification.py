"""Speaker verification and identification evaluation on a corpus in the manifest format.

Items. Every single-speaker row (speaker != multi) is one item: the speech of the file (silero VAD
regions, concatenated; the whole file when VAD finds no speech, so nothing is dropped). A speaker with
only one row contributes two items instead, the first and the second half of that speech, so that
single-utterance speakers still give a same-speaker trial (enrol on one half, test on the other).

Verification trials. Every unordered pair of distinct items is one trial; it is a target trial when
both items belong to the same speaker. Of the two items, the one that comes first (manifest order,
the first half before the second) is the enrolment side and is always used whole; the other is the
test side. With a crop of N seconds, the test side is replaced by one random N-s window of its speech
(seeded by the item, so it is the same window in every trial and every run; items shorter than N are
used whole).

Identification. Each speaker is enrolled on the first half of their items (at least one; the first
half of the speech for single-utterance speakers) and every other item is a probe, identified against
all enrolled speakers (closed set: top-1 / top-5). Open set, leave one speaker out: each speaker in turn
is treated as unknown (removed from the gallery) while every other speaker of the manifest stays
enrolled as a distractor; a probe of the unknown speaker whose best score reaches the threshold is a
false accept, a probe of an enrolled speaker whose best score stays below it is a false reject.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from speakerflow.evaluation.corpus import Utterance
from speakerflow.evaluation.roc import equal_error_rate, error_rates, operating_thresholds, threshold_at_far
from speakerflow.processors.audio import decode_file
from speakerflow.processors.embedding import Embedder
from speakerflow.processors.scoring import OPEN_SET_POINTS, OPERATING_POINTS, as_norm
from speakerflow.processors.vad import VadConfig, one_torch_thread, speech_regions

SAMPLE_RATE = 16000
FULL = "full"

Progress = Callable[[Iterable[Any], str, int], Iterable[Any]]


def no_progress(items: Iterable[Any], desc: str = "", total: int = 0) -> Iterable[Any]:
    return items


# --------------------------------------------------------------------------------------------------
# Items and their audio
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    key: str  # unique: the file path, plus "#first-half" / "#second-half" for halves
    speaker: str
    source: str  # the manifest's top folder (librispeech, vctk, fsdd, ...)
    path: Path
    part: str  # "full", "first-half" or "second-half"


def build_items(utterances: Sequence[Utterance], root: Path | str | None = None) -> list[Item]:
    """Evaluation items of the single-speaker rows, in manifest order (see module docstring)."""
    rows = [u for u in utterances if u.speaker != "multi"]
    per_speaker = Counter(u.speaker for u in rows)
    items = []
    for u in rows:
        source = _source_of(u.path, root)
        if per_speaker[u.speaker] == 1:
            for part in ("first-half", "second-half"):
                items.append(Item(f"{u.path}#{part}", u.speaker, source, u.path, part))
        else:
            items.append(Item(str(u.path), u.speaker, source, u.path, FULL))
    return items


def _source_of(path: Path, root: Path | str | None) -> str:
    if root is not None:
        try:
            return Path(path).relative_to(root).parts[0]
        except ValueError:
            pass
    return Path(path).parent.name


def speech_of(samples: np.ndarray, vad: VadConfig | None = None) -> tuple[np.ndarray, bool]:
    """(speech samples, VAD found speech); the whole input when VAD finds none, so no item is lost."""
    regions = speech_regions(samples, SAMPLE_RATE, vad or VadConfig())
    parts = [samples[int(a * SAMPLE_RATE) : int(b * SAMPLE_RATE)] for a, b in regions]
    parts = [p for p in parts if len(p)]
    if not parts:
        return samples, False
    return np.concatenate(parts), True


def crop(samples: np.ndarray, seconds: float, key: str, seed: int = 0) -> np.ndarray:
    """One random window of `seconds` of `samples`, the same for the same (key, seconds, seed)."""
    length = round(seconds * SAMPLE_RATE)
    if len(samples) <= length:
        return samples
    digest = hashlib.sha1(f"{seed}|{seconds}|{key}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    start = int(rng.integers(0, len(samples) - length + 1))
    return samples[start : start + length]


@dataclass
class SpeechStore:
    """Decoded, VAD-trimmed speech per file, kept in memory for the whole run."""

    vad: VadConfig = field(default_factory=VadConfig)
    use_vad: bool = True
    _speech: dict[Path, np.ndarray] = field(default_factory=dict)
    no_speech_found: list[str] = field(default_factory=list)

    def load(self, paths: Iterable[Path], progress: Progress = no_progress) -> None:
        todo = sorted({Path(p) for p in paths} - set(self._speech))
        with one_torch_thread():
            for path in progress(todo, "speech (decode + VAD)", len(todo)):
                self.speech(path)

    def speech(self, path: Path) -> np.ndarray:
        if path not in self._speech:
            audio = decode_file(path)
            if self.use_vad:
                audio, found = speech_of(audio, self.vad)
                if not found:
                    self.no_speech_found.append(str(path))
            self._speech[path] = audio
        return self._speech[path]

    def item_audio(self, item: Item) -> np.ndarray:
        speech = self.speech(item.path)
        middle = len(speech) // 2
        if item.part == "first-half":
            return speech[:middle]
        if item.part == "second-half":
            return speech[middle:]
        return speech

    def seconds(self, item: Item) -> float:
        return len(self.item_audio(item)) / SAMPLE_RATE


def crop_label(seconds: float | None) -> str:
    return FULL if seconds is None else f"{seconds:g}s"


def parse_crops(text: str) -> list[float | None]:
    """'2,3,full' -> [2.0, 3.0, None]."""
    out: list[float | None] = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        if part == FULL:
            out.append(None)
            continue
        value = float(part.removesuffix("s"))
        if value <= 0:
            raise ValueError(f"a crop must be positive seconds or 'full', got {part!r}")
        out.append(value)
    if not out:
        raise ValueError("no crop given: use e.g. 'full' or '2,3,full'")
    return out


@dataclass
class EmbeddingCache:
    """Embeddings per (item, crop, model), computed once per run and batched."""

    store: SpeechStore
    seed: int = 0
    batch_size: int = 32
    _cache: dict[tuple[str, str, str], np.ndarray] = field(default_factory=dict)

    def audio(self, item: Item, crop_s: float | None) -> np.ndarray:
        speech = self.store.item_audio(item)
        return speech if crop_s is None else crop(speech, crop_s, item.key, self.seed)

    def embed(
        self,
        items: Sequence[Item],
        embedder: Embedder,
        crop_s: float | None = None,
        progress: Progress = no_progress,
    ) -> np.ndarray:
        label = crop_label(crop_s)
        todo = [it for it in dict.fromkeys(items) if (it.key, label, embedder.model_id) not in self._cache]
        # Longest first, so that a batch holds inputs of similar length (less padding).
        todo.sort(key=lambda it: -len(self.audio(it, crop_s)))
        batches = [todo[i : i + self.batch_size] for i in range(0, len(todo), self.batch_size)]
        for batch in progress(batches, f"embeddings ({label})", len(batches)):
            vectors = embedder.embed([self.audio(it, crop_s) for it in batch])
            for it, vec in zip(batch, vectors, strict=True):
                self._cache[(it.key, label, embedder.model_id)] = vec
        return np.stack([self._cache[(it.key, label, embedder.model_id)] for it in items])


# --------------------------------------------------------------------------------------------------
# Verification trials and metrics
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trials:
    enrol: np.ndarray  # item index of the enrolment side
    test: np.ndarray  # item index of the test side
    target: np.ndarray  # bool: same speaker

    def __len__(self) -> int:
        return len(self.target)

    @property
    def counts(self) -> dict[str, int]:
        return {"target": int(self.target.sum()), "nontarget": int((~self.target).sum())}

    def subset(self, mask: np.ndarray) -> Trials:
        return Trials(self.enrol[mask], self.test[mask], self.target[mask])


def build_trials(items: Sequence[Item]) -> Trials:
    """Every unordered pair of distinct items; the earlier item is the enrolment side."""
    enrol, test = np.triu_indices(len(items), k=1)
    speakers = np.array([it.speaker for it in items])
    return Trials(enrol.astype(np.int64), test.astype(np.int64), speakers[enrol] == speakers[test])


def trial_scores(enrol_emb: np.ndarray, test_emb: np.ndarray, trials: Trials) -> np.ndarray:
    """Cosine score of each trial (rows are L2-normalised)."""
    out = np.empty(len(trials), np.float64)
    step = 65536
    for i in range(0, len(trials), step):
        e, t = trials.enrol[i : i + step], trials.test[i : i + step]
        out[i : i + step] = np.einsum("ij,ij->i", enrol_emb[e], test_emb[t])
    return out


def det_curve(target: np.ndarray, nontarget: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false-accept rates, miss rates, thresholds) over all thresholds, false-accept rate decreasing."""
    scores = np.concatenate([target, nontarget])
    thresholds = np.unique(scores)
    tar, non = np.sort(target), np.sort(nontarget)
    pmiss = np.searchsorted(tar, thresholds, side="left") / len(tar)
    pfa = 1 - np.searchsorted(non, thresholds, side="left") / len(non)
    return pfa, pmiss, thresholds


def min_dcf(
    target: np.ndarray,
    nontarget: np.ndarray,
    p_target: float = 0.01,
    c_miss: float = 1.0,
    c_fa: float = 1.0,
) -> tuple[float, float]:
    """(normalised minimum detection cost, its threshold), as in the NIST SRE cost function:
    DCF = C_miss P_miss P_target + C_fa P_fa (1 - P_target), divided by the cost of the better
    trivial system, min(C_miss P_target, C_fa (1 - P_target))."""
    pfa, pmiss, thresholds = det_curve(target, nontarget)
    # Also the "reject everything" point, which no observed threshold reaches.
    pfa = np.append(pfa, 0.0)
    pmiss = np.append(pmiss, 1.0)
    thresholds = np.append(thresholds, np.nextafter(thresholds[-1], np.inf))
    cost = c_miss * pmiss * p_target + c_fa * pfa * (1 - p_target)
    best = int(np.argmin(cost))
    return float(cost[best] / min(c_miss * p_target, c_fa * (1 - p_target))), float(thresholds[best])


def verification_metrics(
    target: np.ndarray, nontarget: np.ndarray, threshold: float | None = None, p_target: float = 0.01
) -> dict[str, Any]:
    """EER, minDCF and error rates at `threshold` (and at each operating point) of one trial list."""
    out: dict[str, Any] = {"trials": {"target": len(target), "nontarget": len(nontarget)}}
    if not len(target) or not len(nontarget):
        out["note"] = "needs both target and non-target trials"
        return out
    eer, eer_threshold = equal_error_rate(target, nontarget)
    dcf, dcf_threshold = min_dcf(target, nontarget, p_target)
    out |= {
        "eer": eer,
        "eer_threshold": eer_threshold,
        "min_dcf": dcf,
        "min_dcf_threshold": dcf_threshold,
        "p_target": p_target,
        "operating_points": {
            name: dict(zip(("far", "frr"), error_rates(target, nontarget, t), strict=True)) | {"threshold": t}
            for name, t in operating_thresholds(target, nontarget).items()
        },
    }
    if threshold is not None:
        far, frr = error_rates(target, nontarget, threshold)
        out["at_threshold"] = {"threshold": threshold, "far": far, "frr": frr}
    return out


# --------------------------------------------------------------------------------------------------
# AS-norm over a trial list (cohort = the other speakers of the corpus)
# --------------------------------------------------------------------------------------------------


def speaker_means(embeddings: np.ndarray, speakers: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """One L2-normalised mean embedding per speaker (sorted by speaker id)."""
    names = sorted(set(speakers))
    index = {s: i for i, s in enumerate(names)}
    sums = np.zeros((len(names), embeddings.shape[1]), np.float64)
    np.add.at(sums, np.array([index[s] for s in speakers]), embeddings)
    sums /= np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    return sums.astype(np.float32), names


def excluded_cohort_stats(
    embeddings: np.ndarray, own: np.ndarray, cohort: np.ndarray, top_n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-N cohort statistics of each row with its own speaker and, in turn, each other cohort
    speaker k excluded: mean and std arrays of shape (rows, cohort size), entry [i, k] for the trial
    of row i against speaker k. Closed form: removing one of the top N brings in the (N+1)-th."""
    scores = (embeddings @ cohort.T).astype(np.float64)
    rows, size = scores.shape
    if size < 3:
        raise ValueError("AS-norm needs at least three cohort speakers")
    n = min(top_n, size - 2)
    scores[np.arange(rows), own] = -np.inf
    order = np.argsort(-scores, axis=1)
    ranked = np.take_along_axis(scores, order, axis=1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(size)[None, :].repeat(rows, 0), axis=1)
    s1, s2 = ranked[:, :n].sum(1), (ranked[:, :n] ** 2).sum(1)
    nxt = ranked[:, n]
    inside = rank < n  # excluding speaker k removes it from the top N
    finite = np.where(np.isfinite(scores), scores, 0.0)
    sum1 = np.where(inside, s1[:, None] - finite + nxt[:, None], s1[:, None])
    sum2 = np.where(inside, s2[:, None] - finite**2 + nxt[:, None] ** 2, s2[:, None])
    mean = sum1 / n
    std = np.sqrt(np.maximum(sum2 / n - mean**2, 1e-12))
    return mean, std


def as_norm_trials(
    enrol_emb: np.ndarray,
    test_emb: np.ndarray,
    trials: Trials,
    items: Sequence[Item],
    cohort_emb: np.ndarray,
    cohort_speakers: Sequence[str],
    raw: np.ndarray,
    top_n: int = 50,
) -> np.ndarray:
    """AS-norm of every trial against the cohort, leaving out both speakers of the trial."""
    index = {s: i for i, s in enumerate(cohort_speakers)}
    spk = np.array([index[it.speaker] for it in items])
    mu_e, sd_e = excluded_cohort_stats(enrol_emb, spk, cohort_emb, top_n)
    mu_t, sd_t = excluded_cohort_stats(test_emb, spk, cohort_emb, top_n)
    e, t = trials.enrol, trials.test
    enrol_stats = (mu_e[e, spk[t]], sd_e[e, spk[t]])
    test_stats = (mu_t[t, spk[e]], sd_t[t, spk[e]])
    return as_norm(raw, enrol_stats, test_stats)


# --------------------------------------------------------------------------------------------------
# Per-source breakdown
# --------------------------------------------------------------------------------------------------


def source_masks(items: Sequence[Item], trials: Trials, within: bool = False) -> dict[str, np.ndarray]:
    """Per source: the trials with at least one item of that source (within=True: both items).
    Speaker ids carry their source, so the target trials are the source's own either way; the
    non-targets include its cross-source pairs unless `within`."""
    sources = np.array([it.source for it in items])
    out = {}
    for source in sorted(set(sources)):
        own = sources == source
        out[source] = own[trials.enrol] & own[trials.test] if within else own[trials.enrol] | own[trials.test]
    return out


# --------------------------------------------------------------------------------------------------
# Identification
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IdentificationSplit:
    enrol: dict[str, list[int]]  # speaker -> item indices used to enrol
    probes: list[int]  # item indices identified against the gallery


def identification_split(items: Sequence[Item]) -> IdentificationSplit:
    """First half of each speaker's items enrol (at least one), the rest are probes."""
    by_speaker: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        by_speaker[it.speaker].append(i)
    enrol, probes = {}, []
    for speaker, idx in by_speaker.items():
        k = max(1, len(idx) // 2)
        enrol[speaker] = idx[:k]
        probes.extend(idx[k:])
    return IdentificationSplit(enrol, sorted(probes))


@dataclass(frozen=True)
class ProbeResults:
    """Per probe: its item, the best score over the whole gallery, the best score with its own
    speaker left out (as an unknown speaker), the rank of its own speaker and the top candidate."""

    probes: np.ndarray
    speakers: list[str]
    scores: np.ndarray  # (probes, speakers)
    truth: np.ndarray
    best: np.ndarray
    best_other: np.ndarray
    rank: np.ndarray
    sources: np.ndarray

    @property
    def top1(self) -> np.ndarray:
        return self.rank == 0

    def open_set(self, threshold: float, mask: np.ndarray | None = None) -> dict[str, float]:
        """Open-set rates at `threshold` over the probes in `mask` (default: all)."""
        m = np.ones(len(self.probes), bool) if mask is None else mask
        accepted = self.best[m] >= threshold
        top1 = self.top1[m]
        return {
            "threshold": threshold,
            "probes": int(m.sum()),
            # Known speakers (full gallery): wrongly rejected, or accepted as somebody else.
            "false_reject": float((~accepted).mean()),
            "misidentified": float((accepted & ~top1).mean()),
            "correct_accept": float((accepted & top1).mean()),
            # The same probes as unknown speakers (their own voiceprint left out): wrongly accepted.
            "false_accept": float((self.best_other[m] >= threshold).mean()),
        }


def probe_results(items: Sequence[Item], embeddings: np.ndarray, split: IdentificationSplit) -> ProbeResults:
    speakers = sorted(split.enrol)
    column = {s: i for i, s in enumerate(speakers)}
    prints = np.stack([_voiceprint(embeddings[split.enrol[s]]) for s in speakers])
    probes = np.array(split.probes)
    truth = np.array([column[items[p].speaker] for p in probes])
    scores = embeddings[probes] @ prints.T
    rows = np.arange(len(probes))
    true_score = scores[rows, truth]
    others = scores.copy()
    others[rows, truth] = -np.inf
    return ProbeResults(
        probes=probes,
        speakers=speakers,
        scores=scores,
        truth=truth,
        best=scores.max(1),
        best_other=others.max(1),
        rank=(scores > true_score[:, None]).sum(1),
        sources=np.array([items[p].source for p in probes]),
    )


def identification_metrics(
    items: Sequence[Item],
    embeddings: np.ndarray,
    split: IdentificationSplit,
    thresholds: dict[str, float],
    default_point: str,
) -> dict[str, Any]:
    """Closed-set top-1/top-5 and leave-one-speaker-out open-set rates (see module docstring)."""
    res = probe_results(items, embeddings, split)
    top1, sources = res.top1, res.sources
    out: dict[str, Any] = {
        "speakers": len(res.speakers),
        "probes": len(res.probes),
        "enrol_items": sum(len(v) for v in split.enrol.values()),
        "closed_set": {"top1": float(top1.mean()), "top5": float((res.rank < 5).mean())},
        "closed_set_by_source": {
            s: {
                "probes": int((sources == s).sum()),
                "top1": float(top1[sources == s].mean()),
                "top5": float((res.rank[sources == s] < 5).mean()),
            }
            for s in sorted(set(sources))
        },
        "open_set": {},
        "default_operating_point": default_point,
        "top1_errors": [
            {
                "probe": items[p].key,
                "speaker": items[p].speaker,
                "predicted": res.speakers[int(np.argmax(res.scores[i]))],
                "true_score": float(res.scores[i, res.truth[i]]),
                "best_score": float(res.best[i]),
            }
            for i, p in enumerate(res.probes)
            if not top1[i]
        ],
    }
    for name, t in thresholds.items():
        rates: dict[str, Any] = res.open_set(t)
        rates["by_source"] = {s: res.open_set(t, sources == s) for s in sorted(set(sources))}
        out["open_set"][name] = rates
    return out


def speaker_folds(items: Sequence[Item], folds: int = 2) -> dict[str, int]:
    """Speakers dealt round-robin into folds within each source, so every fold has every source."""
    out: dict[str, int] = {}
    for source in sorted({it.source for it in items}):
        for i, speaker in enumerate(sorted({it.speaker for it in items if it.source == source})):
            out[speaker] = i % folds
    return out


def cross_fitted_open_set(
    items: Sequence[Item], embeddings: np.ndarray, split: IdentificationSplit, folds: int = 2
) -> dict[str, Any]:
    """Open-set rates at thresholds that never saw the probes' speakers: each operating point is
    fitted on the verification trials among the speakers of the other folds, then applied to this
    fold's probes (against the whole gallery); the rates are pooled over all folds."""
    fold_of = speaker_folds(items, folds)
    item_fold = np.array([fold_of[it.speaker] for it in items])
    trials = build_trials(items)
    scores = trial_scores(embeddings, embeddings, trials)
    res = probe_results(items, embeddings, split)
    probe_fold = item_fold[res.probes]
    counts: dict[str, Counter] = defaultdict(Counter)
    fitted: dict[str, list[float]] = defaultdict(list)
    for fold in range(folds):
        fit = (item_fold[trials.enrol] != fold) & (item_fold[trials.test] != fold)
        tar, non = scores[fit & trials.target], scores[fit & ~trials.target]
        unknown = res.best_other[probe_fold != fold]
        if not len(tar) or not len(non) or not len(unknown):
            continue
        mask = probe_fold == fold
        points = operating_thresholds(tar, non) | open_set_thresholds(unknown)
        for name, t in points.items():
            rates = res.open_set(t, mask)
            fitted[name].append(t)
            for key in ("false_reject", "misidentified", "false_accept"):
                counts[name][key] += rates[key] * rates["probes"]
            counts[name]["probes"] += rates["probes"]
    return {
        name: {
            "thresholds": fitted[name],
            "probes": int(c["probes"]),
            **{k: c[k] / max(c["probes"], 1) for k in ("false_reject", "misidentified", "false_accept")},
        }
        for name, c in counts.items()
    }


def open_set_thresholds(unknown_best: np.ndarray) -> dict[str, float]:
    """The threshold of every identification point (`OPEN_SET_POINTS`), fitted on the best scores
    of unknown voices against a gallery (leave-one-speaker-out probes): the share that may pass."""
    return {name: threshold_at_far(unknown_best, share) for name, share in OPEN_SET_POINTS.items()}


def open_set_calibration(items: Sequence[Item], embeddings: np.ndarray) -> dict[str, Any]:
    """Identification points fitted on `items` by leave-one-speaker-out identification (the same
    split as `eval identify`), with the rates they give on those probes, for a calibration record."""
    split = identification_split(items)
    if len(split.enrol) < 2 or not split.probes:
        return {"thresholds": {}, "rates": {}, "identification": {}}
    res = probe_results(items, embeddings, split)
    thresholds = open_set_thresholds(res.best_other)
    rates = {
        name: {k: v for k, v in res.open_set(t).items() if k in ("false_accept", "false_reject")}
        for name, t in thresholds.items()
    }
    return {
        "thresholds": thresholds,
        "rates": rates,
        "identification": {"speakers": len(res.speakers), "probes": len(res.probes)},
    }


def _voiceprint(rows: np.ndarray) -> np.ndarray:
    mean = rows.astype(np.float64).mean(0)
    return (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def plot_det(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str = "") -> Path:
    """DET curves (miss rate against false-accept rate on probit axes) of named (target, nontarget)
    score sets, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probit = np.vectorize(NormalDist().inv_cdf)
    ticks = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4]
    clip = (0.0005, 0.5)
    fig, ax = plt.subplots(figsize=(6, 6))
    for name, (target, nontarget) in curves.items():
        if not len(target) or not len(nontarget):
            continue
        pfa, pmiss, _ = det_curve(target, nontarget)
        eer, _ = equal_error_rate(target, nontarget)
        x = probit(np.clip(pfa, *clip))
        y = probit(np.clip(pmiss, *clip))
        ax.plot(x, y, label=f"{name} (EER {100 * eer:.2f} %)")
    positions = probit(ticks)
    labels = [f"{100 * t:g}" for t in ticks]
    ax.set_xticks(positions, labels)
    ax.set_yticks(positions, labels)
    ax.set_xlim(probit(clip[0]), probit(clip[1]))
    ax.set_ylim(probit(clip[0]), probit(clip[1]))
    ax.plot(ax.get_xlim(), ax.get_ylim(), color="grey", lw=0.5, ls=":")
    ax.set_xlabel("false-accept rate (%)")
    ax.set_ylabel("miss rate (%)")
    ax.set_title(title or "DET")
    ax.grid(True, lw=0.3)
    ax.legend(loc="upper right", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# Whole runs
# --------------------------------------------------------------------------------------------------


@dataclass
class VerificationRun:
    report: dict[str, Any]
    curves: dict[str, tuple[np.ndarray, np.ndarray]]  # condition -> (target, nontarget) scores
    source_curves: dict[str, tuple[np.ndarray, np.ndarray]]  # per source, first condition


def evaluate_verification(
    items: Sequence[Item],
    cache: EmbeddingCache,
    embedder: Embedder,
    crops: Sequence[float | None],
    threshold: float | None = None,
    asnorm_top: int = 0,
    p_target: float = 0.01,
    progress: Progress = no_progress,
) -> VerificationRun:
    """All trials of `items`, scored per crop condition (and with AS-norm when asnorm_top > 0)."""
    trials = build_trials(items)
    masks = source_masks(items, trials)
    within_masks = source_masks(items, trials, within=True)
    enrol_emb = cache.embed(items, embedder, None, progress)
    cohort = speaker_means(enrol_emb, [it.speaker for it in items]) if asnorm_top else None
    report: dict[str, Any] = {"trials": trials.counts, "conditions": {}}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    source_curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for crop_s in crops:
        label = crop_label(crop_s)
        test_emb = enrol_emb if crop_s is None else cache.embed(items, embedder, crop_s, progress)
        raw = trial_scores(enrol_emb, test_emb, trials)
        variants = {label: raw}
        if cohort is not None:
            variants[f"{label}+asnorm"] = as_norm_trials(
                enrol_emb, test_emb, trials, items, cohort[0], cohort[1], raw, asnorm_top
            )
        for name, scores in variants.items():
            # A threshold is on the cosine scale; it means nothing for normalised scores.
            at = threshold if name == label else None
            entry = verification_metrics(scores[trials.target], scores[~trials.target], at, p_target)
            entry["crop_s"] = crop_s
            entry["score"] = "asnorm" if name != label else "cosine"
            entry["by_source"] = {}
            for source, mask in masks.items():
                sub = trials.subset(mask)
                tar, non = scores[mask][sub.target], scores[mask][~sub.target]
                entry["by_source"][source] = _compact(verification_metrics(tar, non, at, p_target))
                inside = within_masks[source]
                entry["by_source"][source]["within_source"] = _compact(
                    verification_metrics(
                        scores[inside & trials.target], scores[inside & ~trials.target], at, p_target
                    )
                )
                if name == label and crop_s == crops[0]:
                    source_curves[source] = (tar, non)
            report["conditions"][name] = entry
            curves[name] = (scores[trials.target], scores[~trials.target])
    return VerificationRun(report, curves, source_curves)


def _compact(metrics: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of a metrics dict (for per-source breakdowns)."""
    keep = ("trials", "eer", "min_dcf", "at_threshold", "note")
    return {k: v for k, v in metrics.items() if k in keep}


def evaluate_identification(
    items: Sequence[Item],
    cache: EmbeddingCache,
    embedder: Embedder,
    thresholds: dict[str, float],
    default_point: str,
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """Closed- and open-set identification over full items (see module docstring)."""
    embeddings = cache.embed(items, embedder, None, progress)
    split = identification_split(items)
    return identification_metrics(items, embeddings, split, thresholds, default_point)


def corpus_summary(items: Sequence[Item]) -> dict[str, Any]:
    speakers = Counter(it.speaker for it in items)
    files = {it.path for it in items}
    halves = sum(1 for it in items if it.part == "first-half")
    return {
        "items": len(items),
        "files": len(files),
        "speakers": len(speakers),
        "single_utterance_speakers": halves,
        "items_by_source": dict(sorted(Counter(it.source for it in items).items())),
    }


def identification_thresholds(
    items: list[Item],
    cache: EmbeddingCache,
    embedder: Embedder,
    configured: float,
    calibration: dict[str, Any] | None,
    manifest: Path,
    progress: Progress = no_progress,
) -> tuple[dict[str, float], np.ndarray]:
    """The thresholds `eval identify` compares, and the items' embeddings: the configured one, the
    calibration file's operating points, and (for reference, optimistic: same data) those fitted on this
    manifest's own trials unless the calibration file was fitted on this manifest anyway."""
    thresholds = {"configured": configured}
    if calibration is not None:
        known = [k for k in (*OPERATING_POINTS, *OPEN_SET_POINTS) if k in calibration["thresholds"]]
        thresholds |= {f"calibrated:{k}": calibration["thresholds"][k] for k in known}
    embeddings = cache.embed(items, embedder, None, progress)
    trials = build_trials(items)
    scores = trial_scores(embeddings, embeddings, trials)
    fitted_here = calibration is not None and calibration.get("manifest") == str(manifest.resolve())
    if trials.target.any() and (~trials.target).any() and not fitted_here:
        here = operating_thresholds(scores[trials.target], scores[~trials.target])
        thresholds |= {f"fitted-here:{k}": v for k, v in here.items()}
    return thresholds, embeddings
