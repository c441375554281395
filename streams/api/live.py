"""Live calls over WebSocket: audio frames in (raw PCM, or Twilio Media Streams messages), identified
segments out as JSON while the call goes on."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import secrets

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from speakerflow.streams.api.gateway import SAMPLE_RATE, Gateway, segment_json
from speakerflow.streams.records import audio_chunk
from speakerflow.streams.runtime import now_ms
from speakerflow.streams.topology import AUDIO, SEGMENTS_IDENTIFIED

log = logging.getLogger(__name__)

router = APIRouter()


@router.websocket("/streams/{stream_id}")
async def live_stream(ws: WebSocket, stream_id: str) -> None:
    gw: Gateway = ws.app.state.gateway
    if gw.api_keys and not any(
        secrets.compare_digest(ws.headers.get("x-api-key", ws.query_params.get("api_key", "")), k)
        for k in gw.api_keys
    ):
        await ws.close(code=4401)
        return
    await ws.accept()
    session = LiveSession(gw, stream_id, int(ws.query_params.get("sample_rate", SAMPLE_RATE)))
    with gw.hub.subscribe(SEGMENTS_IDENTIFIED, stream_id) as segments:
        forward = asyncio.create_task(_forward_segments(ws, segments))
        try:
            await session.receive_all(ws)
        finally:
            await asyncio.to_thread(session.close)
            # Let the end-of-stream revision reach the caller before the socket closes.
            await asyncio.sleep(float(ws.query_params.get("linger_s", 0)))
            forward.cancel()
    if ws.client_state.name == "CONNECTED":
        await ws.close()


class LiveSession:
    """Audio frames of one WebSocket call -> AudioChunk records (raw PCM, or Twilio Media Streams)."""

    def __init__(self, gw: Gateway, stream_id: str, sample_rate: int) -> None:
        self.gw = gw
        self.stream_id = stream_id
        self.sample_rate = sample_rate
        self.encoding = "PCM_S16LE"
        self.seq = 0
        self.closed = False

    async def receive_all(self, ws: WebSocket) -> None:
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("bytes") is not None:
                    self.send(message["bytes"])
                elif message.get("text") is not None and self._twilio(message["text"]) == "stop":
                    return
        except WebSocketDisconnect:
            return

    def _twilio(self, text: str) -> str:
        try:
            event = json.loads(text)
        except json.JSONDecodeError:
            return ""
        kind = event.get("event", "")
        if kind == "start":
            fmt = event.get("start", {}).get("mediaFormat", {})
            self.encoding = "MULAW" if "mulaw" in fmt.get("encoding", "audio/x-mulaw") else "PCM_S16LE"
            self.sample_rate = int(fmt.get("sampleRate", 8000))
        elif kind == "media":
            try:
                self.send(base64.b64decode(event["media"]["payload"]))
            except (KeyError, binascii.Error):
                log.warning("stream %s: bad Twilio media message", self.stream_id)
        return kind

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
