"""Tooling command: loadtest, N live conversations at real-time pace against worker processes."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path


def cmd_loadtest(args: argparse.Namespace) -> int:
    from speakerflow.evaluation.loadtest import format_table, measured, run_sweep
    from speakerflow.streams.settings import Settings

    settings = Settings.from_env()
    if args.broker == "embedded":
        settings = replace(settings, broker_profile="embedded")
    counts = [int(n) for n in str(args.streams).split(",")]
    results = run_sweep(settings, counts, args.minutes, Path(args.out), args.workers)
    print(f"\nmeasured: {measured(settings, results)}\n" + format_table(results))
    holding = [r.streams for r in results if r.holds(args.p95)]
    print(f"\nlargest stream count holding p95 <= {args.p95:g} s: {max(holding) if holding else 'none'}")
    print(f"plot: {Path(args.out) / 'loadtest.png'}; json: {Path(args.out) / 'loadtest.json'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("loadtest", help="play N live conversations at real-time pace and measure latency")
    p.add_argument("--streams", default="4", help="stream count, or a comma list to sweep (e.g. 4,8,16)")
    p.add_argument("--minutes", type=float, default=2.0, help="length of each conversation")
    p.add_argument(
        "--workers", type=int, default=1, help="worker processes sharing the partitions (one consumer group)"
    )
    p.add_argument("--out", default=".data/loadtest", help="folder for the JSON, the PNG and worker logs")
    p.add_argument("--p95", type=float, default=2.0, help="latency target for the verdict (seconds)")
    p.add_argument(
        "--broker",
        choices=["embedded", "configured"],
        default="embedded",
        help="start the embedded broker for the run, or use KAFKA_BOOTSTRAP_SERVERS",
    )
    p.set_defaults(func=cmd_loadtest)
