"""Live calls over WebSocket: audio frames in (raw PCM, or Twilio Media Streams messages), identified
segments out as JSON while the call goes on.

Everything the client controls is checked before it reaches the audio topic; a bad value closes the socket
with a code and a reason instead of an unhandled exception:
4401 missing or wrong key, 4403 a stream id the key does not own (a client key `owner:key` may open only
ids starting with `owner.`; admin keys any), 4422 a bad stream id, sample rate or frame (a JSON frame that
is not an object, a Twilio `start` with a bad `sampleRate`), 1009 a frame larger than FRAME_MAX_BYTES.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from speakerflow.streams.api.gateway import SAMPLE_RATE, Caller, Gateway, safe_name, segment_json
from speakerflow.streams.limits import InvalidField, check_format, check_id
from speakerflow.streams.records import audio_chunk
from speakerflow.streams.runtime import now_ms
from speakerflow.streams.topology import AUDIO, SEGMENTS_IDENTIFIED

log = logging.getLogger(__name__)

router = APIRouter()

FRAME_MAX_BYTES = 1024 * 1024  # 16 s of 16 kHz PCM; clients send 20-200 ms frames
LINGER_MAX_S = 30.0


class FrameRejected(Exception):
    """Input that ends the call: the socket is closed with `code` and the message as its reason."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@router.websocket("/streams/{stream_id}")
async def live_stream(ws: WebSocket, stream_id: str) -> None:
    gw: Gateway = ws.app.state.gateway
    who = await gw.websocket_caller(ws)
    if who is None:
        return
    try:
        sample_rate, linger_s = _checked_call(stream_id, who, ws.query_params)
    except FrameRejected as exc:
        await ws.close(code=exc.code, reason=str(exc)[:120])
        return
    session = LiveSession(gw, stream_id, sample_rate)
    if ws.query_params.get("export_segments", "").lower() in ("1", "true"):
        session.record_to(gw.export_dir / safe_name(stream_id))
    with gw.hub.subscribe(SEGMENTS_IDENTIFIED, stream_id) as segments:
        forward = asyncio.create_task(_forward_segments(ws, segments))
        rejected = None
        try:
            rejected = await session.receive_all(ws)
        finally:
            await asyncio.to_thread(session.close)
            if rejected is None:
                # Let the end-of-stream revision reach the caller before the socket closes.
                await asyncio.sleep(linger_s)
            forward.cancel()
    if ws.client_state.name == "CONNECTED":
        if rejected is not None:
            await ws.close(code=rejected.code, reason=str(rejected)[:120])
        else:
            await ws.close()


def _checked_call(stream_id: str, who: Caller, params) -> tuple[int, float]:
    """(sample rate, linger seconds) of a call, or FrameRejected saying what is wrong."""
    try:
        check_id("stream_id", stream_id)
        sample_rate = _int(params.get("sample_rate", SAMPLE_RATE), "sample_rate")
        check_format(sample_rate, 1)
        linger_s = float(params.get("linger_s", 0))
    except (InvalidField, ValueError) as exc:
        raise FrameRejected(4422, str(exc)) from exc
    if not 0 <= linger_s <= LINGER_MAX_S:
        raise FrameRejected(4422, f"linger_s must be within 0..{LINGER_MAX_S:.0f}")
    if not who.owns(stream_id):
        raise FrameRejected(4403, f"this key may open only stream ids starting with {who.owner + '.'!r}")
    return sample_rate, linger_s


def _int(value: object, field: str) -> int:
    try:
        return int(str(value))
    except ValueError:
        raise InvalidField(f"{field} {str(value)[:20]!r} is not an integer") from None


class LiveSession:
    """Audio frames of one WebSocket call -> AudioChunk records (raw PCM, or Twilio Media Streams)."""

    def __init__(self, gw: Gateway, stream_id: str, sample_rate: int) -> None:
        self.gw = gw
        self.stream_id = stream_id
        self.sample_rate = sample_rate
        self.encoding = "PCM_S16LE"
        self.seq = 0
        self.closed = False
        self.recording: Any = None

    def record_to(self, folder: Path) -> None:
        """Keep the call's PCM (raw s16le) so that its segments can be played back; removed with the
        exported clips after the retention period."""
        folder.mkdir(parents=True, exist_ok=True)
        self.recording = open(folder / f"{RECORDING}-{self.sample_rate}.s16le", "ab")  # noqa: SIM115

    async def receive_all(self, ws: WebSocket) -> FrameRejected | None:
        """Frames until the call ends; the FrameRejected that ended it early, if one did."""
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    return None
                if message.get("bytes") is not None:
                    self._check_size(len(message["bytes"]))
                    self.send(message["bytes"])
                elif message.get("text") is not None:
                    self._check_size(len(message["text"]))
                    if self._twilio(message["text"]) == "stop":
                        return None
        except WebSocketDisconnect:
            return None
        except FrameRejected as exc:
            log.warning("stream %s: %s", self.stream_id, exc)
            return exc

    @staticmethod
    def _check_size(size: int) -> None:
        if size > FRAME_MAX_BYTES:
            raise FrameRejected(1009, f"frame of {size} bytes; at most {FRAME_MAX_BYTES}")

    def _twilio(self, text: str) -> str:
        try:
            event = json.loads(text)
        except json.JSONDecodeError:
            return ""
        if not isinstance(event, dict):
            raise FrameRejected(4422, "a text frame must be a JSON object (Twilio Media Streams message)")
        kind = str(event.get("event", ""))
        if kind == "start":
            self._start(event.get("start"))
        elif kind == "media":
            try:
                self.send(base64.b64decode(event["media"]["payload"]))
            except (KeyError, TypeError, ValueError, binascii.Error):
                log.warning("stream %s: bad Twilio media message", self.stream_id)
        return kind

    def _start(self, start: object) -> None:
        fmt = start.get("mediaFormat", {}) if isinstance(start, dict) else None
        if not isinstance(fmt, dict):
            raise FrameRejected(4422, "Twilio start: mediaFormat must be an object")
        try:
            rate = _int(fmt.get("sampleRate", 8000), "sampleRate")
            check_format(rate, 1)
        except InvalidField as exc:
            raise FrameRejected(4422, f"Twilio start: {exc}") from exc
        self.encoding = "MULAW" if "mulaw" in str(fmt.get("encoding", "audio/x-mulaw")) else "PCM_S16LE"
        self.sample_rate = rate

    def send(self, payload: bytes, end: bool = False) -> None:
        if self.recording is not None and self.encoding == "PCM_S16LE":
            self.recording.write(payload)
            self.recording.flush()
        record = audio_chunk(
            self.stream_id,
            self.seq,
            now_ms(),
            payload,
            end,
            {"source": "websocket"},
            encoding=self.encoding,
            sample_rate=self.sample_rate,
        )
        self.gw.publisher.publish(self.gw.topic(AUDIO), self.stream_id, "AudioChunk", record)
        self.gw.publisher.poll()
        self.seq += 1

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.send(b"", end=True)
            self.gw.publisher.flush()
            if self.recording is not None:
                self.recording.close()


async def _forward_segments(ws: WebSocket, segments: asyncio.Queue) -> None:
    while True:
        record = await segments.get()
        try:
            await ws.send_json({"type": "segment", **segment_json(record)})
        except (RuntimeError, WebSocketDisconnect):
            return


RECORDING = "recording"


def recording_of(folder: Path) -> Path | None:
    """The PCM a live call kept in its export folder (`?export_segments=true`), if any."""
    found = sorted(folder.glob(f"{RECORDING}-*.s16le")) if folder.is_dir() else []
    return found[0] if found else None


def cut_recording(path: Path, start_s: float, end_s: float) -> bytes:
    """A WAV of [start_s, end_s) of a raw s16le recording (its rate is in its name)."""
    rate = int(path.stem.rsplit("-", 1)[1])
    first, last = int(start_s * rate), int(end_s * rate)
    with open(path, "rb") as f:
        f.seek(first * 2)
        pcm = np.frombuffer(f.read(max(last - first, 0) * 2), dtype="<i2")
    out = io.BytesIO()
    sf.write(out, pcm, rate, format="WAV", subtype="PCM_16")
    return out.getvalue()
