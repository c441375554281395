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
import json
import logging

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from speakerflow.streams.api.gateway import SAMPLE_RATE, Gateway, segment_json
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
    who = gw.caller(ws.headers.get("x-api-key", ws.query_params.get("api_key", "")))
    if who is None:
        await ws.close(code=4401)
        return
    await ws.accept()
    try:
        sample_rate, linger_s = _checked_call(stream_id, who.owner, who.admin, ws.query_params)
    except FrameRejected as exc:
        await ws.close(code=exc.code, reason=str(exc)[:120])
        return
    session = LiveSession(gw, stream_id, sample_rate)
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


def _checked_call(stream_id: str, owner: str, admin: bool, params) -> tuple[int, float]:
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
    if not admin and not stream_id.startswith(f"{owner}."):
        raise FrameRejected(4403, f"this key may open only stream ids starting with {owner + '.'!r}")
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


async def _forward_segments(ws: WebSocket, segments: asyncio.Queue) -> None:
    while True:
        record = await segments.get()
        try:
            await ws.send_json({"type": "segment", **segment_json(record)})
        except (RuntimeError, WebSocketDisconnect):
            return
