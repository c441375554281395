"""The `speakerflow` command line."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from confluent_kafka import KafkaException

from speakerflow.streams.cli import bench, diarize, evaluate, loadtest, speakers
from speakerflow.streams.logs import setup_logging
from speakerflow.streams.settings import Settings, config_table
from speakerflow.streams.topology import ENROLLMENT_RESULTS, SEGMENTS_IDENTIFIED


def _settings() -> Settings:
    return Settings.from_env()


def cmd_broker(args: argparse.Namespace) -> int:
    from speakerflow.streams.broker import start_embedded_broker

    broker = start_embedded_broker(port=args.port)
    print(f"embedded broker (Tansu, in memory) on {broker.bootstrap_servers}; Ctrl-C stops it", flush=True)
    print(f"  export KAFKA_BOOTSTRAP_SERVERS={broker.bootstrap_servers} SPEAKERFLOW_BROKER_PROFILE=embedded")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5) and broker.process.poll() is None:
            pass
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop()
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    from speakerflow.streams.topology import create_topics

    created = create_topics(_settings())
    print("created: " + (", ".join(created) if created else "nothing (all topics exist)"))
    return 0


def cmd_db_migrate(args: argparse.Namespace) -> int:
    from speakerflow.streams.database import migrate, resolve_database_url

    settings = _settings()
    url, embedded = resolve_database_url(settings.database_url, settings.data_dir)
    try:
        applied = migrate(url)
        print(f"applied migrations: {applied or 'none (up to date)'}")
    finally:
        if embedded:
            embedded.stop()
    return 0


def cmd_db_segments(args: argparse.Namespace) -> int:
    import psycopg

    from speakerflow.streams import queries
    from speakerflow.streams.database import resolve_database_url

    settings = _settings()
    url, embedded = resolve_database_url(settings.database_url, settings.data_dir)
    params = [args.stream] if args.stream else []
    try:
        with psycopg.connect(url) as conn:
            rows = conn.execute(queries.list_segments(args.stream), [*params, args.limit]).fetchall()
    finally:
        if embedded:
            embedded.stop()
    print(f"{'stream':<20} {'start':>8} {'end':>8}  {'label':<11} {'name':<14} conf  final rev")
    for stream, start, end, label, name, conf, final, rev in rows:
        print(f"{stream:<20} {start:8.2f} {end:8.2f}  {label:<11} {name:<14} {conf:.2f}  {final!s:<5} {rev}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from speakerflow.streams.database import resolve_database_url
    from speakerflow.streams.worker import Worker

    settings = _settings()
    roles = tuple(r.strip() for r in args.roles.split(",") if r.strip())
    url, embedded = ("", None)
    if "sink" in roles:
        url, embedded = resolve_database_url(settings.database_url, settings.data_dir)
    worker = Worker(settings, roles, database_url=url)
    signal.signal(signal.SIGTERM, lambda *_: worker.stop_event.set())
    signal.signal(signal.SIGINT, lambda *_: worker.stop_event.set())
    try:
        worker.start()
        worker.run_forever()
    finally:
        if embedded:
            embedded.stop()
    return 0


def cmd_enroll(args: argparse.Namespace) -> int:
    from speakerflow.streams.client import await_result, publish_enrollment
    from speakerflow.streams.runtime import Publisher

    settings = _settings()
    files = [Path(f) for f in args.files]
    for f in files:
        if not f.is_file():
            print(f"error: {f} is not a file", file=sys.stderr)
            return 2
    speaker_id = args.speaker_id or args.name.lower().replace(" ", "-")
    request_id = publish_enrollment(Publisher(settings), speaker_id, args.name, files, args.mode.upper())
    print(f"enrollment request {request_id} for {speaker_id} published")
    if args.wait <= 0:
        return 0
    result = await_result(settings, ENROLLMENT_RESULTS, request_id, args.wait)
    if result["accepted"]:
        print(f"accepted: {result['speech_seconds']:.1f} s of speech, quality {result['quality']:.2f}")
        return 0
    print(f"rejected: {result['reason']}", file=sys.stderr)
    return 1


def cmd_play(args: argparse.Namespace) -> int:
    from speakerflow.processors.audio import decode_file
    from speakerflow.streams.client import play_audio
    from speakerflow.streams.runtime import Publisher

    audio = decode_file(Path(args.file))
    chunks = play_audio(Publisher(_settings()), args.stream_id, audio, args.chunk_s, realtime=not args.fast)
    print(f"sent {chunks} chunks ({len(audio) / 16000:.1f} s) as stream {args.stream_id}")
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    from speakerflow.streams.client import follow
    from speakerflow.streams.demo import format_segment

    settings = _settings()
    try:
        for seg in follow(
            settings,
            settings.topic(SEGMENTS_IDENTIFIED),
            "IdentifiedSegment",
            from_beginning=args.from_beginning,
        ):
            if (args.stream is None or seg["stream_id"] == args.stream) and (seg["is_final"] or args.live):
                print(format_segment(seg), flush=True)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from speakerflow.evaluation.scenario import librispeech_scenario  # the demo call is built from the corpus
    from speakerflow.streams.demo import run_demo

    settings = _settings()
    data_dir = Path(settings.shared_data_dir)
    print(f"speakerflow demo — speech from {data_dir}")
    return run_demo(settings, librispeech_scenario(data_dir, turns=args.turns), realtime=not args.fast)


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from speakerflow.streams.api import create_app
    from speakerflow.streams.database import migrate, resolve_database_url

    settings = _settings()
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again; with the default action
    # that would end the process before the `finally` below stops the embedded PostgreSQL.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    url, embedded = resolve_database_url(settings.database_url, settings.data_dir)
    try:
        migrate(url)
        print(f"speakerflow API on http://{args.host}:{args.port} (OpenAPI docs at /docs)", flush=True)
        uvicorn.run(create_app(settings, url), host=args.host, port=args.port, log_level="warning")
    finally:
        if embedded:
            embedded.stop()
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.markdown:
        print(config_table())
    else:
        for name, value in _settings().redacted().items():
            print(f"{name}={value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="speakerflow", description="Who is speaking, live, on Kafka.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="run the whole system on the embedded broker and show live segments")
    p.add_argument("--fast", action="store_true", help="play the audio faster than real time")
    p.add_argument("--turns", type=int, default=10, help="turns in the demo conversation")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("broker", help="run the embedded Kafka-compatible broker (Tansu) on loopback")
    p.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("worker", help="run the stream processors")
    p.add_argument(
        "--roles",
        default="diarize,match,enroll,verify,sink",
        help="comma-separated stages to run (default: all)",
    )
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("topics", help="manage topics")
    tsub = p.add_subparsers(dest="action", required=True)
    tsub.add_parser("create", help="create every topic that does not exist").set_defaults(func=cmd_topics)

    p = sub.add_parser("db", help="manage the PostgreSQL schema")
    dsub = p.add_subparsers(dest="action", required=True)
    dsub.add_parser("migrate", help="apply pending migrations").set_defaults(func=cmd_db_migrate)
    q = dsub.add_parser("segments", help="list stored segments (starts the embedded server if needed)")
    q.add_argument("--stream", default=None, help="only this stream id")
    q.add_argument("--limit", type=int, default=200)
    q.set_defaults(func=cmd_db_segments)

    p = sub.add_parser("enroll", help="enroll a speaker from audio files")
    p.add_argument("name")
    p.add_argument("files", nargs="+")
    p.add_argument("--speaker-id", default="", help="default: the name, lower-case, dashes for spaces")
    p.add_argument("--mode", choices=["add", "replace"], default="add")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the result (0: don't)")
    p.set_defaults(func=cmd_enroll)

    p = sub.add_parser("play", help="stream an audio file into the audio topic")
    p.add_argument("file")
    p.add_argument("--stream-id", required=True)
    p.add_argument("--chunk-s", type=float, default=0.5)
    p.add_argument("--fast", action="store_true", help="send as fast as possible instead of real time")
    p.set_defaults(func=cmd_play)

    p = sub.add_parser("tail", help="print identified segments as they arrive")
    p.add_argument("--stream", default=None, help="only this stream id")
    p.add_argument("--live", action="store_true", help="also show provisional (not final) updates")
    p.add_argument("--from-beginning", action="store_true")
    p.set_defaults(func=cmd_tail)

    p = sub.add_parser("api", help="run the HTTP + WebSocket gateway (FastAPI)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=cmd_api)

    p = sub.add_parser("config", help="print the effective configuration (secrets masked)")
    p.add_argument("--markdown", action="store_true", help="the documented table of variables")
    p.set_defaults(func=cmd_config)

    for module in (evaluate, speakers, diarize, bench, loadtest):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _settings()
    except ValueError as exc:  # a malformed environment variable
        print(f"error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except KafkaException as exc:
        print(f"error: Kafka at {settings.bootstrap_servers} failed: {exc.args[0]}", file=sys.stderr)
        print("  (is the broker running? `speakerflow broker` starts the embedded one)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
