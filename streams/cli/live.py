"""Product commands for calls: play an audio file into the audio topic, tail identified segments."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from speakerflow.streams.cli.common import settings as settings_from_env
from speakerflow.streams.topology import SEGMENTS_IDENTIFIED


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("play", help="stream an audio file into the audio topic")
    p.add_argument("file")
    p.add_argument("--stream-id", required=True)
    p.add_argument("--chunk-s", type=float, default=0.5)
    p.add_argument("--fast", action="store_true", help="send as fast as possible instead of real time")
    p.set_defaults(func=cmd_play, needs_broker=True)

    p = sub.add_parser("tail", help="print identified segments as they arrive")
    p.add_argument("--stream", default=None, help="only this stream id")
    p.add_argument("--live", action="store_true", help="also show provisional (not final) updates")
    p.add_argument("--from-beginning", action="store_true")
    p.set_defaults(func=cmd_tail, needs_broker=True)


def cmd_play(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from speakerflow.processors.audio import decode_file
    from speakerflow.streams.client import play_audio
    from speakerflow.streams.runtime import Publisher

    audio = decode_file(Path(args.file))
    duration_s = len(audio) / 16000
    # Real-time playback of a long call says nothing for minutes otherwise; the bar goes to stderr.
    with tqdm(total=duration_s, unit="s", desc=args.stream_id, disable=args.fast, file=sys.stderr) as bar:
        chunks = play_audio(
            Publisher(settings_from_env()),
            args.stream_id,
            audio,
            args.chunk_s,
            realtime=not args.fast,
            on_chunk=lambda _seq, offset_s: bar.update(min(offset_s + args.chunk_s, duration_s) - bar.n),
        )
    print(f"sent {chunks} chunks ({duration_s:.1f} s) as stream {args.stream_id}")
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    from speakerflow.streams.client import follow
    from speakerflow.streams.demo import format_segment

    settings = settings_from_env()
    try:
        for seg in follow(
            settings,
            settings.topic(SEGMENTS_IDENTIFIED),
            "IdentifiedSegment",
            from_beginning=args.from_beginning,
        ):
            if (args.stream is None or seg["stream_id"] == args.stream) and (seg["is_final"] or args.live):
                print(format_segment(seg, colour=sys.stdout.isatty()), flush=True)
    except KeyboardInterrupt:
        pass
    return 0
