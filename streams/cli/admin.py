"""Product commands that set the system up: topics, db, config, models."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from speakerflow.streams.cli.common import database, group
from speakerflow.streams.cli.common import settings as settings_from_env
from speakerflow.streams.settings import config_table


def register(sub: argparse._SubParsersAction) -> None:
    tsub = group(sub, "topics", "manage topics")
    tsub.add_parser("create", help="create every topic that does not exist").set_defaults(
        func=cmd_topics, needs_broker=True
    )

    dsub = group(sub, "db", "manage the PostgreSQL schema")
    dsub.add_parser("migrate", help="apply pending migrations").set_defaults(func=cmd_db_migrate)
    q = dsub.add_parser("segments", help="list stored segments (starts the embedded server if needed)")
    q.add_argument("--stream", default=None, help="only this stream id")
    q.add_argument("--limit", type=int, default=200)
    q.add_argument(
        "--all-revisions",
        action="store_true",
        help="every stored revision (the history); default: the current labelling, each stream's highest",
    )
    q.set_defaults(func=cmd_db_segments)

    p = sub.add_parser("config", help="print the effective configuration (secrets masked)")
    p.add_argument("--markdown", action="store_true", help="the documented table of variables")
    p.set_defaults(func=cmd_config)

    d = group(sub, "models", "model weights").add_parser(
        "download",
        help="fetch speechbrain/spkrec-ecapa-voxceleb for the `ecapa` embedder (needs internet)",
    )
    d.add_argument("--target", default=None, help="directory (default: SPEAKERFLOW_DATA_DIR/models/ecapa)")
    d.set_defaults(func=cmd_models_download)


def cmd_topics(args: argparse.Namespace) -> int:
    from speakerflow.streams.topology import create_topics

    created = create_topics(settings_from_env())
    print("created: " + (", ".join(created) if created else "nothing (all topics exist)"))
    return 0


def cmd_db_migrate(args: argparse.Namespace) -> int:
    from speakerflow.streams.database import migrate

    with database(settings_from_env()) as url:
        applied = migrate(url)
        print(f"applied migrations: {applied or 'none (up to date)'}")
    return 0


def cmd_db_segments(args: argparse.Namespace) -> int:
    import psycopg

    from speakerflow.streams import queries

    params = [args.stream] if args.stream else []
    with database(settings_from_env()) as url, psycopg.connect(url) as conn:
        rows = conn.execute(
            queries.list_segments(args.stream, args.all_revisions), [*params, args.limit]
        ).fetchall()
    print(f"{'stream':<20} {'start':>8} {'end':>8}  {'label':<11} {'name':<14} conf  final rev")
    for stream, start, end, label, name, conf, final, rev in rows:
        print(f"{stream:<20} {start:8.2f} {end:8.2f}  {label:<11} {name:<14} {conf:.2f}  {final!s:<5} {rev}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.markdown:
        print(config_table())
    else:
        for name, value in settings_from_env().redacted().items():
            print(f"{name}={value}")
    return 0


def cmd_models_download(args: argparse.Namespace) -> int:
    from speakerflow.processors.embedding import ECAPA_HUB_ID, EcapaEmbedder, default_models_dir
    from speakerflow.streams.settings import Settings

    target = Path(args.target or Path(Settings.from_env().data_dir) / "models" / "ecapa").resolve()
    print(f"fetching {ECAPA_HUB_ID} into {target} ...", flush=True)
    try:
        _fetch_hub_model(ECAPA_HUB_ID, target)
        embedder = EcapaEmbedder(str(target), "cpu")
    except Exception as exc:
        print(
            f"error: could not download {ECAPA_HUB_ID} ({type(exc).__name__}: {exc}).\n"
            "This needs HTTPS access to huggingface.co. Without it, copy a downloaded model directory "
            "(hyperparams.yaml, embedding_model.ckpt, mean_var_norm_emb.ckpt, classifier.ckpt, "
            "label_encoder.txt) to this machine and set EMBEDDING_MODEL_PATH to it.",
            file=sys.stderr,
        )
        return 1
    print(f"ok: {embedder.model_id}, {embedder.dim}-dim embeddings")
    if target != default_models_dir():
        print(f"use it with: export SPEAKERFLOW_EMBEDDER=ecapa EMBEDDING_MODEL_PATH={target}")
    else:
        print("use it with: export SPEAKERFLOW_EMBEDDER=ecapa")
    return 0


def _fetch_hub_model(hub_id: str, target: Path) -> None:
    """SpeechBrain's own fetching, copying real files (not cache symlinks) into `target`."""
    from speechbrain.inference.speaker import EncoderClassifier
    from speechbrain.utils.fetching import LocalStrategy

    EncoderClassifier.from_hparams(
        source=hub_id, savedir=str(target), download_only=True, local_strategy=LocalStrategy.COPY_SKIP_CACHE
    )
