"""The `speakerflow` command line: product commands (run, feed and query the system) apart from tooling
commands (measure it). Each module of this package registers one group of commands and only parses and
prints; tooling commands import speakerflow.evaluation lazily, inside the command."""

from __future__ import annotations

import argparse
import sys

from confluent_kafka import KafkaException

import speakerflow.streams.cli.admin as admin
import speakerflow.streams.cli.bench as bench
import speakerflow.streams.cli.evaluate as evaluate
import speakerflow.streams.cli.live as live
import speakerflow.streams.cli.loadtest as loadtest
import speakerflow.streams.cli.services as services
import speakerflow.streams.cli.simulate as simulate
import speakerflow.streams.cli.speakers as speakers
from speakerflow.streams.broker import accepts_connections
from speakerflow.streams.cli.common import settings as settings_from_env
from speakerflow.streams.logs import setup_logging
from speakerflow.streams.settings import secret_values

PRODUCT = (services, speakers, live, admin)
TOOLING = (evaluate, bench, simulate, loadtest)
GROUPS = (
    ("product commands", PRODUCT),
    ("tooling commands (measure the product; need the [eval] extra)", TOOLING),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="speakerflow",
        description="Who is speaking, live, on Kafka.",
        usage="speakerflow [-h] COMMAND ...",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # The commands are listed by group in the epilog instead of argparse's single list.
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help=argparse.SUPPRESS, prog="speakerflow"
    )
    sections = []
    for title, modules in GROUPS:
        before = set(sub.choices)
        for module in modules:
            module.register(sub)
        helps = {a.dest: a.help or "" for a in sub._choices_actions if a.dest not in before}
        width = max(len(name) for name in helps) + 2
        sections.append(f"{title}:\n" + "\n".join(f"  {n:<{width}}{h}" for n, h in helps.items()))
    parser.epilog = "\n\n".join(sections) + "\n\n`speakerflow COMMAND --help` describes one command."
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_env()
    except ValueError as exc:  # a malformed environment variable
        print(f"error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format, secret_values(settings))
    if _needs_broker(args) and not accepts_connections(settings.bootstrap_servers, timeout_s=2.0):
        # One line instead of librdkafka retrying (and logging every refused connection) for half a minute.
        print(
            f"error: no Kafka broker answers at {settings.bootstrap_servers}: run `speakerflow broker` in "
            "another shell (it is found by itself), or set KAFKA_BOOTSTRAP_SERVERS",
            file=sys.stderr,
        )
        return 1
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except FileNotFoundError as exc:  # a mistyped path or a folder not made yet: say which, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KafkaException as exc:
        print(f"error: Kafka at {settings.bootstrap_servers} failed: {exc.args[0]}", file=sys.stderr)
        print("  (is the broker running? `speakerflow broker` starts the embedded one)", file=sys.stderr)
        return 1


def _needs_broker(args: argparse.Namespace) -> bool:
    """Commands that talk to Kafka at once set `needs_broker` (True, or a test of their arguments)."""
    needs = getattr(args, "needs_broker", False)
    return bool(needs(args) if callable(needs) else needs)


if __name__ == "__main__":
    sys.exit(main())
