"""`speakerflow` subcommands: eval verify, eval identify, calibrate, verify.

Trials, items and the identification protocol are defined in `processors/evaluation.py`.
`verify --enroll A... --test B` works offline from files (exit 0 accept, 1 reject, 2 error);
`verify --speaker ID FILE` asks a worker over Kafka (the same as `speakers verify ID FILE`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from speakerflow.evaluation.verification import EmbeddingCache, Item
    from speakerflow.processors.embedding import Embedder
    from speakerflow.processors.scoring import Calibration
    from speakerflow.streams.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the top-level parser."""
    from speakerflow.streams.cli.speakers import (
        subcommand_group,  # `eval` is shared with other cli_<area> modules
    )

    esub = subcommand_group(sub, "eval", "evaluations on a speech manifest")

    v = esub.add_parser("verify", help="EER, minDCF and error rates over all same/different-speaker trials")
    _corpus_arguments(v)
    v.add_argument("--crop", default="full,3,2", help="test-side crops: seconds or 'full' (default full,3,2)")
    v.add_argument("--seed", type=int, default=0, help="seed of the random crops")
    v.add_argument(
        "--asnorm",
        type=int,
        default=0,
        metavar="N",
        help="also score with AS-norm against the top N of a cohort of the other speakers (0: off)",
    )
    v.add_argument("--p-target", type=float, default=0.01, help="target prior of minDCF (default 0.01)")
    v.add_argument("--plot", default="", metavar="DIR", help="write DET curve PNGs here")
    v.set_defaults(func=cmd_eval_verify)

    i = esub.add_parser("identify", help="closed-set top-1/top-5 and open-set false accepts/rejects")
    _corpus_arguments(i)
    i.set_defaults(func=cmd_eval_identify)

    c = sub.add_parser("calibrate", help="fit score calibration and thresholds for the embedder's model id")
    _corpus_arguments(c)
    c.add_argument("--crop", default="full", help="test-side crops whose trials are pooled (default full)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", default="", metavar="DIR", help="default: SPEAKERFLOW_CALIBRATION_DIR")
    c.set_defaults(func=cmd_calibrate)

    f = sub.add_parser("verify", help="is the voice of --test the voice of --enroll? (offline, from files)")
    f.add_argument("--enroll", nargs="+", metavar="FILE", help="audio of the claimed speaker")
    f.add_argument("--test", metavar="FILE", help="audio to verify")
    f.add_argument("--embedder", default="", help="default: SPEAKERFLOW_EMBEDDER")
    f.add_argument("--json", action="store_true", help="print the result as JSON")
    f.add_argument(
        "--speaker", default="", help="instead: verify FILE against this enrolled speaker (= speakers verify)"
    )
    f.add_argument("file", nargs="?", help="with --speaker: the audio to verify")
    f.add_argument("--wait", type=float, default=60.0, help="with --speaker: seconds to wait for the result")
    f.set_defaults(func=cmd_verify)


def _corpus_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, help="a folder with manifest.csv, or the CSV itself")
    p.add_argument("--embedder", default="", help="default: SPEAKERFLOW_EMBEDDER")
    p.add_argument("--json", default="", metavar="OUT", help="write the summary as JSON here")
    p.add_argument("--no-vad", action="store_true", help="embed whole files instead of their speech")
    p.add_argument("--batch-size", type=int, default=32)


# --------------------------------------------------------------------------------------------------
# Shared plumbing
# --------------------------------------------------------------------------------------------------


def _progress(items: Iterable[Any], desc: str = "", total: int = 0) -> Iterable[Any]:
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total or None, leave=False, file=sys.stderr, dynamic_ncols=True)


def _settings() -> Settings:
    from speakerflow.streams.settings import Settings

    return Settings.from_env()


def _load_embedder(settings: Settings, name: str) -> Embedder:
    from speakerflow.processors.embedding import load_embedder

    return load_embedder(name or settings.embedder, settings.device, settings.embedding_model_path)


def _apply_threads(settings: Settings) -> None:
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)


def _calibration(settings: Settings, model_id: str) -> Calibration:
    from speakerflow.processors.scoring import default_calibration

    return default_calibration(
        model_id, settings.match_threshold, settings.calibration_path, settings.operating_point
    )


def _describe(cal: Calibration) -> str:
    where = "family default" if cal.source == "default" else cal.source
    return f"{cal.threshold:.4f} (operating point {cal.operating_point}, {where})"


def _corpus(
    args: argparse.Namespace, settings: Settings
) -> tuple[Path, list[Item], EmbeddingCache, Embedder]:
    from speakerflow.evaluation.corpus import load_manifest
    from speakerflow.evaluation.verification import EmbeddingCache, SpeechStore, build_items

    folder = Path(args.manifest)
    folder = folder.parent if folder.suffix == ".csv" else folder
    items = build_items(load_manifest(folder), folder)
    if not items:
        raise SystemExit(f"error: {folder / 'manifest.csv'} has no single-speaker rows")
    _apply_threads(settings)
    embedder = _load_embedder(settings, args.embedder)
    store = SpeechStore(use_vad=not args.no_vad)
    store.load([it.path for it in items], _progress)
    return (
        folder,
        items,
        EmbeddingCache(store, seed=getattr(args, "seed", 0), batch_size=args.batch_size),
        embedder,
    )


def _write_json(path: str, summary: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
        print(f"summary written to {path}")


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _pct(value: float | None) -> str:
    return "    n/a" if value is None else f"{100 * value:6.2f} %"


# --------------------------------------------------------------------------------------------------
# eval verify
# --------------------------------------------------------------------------------------------------


def cmd_eval_verify(args: argparse.Namespace) -> int:
    from speakerflow.evaluation.verification import (
        corpus_summary,
        evaluate_verification,
        parse_crops,
        plot_det,
    )

    started = time.monotonic()
    settings = _settings()
    crops = parse_crops(args.crop)
    folder, items, cache, embedder = _corpus(args, settings)
    cal = _calibration(settings, embedder.model_id)
    run = evaluate_verification(
        items, cache, embedder, crops, cal.threshold, args.asnorm, args.p_target, _progress
    )
    corpus = corpus_summary(items)
    print(
        f"eval verify: {folder} — {corpus['items']} items from {corpus['files']} files, "
        f"{corpus['speakers']} speakers ({corpus['single_utterance_speakers']} single-utterance speakers "
        f"split in halves); model {embedder.model_id}"
    )
    print(f"trials: {run.report['trials']['target']} target, {run.report['trials']['nontarget']} non-target")
    print(f"threshold: {_describe(cal)}")
    _print_conditions(run.report["conditions"], args.p_target)
    summary: dict[str, Any] = {
        "command": "eval verify",
        "manifest": str(folder),
        "model_id": embedder.model_id,
        "embedder": embedder.name,
        "vad": not args.no_vad,
        "crop_seed": args.seed,
        "asnorm_top": args.asnorm,
        "corpus": corpus,
        "no_speech_found": cache.store.no_speech_found,
        "threshold": {"value": cal.threshold, "operating_point": cal.operating_point, "source": cal.source},
        **run.report,
    }
    if args.plot:
        plot_dir = Path(args.plot)
        det = plot_det(run.curves, plot_dir / "det_verify.png", f"DET — {embedder.name}, {folder.name}")
        first = next(iter(run.report["conditions"]))
        by_source = plot_det(
            run.source_curves, plot_dir / "det_verify_by_source.png", f"DET per source — {first}"
        )
        summary["plots"] = [str(det), str(by_source)]
        print(f"DET curves: {det}, {by_source}")
    summary["elapsed_s"] = round(time.monotonic() - started, 1)
    _write_json(args.json, summary)
    return 0


def _print_conditions(conditions: dict[str, dict[str, Any]], p_target: float) -> None:
    print(f"(minDCF: p_target={p_target:g}, C_miss=C_fa=1, normalised)")
    print(
        f"{'condition':<18} {'target':>7} {'non-tgt':>8} {'EER':>9} {'minDCF':>7} "
        f"{'FAR@thr':>9} {'FRR@thr':>9}   EER within source"
    )
    for name, entry in conditions.items():
        _print_row(name, entry)
        for source, sub in entry["by_source"].items():
            within = sub["within_source"]
            note = (
                f"  {_pct(within['eer'])} ({within['trials']['target']}/{within['trials']['nontarget']})"
                if "eer" in within
                else ""
            )
            _print_row(f"  {source}", sub, note)


def _print_row(name: str, entry: dict[str, Any], note: str = "") -> None:
    at = entry.get("at_threshold") or {}
    trials = entry["trials"]
    if "eer" not in entry:
        print(f"{name:<18} {trials['target']:>7} {trials['nontarget']:>8}   ({entry.get('note', '')})")
        return
    print(
        f"{name:<18} {trials['target']:>7} {trials['nontarget']:>8} {_pct(entry['eer'])} "
        f"{entry['min_dcf']:7.3f} {_pct(at.get('far'))} {_pct(at.get('frr'))}{note}"
    )


# --------------------------------------------------------------------------------------------------
# eval identify
# --------------------------------------------------------------------------------------------------


def cmd_eval_identify(args: argparse.Namespace) -> int:
    from speakerflow.evaluation.roc import operating_thresholds
    from speakerflow.evaluation.verification import (
        build_trials,
        corpus_summary,
        cross_fitted_open_set,
        evaluate_identification,
        identification_split,
        trial_scores,
    )
    from speakerflow.processors.scoring import OPERATING_POINTS, load_calibration

    started = time.monotonic()
    settings = _settings()
    folder, items, cache, embedder = _corpus(args, settings)
    cal = _calibration(settings, embedder.model_id)
    thresholds = {"configured": cal.threshold}
    record = load_calibration(settings.calibration_path, embedder.model_id)
    if record is not None:
        known = [k for k in OPERATING_POINTS if k in record["thresholds"]]
        thresholds |= {f"calibrated:{k}": record["thresholds"][k] for k in known}
    # Thresholds fitted on this very manifest's trials: optimistic (same data), shown for reference
    # unless the calibration file was fitted on this manifest anyway.
    embeddings = cache.embed(items, embedder, None, _progress)
    trials = build_trials(items)
    scores = trial_scores(embeddings, embeddings, trials)
    fitted_here = record is not None and record.get("manifest") == str(folder.resolve())
    if trials.target.any() and (~trials.target).any() and not fitted_here:
        here = operating_thresholds(scores[trials.target], scores[~trials.target])
        thresholds |= {f"fitted-here:{k}": v for k, v in here.items()}
    report = evaluate_identification(items, cache, embedder, thresholds, "configured", _progress)
    report["cross_fitted"] = cross_fitted_open_set(items, embeddings, identification_split(items))
    corpus = corpus_summary(items)
    print(
        f"eval identify: {folder} — {report['speakers']} enrolled speakers "
        f"({report['enrol_items']} enrolment items), {report['probes']} probes; model {embedder.model_id}"
    )
    closed = report["closed_set"]
    print(f"closed set: top-1 {_pct(closed['top1'])}   top-5 {_pct(closed['top5'])}")
    for source, sub in report["closed_set_by_source"].items():
        print(
            f"  {source:<14} {sub['probes']:>4} probes   "
            f"top-1 {_pct(sub['top1'])}   top-5 {_pct(sub['top5'])}"
        )
    print(f"open set (leave one speaker out; configured threshold {_describe(cal)}):")
    print(f"  {'threshold':<22} {'value':>7} {'false reject':>13} {'misidentified':>14} {'false accept':>13}")
    for name, rates in report["open_set"].items():
        print(
            f"  {name:<22} {rates['threshold']:7.4f} {_pct(rates['false_reject']):>13} "
            f"{_pct(rates['misidentified']):>14} {_pct(rates['false_accept']):>13}"
        )
    print("  thresholds fitted on the other half of the speakers (2 folds, the probes' speakers unseen):")
    for name, rates in report["cross_fitted"].items():
        values = ", ".join(f"{t:.4f}" for t in rates["thresholds"])
        print(
            f"  {'cross-fitted:' + name:<22} {values:>15} {_pct(rates['false_reject']):>13} "
            f"{_pct(rates['misidentified']):>14} {_pct(rates['false_accept']):>13}"
        )
    configured = report["open_set"]["configured"]
    print("  configured threshold, per source:")
    for source, sub in configured["by_source"].items():
        print(
            f"    {source:<14} false reject {_pct(sub['false_reject'])}   "
            f"false accept {_pct(sub['false_accept'])}"
        )
    summary = {
        "command": "eval identify",
        "manifest": str(folder),
        "model_id": embedder.model_id,
        "embedder": embedder.name,
        "vad": not args.no_vad,
        "corpus": corpus,
        "no_speech_found": cache.store.no_speech_found,
        "threshold": {"value": cal.threshold, "operating_point": cal.operating_point, "source": cal.source},
        **report,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    _write_json(args.json, summary)
    return 0


# --------------------------------------------------------------------------------------------------
# calibrate
# --------------------------------------------------------------------------------------------------


def cmd_calibrate(args: argparse.Namespace) -> int:
    import numpy as np

    from speakerflow.evaluation.roc import fit_calibration
    from speakerflow.evaluation.verification import (
        build_trials,
        corpus_summary,
        crop_label,
        parse_crops,
        trial_scores,
    )
    from speakerflow.processors.scoring import save_calibration

    settings = _settings()
    crops = parse_crops(args.crop)
    folder, items, cache, embedder = _corpus(args, settings)
    trials = build_trials(items)
    if not trials.target.any() or trials.target.all():
        print("error: calibration needs both same-speaker and different-speaker trials", file=sys.stderr)
        return 2
    enrol = cache.embed(items, embedder, None, _progress)
    target, nontarget = [], []
    for crop_s in crops:
        scores = trial_scores(enrol, cache.embed(items, embedder, crop_s, _progress), trials)
        target.append(scores[trials.target])
        nontarget.append(scores[~trials.target])
    record = fit_calibration(
        np.concatenate(target),
        np.concatenate(nontarget),
        embedder.model_id,
        manifest=str(folder.resolve()),
        extra={
            "embedder": embedder.name,
            "crops": [crop_label(c) for c in crops],
            "vad": not args.no_vad,
            "corpus": corpus_summary(items),
            "fitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    path = save_calibration(record, Path(args.out) if args.out else settings.calibration_path)
    print(f"calibration of {embedder.model_id} written to {path}")
    print(
        f"fitted on {record['trials']['target']} target and {record['trials']['nontarget']} non-target "
        f"trials ({', '.join(record['crops'])}) of {folder}"
    )
    print(
        f"logistic: LLR = {record['slope']:.3f} * score {record['offset']:+.3f};  EER {_pct(record['eer'])}"
    )
    print(f"{'operating point':<16} {'threshold':>9} {'FAR':>9} {'FRR':>9}")
    for name, threshold in record["thresholds"].items():
        rates = record["rates"][name]
        mark = "  <- SPEAKERFLOW_OPERATING_POINT" if name == settings.operating_point else ""
        print(f"{name:<16} {threshold:9.4f} {_pct(rates['far'])} {_pct(rates['frr'])}{mark}")
    _write_json(args.json, record)
    return 0


# --------------------------------------------------------------------------------------------------
# verify (offline)
# --------------------------------------------------------------------------------------------------


def cmd_verify(args: argparse.Namespace) -> int:
    if args.speaker:
        return _verify_enrolled(args)
    if not args.enroll or not args.test:
        print("error: give --enroll FILE... and --test FILE (or --speaker ID FILE)", file=sys.stderr)
        return 2
    import numpy as np

    from speakerflow.evaluation.verification import one_torch_thread
    from speakerflow.processors.audio import AudioDecodeError, decode_file
    from speakerflow.streams.stages.requests import speech_or_error

    settings = _settings()
    _apply_threads(settings)
    embedder = _load_embedder(settings, args.embedder)
    try:
        with one_torch_thread():
            enrol = [speech_or_error(decode_file(Path(f))) for f in args.enroll]
            test = speech_or_error(decode_file(Path(args.test)))
    except AudioDecodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    vectors = embedder.embed([*enrol, test])
    # The voiceprint weighs each file by its speech, as gallery enrollment does.
    weights = np.array([len(e) for e in enrol], np.float64)
    voiceprint = (vectors[:-1] * weights[:, None]).sum(0)
    voiceprint /= max(float(np.linalg.norm(voiceprint)), 1e-12)
    score = float(voiceprint @ vectors[-1])
    cal = _calibration(settings, embedder.model_id)
    result = {
        "decision": "accept" if cal.accepts(score) else "reject",
        "score": round(score, 4),
        "confidence": round(cal.confidence(score), 4),
        "threshold": round(cal.threshold, 4),
        "operating_point": cal.operating_point,
        "calibration": cal.source,
        "model_id": embedder.model_id,
        "enroll_speech_s": round(float(weights.sum()) / 16000, 2),
        "test_speech_s": round(len(test) / 16000, 2),
    }
    code = 0 if result["decision"] == "accept" else 1  # as `speakers verify`: scripts can test it
    if args.json:
        print(json.dumps(result))
        return code
    verdict = "same speaker" if result["decision"] == "accept" else "different speaker"
    print(f"decision:   {result['decision'].upper()} ({verdict})")
    print(f"score:      {score:.4f} (cosine, {embedder.model_id})")
    print(f"confidence: {result['confidence']:.3f}")
    print(f"threshold:  {_describe(cal)}")
    print(f"speech:     enroll {result['enroll_speech_s']:.1f} s, test {result['test_speech_s']:.1f} s")
    return code


def _verify_enrolled(args: argparse.Namespace) -> int:
    # Against an enrolled speaker the request goes through the verification topic to a worker; that
    # client is `speakers verify ID FILE` (streams/cli_gallery.py), which this form calls.
    from speakerflow.streams.cli.speakers import cmd_speakers_verify

    if not args.file or args.enroll or args.test:
        print("error: with --speaker give exactly one audio FILE (and no --enroll/--test)", file=sys.stderr)
        return 2
    args.speaker_id = args.speaker
    return cmd_speakers_verify(args)
