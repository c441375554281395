"""Tooling commands that measure the product: eval verify | identify | gallery | diarize, calibrate.

They parse, call speakerflow.evaluation (imported lazily, inside each command: the `[eval]` extra) and
print. Trials, items and the identification protocol are defined in evaluation/verification.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from speakerflow.streams.cli.common import diarizer_arguments, group
from speakerflow.streams.cli.common import embedder as configured_embedder
from speakerflow.streams.cli.speakers import describe as _describe

if TYPE_CHECKING:
    from speakerflow.processors.embedding import Embedder
    from speakerflow.processors.scoring import Calibration
    from speakerflow.streams.settings import Settings

DEFAULT_LATENCIES = "0.5,1,2,5"


def register(sub: argparse._SubParsersAction) -> None:
    esub = group(sub, "eval", "evaluations on a speech manifest (figures, not tests)")

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

    q = esub.add_parser("gallery", help="identification in simulated conversations (enrolled + strangers)")
    q.add_argument("--manifest", required=True, help="corpus folder (or its manifest.csv)")
    q.add_argument("--embedder", default="", help="default: SPEAKERFLOW_EMBEDDER")
    q.add_argument("--threshold", type=float, default=0.0, help="0: the model's default operating point")
    q.add_argument("--strangers", type=float, default=0.25, help="share of speakers never enrolled")
    q.add_argument("--min-enroll-s", type=float, default=4.0, help="enrollment speech gate for this eval")
    q.add_argument("--no-revision", action="store_true", help="skip the end-of-stream revision labelling")
    q.add_argument(
        "--threads", type=int, default=0, help="torch threads (default: SPEAKERFLOW_TORCH_THREADS or 1)"
    )
    q.add_argument(
        "--seed",
        default="0",
        help="speaker split seed; several (e.g. 1,2,3,4) run one evaluation each and add a pooled table",
    )
    q.add_argument("--json", default="")
    q.set_defaults(func=cmd_eval_gallery)

    p = esub.add_parser(
        "diarize", help="DER/JER of live and revised diarization on a manifest's multi-speaker files"
    )
    p.add_argument("--manifest", required=True, help="corpus folder or its manifest.csv")
    p.add_argument("--latency", default=DEFAULT_LATENCIES, help="live latencies to score (seconds)")
    p.add_argument("--chunk-s", type=float, default=0.5, help="audio chunk length fed to the diarizer")
    p.add_argument("--json", default="", help="write the full report (totals and per file) here")
    p.add_argument("--plot", default="", help="folder for one timeline PNG per file")
    p.add_argument(
        "--baselines",
        action="store_true",
        help="also run the two baselines and the peers (pyannote 3.1 recipe; senko if its deps are here)",
    )
    p.add_argument("--embedder", default="", help="embedder name (default: SPEAKERFLOW_EMBEDDER)")
    p.add_argument("--limit", type=int, default=0, help="only the first N files")
    diarizer_arguments(p)
    p.set_defaults(func=cmd_eval_diarize)

    c = sub.add_parser("calibrate", help="fit score calibration and thresholds for the embedder's model id")
    _corpus_arguments(c)
    c.add_argument("--crop", default="full", help="test-side crops whose trials are pooled (default full)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", default="", metavar="DIR", help="default: SPEAKERFLOW_CALIBRATION_DIR")
    c.set_defaults(func=cmd_calibrate)


def _corpus_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, help="a folder with manifest.csv, or the CSV itself")
    p.add_argument("--embedder", default="", help="default: SPEAKERFLOW_EMBEDDER")
    p.add_argument("--json", default="", metavar="OUT", help="write the summary as JSON here")
    p.add_argument("--no-vad", action="store_true", help="embed whole files instead of their speech")
    p.add_argument("--batch-size", type=int, default=32)


def _progress(items: Iterable[Any], desc: str = "", total: int = 0) -> Iterable[Any]:
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total or None, leave=False, file=sys.stderr, dynamic_ncols=True)


def _settings() -> Settings:
    from speakerflow.streams.settings import Settings

    return Settings.from_env()


def _calibration(settings: Settings, model_id: str) -> Calibration:
    from speakerflow.processors.scoring import default_calibration

    return default_calibration(
        model_id, settings.match_threshold, settings.calibration_path, settings.operating_point
    )


def _corpus(
    args: argparse.Namespace, settings: Settings
) -> tuple[Path, list, Any, Embedder]:  # folder, items, embedding cache, embedder
    from speakerflow.evaluation.corpus import load_manifest
    from speakerflow.evaluation.verification import EmbeddingCache, SpeechStore, build_items

    folder = Path(args.manifest)
    folder = folder.parent if folder.suffix == ".csv" else folder
    items = build_items(load_manifest(folder), folder)
    if not items:
        raise SystemExit(f"error: {folder / 'manifest.csv'} has no single-speaker rows")
    embedder = configured_embedder(args.embedder)
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


def cmd_eval_identify(args: argparse.Namespace) -> int:
    from speakerflow.evaluation.verification import (
        corpus_summary,
        cross_fitted_open_set,
        evaluate_identification,
        identification_split,
        identification_thresholds,
    )
    from speakerflow.processors.scoring import load_calibration

    started = time.monotonic()
    settings = _settings()
    folder, items, cache, embedder = _corpus(args, settings)
    cal = _calibration(settings, embedder.model_id)
    record = load_calibration(settings.calibration_path, embedder.model_id)
    thresholds, embeddings = identification_thresholds(
        items, cache, embedder, cal.threshold, record, folder, _progress
    )
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
    print(
        "  thresholds fitted on the other half of the speakers (2 folds, the probes' speakers unseen;"
        " open1: 1 % of the other half's left-out speakers pass):"
    )
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


def cmd_calibrate(args: argparse.Namespace) -> int:
    import numpy as np

    from speakerflow.evaluation.roc import error_rates, fit_calibration
    from speakerflow.evaluation.verification import (
        build_trials,
        corpus_summary,
        crop_label,
        open_set_calibration,
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
    identification = open_set_calibration(items, enrol)
    for name, threshold in identification["thresholds"].items():
        far, frr = error_rates(np.concatenate(target), np.concatenate(nontarget), threshold)
        record["thresholds"][name] = threshold
        record["rates"][name] = {"far": far, "frr": frr, **identification["rates"][name]}
    record["identification"] = identification["identification"]
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
        open_set = (
            f"  (1:N, each speaker left out: false accepts {_pct(rates['false_accept'])}, "
            f"false rejects {_pct(rates['false_reject'])})"
            if "false_accept" in rates
            else ""
        )
        print(f"{name:<16} {threshold:9.4f} {_pct(rates['far'])} {_pct(rates['frr'])}{open_set}{mark}")
    _write_json(args.json, record)
    return 0


def cmd_eval_gallery(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from speakerflow.evaluation.gallery import DEFAULT_VARIANTS, EvalConfig, evaluate, pool_scores
    from speakerflow.processors.embedding import load_embedder
    from speakerflow.processors.scoring import default_calibration

    settings = _settings()
    # Small per-chunk model calls gain nothing from more intra-op threads and pay for waking them
    # (measured on a busy 2-core machine, 15 s of audio: 1.3 s on one thread, 18-60 s on two).
    torch.set_num_threads(args.threads or settings.torch_threads or 1)
    embedder = load_embedder(
        args.embedder or settings.embedder, settings.device, settings.embedding_model_path
    )
    calibration = default_calibration(embedder.model_id, args.threshold or settings.match_threshold)
    try:
        seeds = [int(part) for part in str(args.seed).split(",") if part.strip()]
    except ValueError:
        print(f"error: --seed wants integers separated by commas, got {args.seed!r}", file=sys.stderr)
        return 2
    reports = []
    for seed in seeds:
        config = EvalConfig(stranger_share=args.strangers, min_enroll_speech_s=args.min_enroll_s, seed=seed)
        bar = tqdm(desc=f"conversations (seed {seed})", unit="conv", file=sys.stderr)

        def on_conversation(done: int, total: int, bar=bar) -> None:
            bar.total = total
            bar.update(done - bar.n)

        report = evaluate(
            args.manifest,
            embedder,
            calibration,
            config,
            DEFAULT_VARIANTS,
            revision=not args.no_revision,
            progress=lambda msg: print(msg, file=sys.stderr),
            conversation_progress=on_conversation,
        )
        bar.close()
        print(f"\n== seed {seed}")
        _print_eval(report)
        reports.append(report)
    pooled = pool_scores(reports) if len(reports) > 1 else []
    if pooled:
        _print_pooled(seeds, pooled)
    if args.json:
        document = (
            reports[0].to_json()
            if len(reports) == 1
            else {"seeds": seeds, "reports": [r.to_json() for r in reports], "pooled": pooled}
        )
        Path(args.json).write_text(json.dumps(document, indent=2))
        print(f"wrote {args.json}")
    return 0


def _print_pooled(seeds: list[int], pooled: list[dict]) -> None:
    print(f"\n== pooled over seeds {', '.join(map(str, seeds))} (time-weighted)")
    print(
        f"{'matcher':<26} {'labels':<9} {'enrolled ok':>11} {'wrong name':>10} {'UNKNOWN':>8} "
        f"{'stranger UNK':>12}"
    )
    for p in pooled:
        print(
            f"{p['variant']:<26} {p['labelling']:<9} {p['enrolled_correct']:>11.2%} "
            f"{p['enrolled_wrong_name']:>10.2%} {p['enrolled_unknown']:>8.2%} {p['stranger_unknown']:>12.2%}"
        )


def _print_eval(report) -> None:
    print(
        f"\n{report.speakers} speakers: {report.enrolled} enrolled, {report.strangers} not enrolled; "
        f"{report.conversations} conversations, {report.audio_s / 60:.1f} min audio "
        f"({report.speech_s / 60:.1f} min speech); model {report.model_id}, threshold {report.threshold}"
    )
    refused = {s: r for s, r in report.not_enrolled.items() if r.startswith("enrollment refused")}
    for speaker, reason in refused.items():
        print(f"  {speaker}: {reason}")
    print(
        f"\n{'matcher':<26} {'labels':<9} {'enrolled ok':>11} {'wrong name':>10} {'UNKNOWN':>8} "
        f"{'stranger UNK':>12} {'segments ok':>11} {'enrolled segs ok':>16} {'first emit ok':>13} "
        f"{'relabels':>8}"
    )
    for s in report.scores:
        print(
            f"{s.variant:<26} {s.labelling:<9} {s.enrolled_correct:>11.2%} {s.enrolled_wrong_name:>10.2%} "
            f"{s.enrolled_unknown:>8.2%} {s.stranger_unknown:>12.2%} {s.segment_accuracy:>11.2%} "
            f"{s.enrolled_segment_accuracy:>16.2%} "
            f"{s.first_emission_enrolled_correct:>13.2%} {s.relabelled_segments:>8}"
        )
    print(f"compute: {report.seconds}")


def _percent(value: float) -> str:
    return f"{100 * value:5.1f}"


def print_totals(totals: dict[str, dict], out=None) -> None:
    print(
        f"{'labelling':<18} {'DER':>6} {'miss':>5} {'FA':>5} {'conf':>5} | {'DER c0':>6} | "
        f"{'JER':>6} | {'count ok':>8}  (collar 0.25 s unless c0; %)",
        file=out,
    )
    for name, t in totals.items():
        print(
            f"{name:<18} {_percent(t['der@0.25'])} {_percent(t['missed@0.25'])} "
            f"{_percent(t['false_alarm@0.25'])} {_percent(t['confusion@0.25'])} | {_percent(t['der@0.0'])} | "
            f"{_percent(t['jer@0.25'])} | {_percent(t['count_exact'])}",
            file=out,
        )


def cmd_eval_diarize(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from speakerflow.evaluation.diarization import Scorer, evaluate_item, multi_speaker_items, plot_timeline
    from speakerflow.evaluation.overlap_runner import configured_runner

    items = multi_speaker_items(args.manifest)
    if args.limit:
        items = items[: args.limit]
    if not items:
        print(f"error: no speaker=multi rows with an RTTM in {args.manifest}", file=sys.stderr)
        return 2
    latencies = tuple(float(x) for x in args.latency.split(",") if x.strip())
    embedder = configured_embedder(args.embedder)
    runner, config = configured_runner(args.diarizer, embedder, args.set, args.chunk_s)
    peers, baseline_vad = None, None
    if args.baselines:
        from speakerflow.streams.settings import Settings
        from speakerflow.streams.stages.diarize import diarizer_config

        # the baselines cut speech as the light diarizer does, whichever mode is measured
        baseline_vad = diarizer_config(Settings.from_env(), embedder.name).vad
        from speakerflow.evaluation.peers import build_peers

        peers = build_peers(embedder.embed, log=lambda line: print(line, file=sys.stderr))
    scorer = Scorer()
    plot_dir = Path(args.plot) if args.plot else None
    if plot_dir:
        plot_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    audio_s = 0.0
    for item in tqdm(items, desc="files", unit="file"):
        result = evaluate_item(
            item,
            config,
            embedder.embed,
            scorer,
            latencies,
            args.chunk_s,
            args.baselines,
            runner,
            peers,
            baseline_vad,
        )
        audio_s += result.run.duration_s
        if plot_dir:
            shown = ("revision", f"live@{2:g}s" if 2.0 in latencies else "live_final")
            plot_timeline(result, plot_dir / f"{item.file_id}.png", shown)
    totals = scorer.totals()
    print(f"{len(items)} files, {audio_s / 60:.1f} min of audio, {time.perf_counter() - started:.0f} s")
    print_totals(totals)
    if args.json:
        report = {
            "manifest": str(args.manifest),
            "embedder": embedder.model_id,
            "config": _config_json(config),
            "latencies": latencies,
            "chunk_s": args.chunk_s,
            "totals": totals,
            "files": scorer.rows,
        }
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"report written to {args.json}")
    return 0


def _config_json(config) -> dict:
    from dataclasses import asdict

    return asdict(config)
