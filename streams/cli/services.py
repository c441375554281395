"""Product commands that run the system: demo, broker, worker, api."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from pathlib import Path

from speakerflow.streams.cli.common import database
from speakerflow.streams.cli.common import settings as settings_from_env


def register(sub: argparse._SubParsersAction) -> None:
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

    p = sub.add_parser("api", help="run the HTTP + WebSocket gateway (FastAPI)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=cmd_api)


def cmd_demo(args: argparse.Namespace) -> int:
    from speakerflow.evaluation.scenario import librispeech_scenario  # the demo call is built from the corpus
    from speakerflow.streams.demo import run_demo

    settings = settings_from_env()
    data_dir = Path(settings.shared_data_dir)
    print(f"speakerflow demo — speech from {data_dir}")
    return run_demo(settings, librispeech_scenario(data_dir, turns=args.turns), realtime=not args.fast)


def cmd_broker(args: argparse.Namespace) -> int:
    import os

    from speakerflow.streams.broker import remove_broker_state, start_embedded_broker, write_broker_state

    data_dir = settings_from_env().data_dir
    broker = start_embedded_broker(port=args.port)
    state = write_broker_state(data_dir, broker.bootstrap_servers, os.getpid())
    print(f"embedded broker (Tansu, in memory) on {broker.bootstrap_servers}; Ctrl-C stops it", flush=True)
    print(f"  other speakerflow commands with this SPEAKERFLOW_DATA_DIR find it ({state}); elsewhere:")
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
        remove_broker_state(data_dir, os.getpid())
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from speakerflow.streams.worker import Worker

    settings = settings_from_env()
    roles = tuple(r.strip() for r in args.roles.split(",") if r.strip())
    with database(settings) if "sink" in roles else contextlib.nullcontext("") as url:
        worker = Worker(settings, roles, database_url=url)
        signal.signal(signal.SIGTERM, lambda *_: worker.stop_event.set())
        signal.signal(signal.SIGINT, lambda *_: worker.stop_event.set())
        worker.start()
        worker.run_forever()
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from speakerflow.streams.api import create_app
    from speakerflow.streams.database import migrate

    settings = settings_from_env()
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again; with the default action
    # that would end the process before the block below stops the embedded PostgreSQL.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with database(settings) as url:
        migrate(url)
        base = f"http://{args.host}:{args.port}"
        print(f"speakerflow API on {base}: web console at {base}/, OpenAPI docs at {base}/docs", flush=True)
        uvicorn.run(create_app(settings, url), host=args.host, port=args.port, log_level="warning")
    return 0
