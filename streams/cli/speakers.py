"""Product commands about speakers: enroll, speakers list|show|delete, verify, gallery export|import.

`verify --enroll A... --test B` compares files offline (exit 0 accept, 1 reject, 2 error);
`verify --speaker ID FILE` asks a worker over Kafka whether FILE is the enrolled speaker ID.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from speakerflow.streams.cli.common import embedder as load_embedder
from speakerflow.streams.cli.common import group
from speakerflow.streams.cli.common import settings as settings_from_env
from speakerflow.streams.topology import ENROLLMENT_RESULTS, VERIFICATION_RESULTS

if TYPE_CHECKING:
    from speakerflow.processors.scoring import Calibration


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("enroll", help="enroll a speaker from audio files")
    p.add_argument("name")
    p.add_argument("files", nargs="+")
    p.add_argument("--speaker-id", default="", help="default: the name, lower-case, dashes for spaces")
    p.add_argument("--mode", choices=["add", "replace"], default="add")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the result (0: don't)")
    p.set_defaults(func=cmd_enroll, needs_broker=True)

    ssub = group(sub, "speakers", "list, show or delete enrolled speakers")
    q = ssub.add_parser("list", help="every enrolled speaker (read from the gallery topic)")
    q.add_argument("--model", default="", help="only voiceprints of this model id")
    q.add_argument("--json", action="store_true", help="one JSON object per line")
    q.set_defaults(func=cmd_speakers_list)
    q = ssub.add_parser("show", help="one speaker's voiceprint")
    q.add_argument("speaker_id")
    q.add_argument("--json", action="store_true", help="the exported JSON form (base64 float32 vector)")
    q.set_defaults(func=cmd_speakers_show)
    q = ssub.add_parser("delete", help="delete a speaker everywhere (gallery, matchers, database)")
    q.add_argument("speaker_id")
    q.add_argument("--force", action="store_true", help="publish the deletion even if not enrolled")
    q.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the result (0: don't)")
    q.set_defaults(func=cmd_speakers_delete)
    for action in ssub.choices.values():
        action.add_argument("--timeout", type=float, default=30.0, help=argparse.SUPPRESS)
        action.set_defaults(needs_broker=True)

    f = sub.add_parser(
        "verify", help="is this the same voice? files against files (offline), or against an enrolled speaker"
    )
    f.add_argument("--enroll", nargs="+", metavar="FILE", help="audio of the claimed speaker")
    f.add_argument("--test", metavar="FILE", help="audio to verify")
    f.add_argument("--embedder", default="", help="offline: default SPEAKERFLOW_EMBEDDER")
    f.add_argument("--json", action="store_true", help="print the result as JSON")
    f.add_argument("--speaker", default="", help="instead: verify FILE against this enrolled speaker")
    f.add_argument("file", nargs="?", help="with --speaker: the audio to verify")
    f.add_argument("--wait", type=float, default=60.0, help="with --speaker: seconds to wait for the result")
    f.set_defaults(func=cmd_verify, needs_broker=lambda args: bool(args.speaker and args.file))

    gsub = group(sub, "gallery", "export or import voiceprints (JSON lines or .npz)")
    q = gsub.add_parser("export", help="write every voiceprint (with its model id) to a file")
    q.add_argument("--out", required=True)
    q.add_argument("--format", choices=["jsonl", "npz"], default=None, help="default: by the file suffix")
    q.add_argument("--model", default="", help="only voiceprints of this model id")
    q.add_argument("--timeout", type=float, default=60.0, help="seconds to read the gallery topic")
    q.set_defaults(func=cmd_gallery_export, needs_broker=True)
    q = gsub.add_parser("import", help="publish voiceprints from a file to the gallery topic")
    q.add_argument("file")
    q.add_argument("--format", choices=["jsonl", "npz"], default=None, help="default: by the file suffix")
    q.add_argument("--force", action="store_true", help="import a file that mixes model ids")
    q.add_argument("--dry-run", action="store_true", help="read and check only")
    q.set_defaults(func=cmd_gallery_import, needs_broker=lambda args: not args.dry_run)


def cmd_enroll(args: argparse.Namespace) -> int:
    from speakerflow.streams.client import await_result, publish_enrollment
    from speakerflow.streams.runtime import Publisher

    settings = settings_from_env()
    files = [Path(f) for f in args.files]
    for f in files:
        if not f.is_file():
            print(f"error: {f} is not a file", file=sys.stderr)
            return 2
    from speakerflow.streams.limits import InvalidField, check_id, check_name, slug

    try:
        speaker_id = check_id("speaker_id", args.speaker_id or slug(check_name(args.name)))
    except InvalidField as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def cmd_speakers_list(args: argparse.Namespace) -> int:
    from speakerflow.streams.client import read_gallery_snapshot

    speakers = sorted(
        read_gallery_snapshot(settings_from_env(), args.timeout).values(), key=lambda v: v.speaker_id
    )
    if args.model:
        speakers = [v for v in speakers if v.model_id == args.model]
    if args.json:
        for vp in speakers:
            print(json.dumps(_summary(vp)))
        return 0
    print(f"{'speaker id':<24} {'name':<24} {'model':<28} {'samples':>7} {'speech s':>9}  updated (UTC)")
    for vp in speakers:
        print(
            f"{vp.speaker_id:<24} {vp.name:<24} {vp.model_id:<28} {vp.sample_count:>7} "
            f"{vp.speech_seconds:>9.1f}  {_when(vp.updated_at_ms)}"
        )
    print(f"{len(speakers)} speakers")
    return 0


def _summary(vp) -> dict:
    return {
        "speaker_id": vp.speaker_id,
        "name": vp.name,
        "model_id": vp.model_id,
        "dim": vp.dim,
        "sample_count": vp.sample_count,
        "speech_seconds": round(vp.speech_seconds, 2),
        "updated_at": _when(vp.updated_at_ms),
        "metadata": vp.metadata,
    }


def cmd_speakers_show(args: argparse.Namespace) -> int:
    from speakerflow.gallery.portability import to_json
    from speakerflow.streams.client import read_gallery_snapshot

    vp = read_gallery_snapshot(settings_from_env(), args.timeout).get(args.speaker_id)
    if vp is None:
        print(f"speaker {args.speaker_id!r} is not enrolled", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(to_json(vp)))
        return 0
    for key, value in _summary(vp).items():
        print(f"{key:>15}: {value}")
    head = ", ".join(f"{x:.3f}" for x in vp.embedding[:6])
    print(f"{'embedding':>15}: [{head}, ...] ({vp.dim} float32, L2-normalised)")
    return 0


def cmd_speakers_delete(args: argparse.Namespace) -> int:
    from speakerflow.streams.client import await_result, publish_enrollment, read_gallery_snapshot
    from speakerflow.streams.runtime import Publisher

    settings = settings_from_env()
    if not args.force and args.speaker_id not in read_gallery_snapshot(settings, args.timeout):
        print(f"speaker {args.speaker_id!r} is not enrolled (use --force to delete anyway)", file=sys.stderr)
        return 1
    request_id = publish_enrollment(Publisher(settings), args.speaker_id, "", [], mode="DELETE")
    print(f"deletion request {request_id} for {args.speaker_id} published")
    if args.wait <= 0:
        return 0
    result = await_result(settings, ENROLLMENT_RESULTS, request_id, args.wait)
    if not result["accepted"]:
        print(f"refused: {result['reason']}", file=sys.stderr)
        return 1
    print(
        f"deleted {args.speaker_id}: tombstone on the gallery topic; matchers drop it as they read it, "
        "the sink deletes its database row. No enrollment audio is stored anywhere."
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    if args.speaker:
        return _verify_enrolled(args)
    if not args.enroll or not args.test:
        print("error: give --enroll FILE... and --test FILE (or --speaker ID FILE)", file=sys.stderr)
        return 2
    from speakerflow.gallery.enrollment import score_files
    from speakerflow.processors.audio import AudioDecodeError, decode_file
    from speakerflow.processors.scoring import default_calibration
    from speakerflow.processors.vad import one_torch_thread
    from speakerflow.streams.stages.requests import speech_or_error

    settings = settings_from_env()
    embedder = load_embedder(args.embedder)
    try:
        with one_torch_thread():
            enrol = [speech_or_error(decode_file(Path(f))) for f in args.enroll]
            test = speech_or_error(decode_file(Path(args.test)))
    except AudioDecodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    score = score_files(embedder, enrol, test)
    cal = default_calibration(
        embedder.model_id, settings.match_threshold, settings.calibration_path, settings.operating_point
    )
    result = {
        "decision": "accept" if cal.accepts(score) else "reject",
        "score": round(score, 4),
        "confidence": round(cal.confidence(score), 4),
        "threshold": round(cal.threshold, 4),
        "operating_point": cal.operating_point,
        "calibration": cal.source,
        "model_id": embedder.model_id,
        "enroll_speech_s": round(sum(len(e) for e in enrol) / 16000, 2),
        "test_speech_s": round(len(test) / 16000, 2),
    }
    code = 0 if result["decision"] == "accept" else 1  # as with --speaker: scripts can test it
    if args.json:
        print(json.dumps(result))
        return code
    verdict = "same speaker" if result["decision"] == "accept" else "different speaker"
    print(f"decision:   {result['decision'].upper()} ({verdict})")
    print(f"score:      {score:.4f} (cosine, {embedder.model_id})")
    print(f"confidence: {result['confidence']:.3f}")
    print(f"threshold:  {describe(cal)}")
    print(f"speech:     enroll {result['enroll_speech_s']:.1f} s, test {result['test_speech_s']:.1f} s")
    return code


def _verify_enrolled(args: argparse.Namespace) -> int:
    """FILE against an enrolled speaker: the request goes through the verification topic to a worker."""
    from speakerflow.streams.client import await_result, publish_verification
    from speakerflow.streams.runtime import Publisher

    if not args.file or args.enroll or args.test:
        print("error: with --speaker give exactly one audio FILE (and no --enroll/--test)", file=sys.stderr)
        return 2
    settings = settings_from_env()
    file = Path(args.file)
    if not file.is_file():
        print(f"error: {file} is not a file", file=sys.stderr)
        return 2
    request_id = publish_verification(Publisher(settings), args.speaker, file)
    result = await_result(settings, VERIFICATION_RESULTS, request_id, args.wait)
    if args.json:
        print(json.dumps(result))
    if result["error"]:
        print(f"error: {result['error']}", file=sys.stderr)
        return 2
    if not args.json:
        decision = "ACCEPT (same speaker)" if result["accepted"] else "REJECT (different speaker)"
        print(f"decision:   {decision}")
        print(f"score:      {result['score']:.4f} (cosine)")
        print(f"confidence: {result['confidence']:.4f}")
        print(f"threshold:  {result['threshold']:.4f}")
        print(f"model:      {result['model_id']}")
    return 0 if result["accepted"] else 1


def describe(cal: Calibration) -> str:
    where = "family default" if cal.source == "default" else cal.source
    return f"{cal.threshold:.4f} (operating point {cal.operating_point}, {where})"


def cmd_gallery_export(args: argparse.Namespace) -> int:
    from speakerflow.gallery.portability import VoiceprintFileError, model_counts, write_voiceprints
    from speakerflow.streams.client import read_gallery_snapshot

    speakers = sorted(
        read_gallery_snapshot(settings_from_env(), args.timeout).values(), key=lambda v: v.speaker_id
    )
    if args.model:
        speakers = [v for v in speakers if v.model_id == args.model]
    try:
        count = write_voiceprints(Path(args.out), speakers, args.format)
    except VoiceprintFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    models = ", ".join(f"{m} x{n}" for m, n in sorted(model_counts(speakers).items())) or "none"
    print(f"exported {count} voiceprints to {args.out} (models: {models})")
    return 0


def cmd_gallery_import(args: argparse.Namespace) -> int:
    from speakerflow.gallery.portability import VoiceprintFileError, model_counts, read_voiceprints
    from speakerflow.streams.client import publish_voiceprints
    from speakerflow.streams.runtime import Publisher

    settings = settings_from_env()
    try:
        voiceprints = read_voiceprints(Path(args.file), args.format)
    except (VoiceprintFileError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    models = model_counts(voiceprints)
    if len(models) > 1 and not args.force:
        print(
            f"error: the file mixes models {dict(models)}; vectors of different models are never compared. "
            "Import one model at a time, or --force to import all (each keeps its model id).",
            file=sys.stderr,
        )
        return 2
    family = settings.embedder
    if models and not any(m.startswith(family) for m in models):
        print(
            f"warning: no voiceprint was made by the configured embedder ({family}); matchers of this "
            "deployment will ignore them until a worker runs their model",
            file=sys.stderr,
        )
    ids = [vp.speaker_id for vp in voiceprints]
    if len(set(ids)) != len(ids):
        print("warning: repeated speaker ids: the last of each wins", file=sys.stderr)
    if args.dry_run:
        print(f"{len(voiceprints)} voiceprints read, models {dict(models)}; nothing published (--dry-run)")
        return 0
    count = publish_voiceprints(Publisher(settings), voiceprints)
    print(f"imported {count} voiceprints to {settings.topic('gallery')} (models {dict(models)})")
    return 0
