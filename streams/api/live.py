"""Live calls over WebSocket: audio frames in (raw PCM, or Twilio Media Streams messages), identified
segments out as JSON while the call goes on."""

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

from speakerflow.streams.api.gateway import SAMPLE_RATE, Gateway, safe_name, segment_json
from speakerflow.streams.records import audio_chunk
from speakerflow.streams.runtime import now_ms
from speakerflow.streams.topology import AUDIO, SEGMENTS_IDENTIFIED

log = logging.getLogger(__name__)

router = APIRouter()


@router.websocket("/streams/{stream_id}")
async def live_stream(ws: WebSocket, stream_id: str) -> None:
    gw: Gateway = ws.app.state.gateway
    if not await gw.websocket_admitted(ws):
        return
    session = LiveSession(gw, stream_id, int(ws.query_params.get("sample_rate", SAMPLE_RATE)))
    if ws.query_params.get("export_segments", "").lower() in ("1", "true"):
        session.record_to(gw.export_dir / safe_name(stream_id))
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
        self.recording: Any = None

    def record_to(self, folder: Path) -> None:
        """Keep the call's PCM (raw s16le) so that its segments can be played back; removed with the
        exported clips after the retention period."""
        folder.mkdir(parents=True, exist_ok=True)
        self.recording = open(folder / f"{RECORDING}-{self.sample_rate}.s16le", "ab")  # noqa: SIM115

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
