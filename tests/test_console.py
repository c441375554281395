"""The web console in a real browser: headless Debian chromium driven by Playwright, over the real
gateway, a real worker (GE2E), the embedded broker and PostgreSQL. Nothing is mocked.

The tests run in file order and build on each other (enroll, then speak, then look at the history, then
delete), like a person using the console. The conversation reaches the Microphone page through
Chromium's fake capture device, which plays a WAV file in real time.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from processes import serving_gateway

from speakerflow.evaluation.corpus import Turn, build_conversation, by_speaker, load_audio, load_manifest
from speakerflow.streams.database import scratch_database
from speakerflow.streams.settings import REPO_ROOT
from speakerflow.streams.worker import Worker

pytestmark = pytest.mark.integration

CHROMIUM = os.environ.get("SPEAKERFLOW_CHROMIUM", "/usr/bin/chromium")
API_KEY = "console-key"
ALICE, BRUNO, STRANGER = "ls-1688", "ls-2033", "ls-1998"
NAMES = {ALICE: "Alice Moore", BRUNO: "Bruno Diaz"}
ENROLL_FILES = {ALICE: (0, 1), BRUNO: (6, 8)}  # manifest rows per speaker (sorted by path)
TURNS = ((ALICE, 6), (STRANGER, 2), (BRUNO, 0))  # the conversation: speaker, utterance, in this order
WAIT_MS = 60_000  # upper bound for any single thing to appear on a page
SEEN: dict[str, list[str]] = {"requests": [], "errors": []}  # what the tab asked for, and script errors


def _playwright():
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no chromium at {CHROMIUM}: run `make browser` (apt-get install chromium) to run these")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (it is in requirements.lock: make setup)")
    return sync_playwright


@pytest.fixture(scope="module")
def speech(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Enrollment files of two speakers, and a conversation WAV: Alice, a stranger, Bruno."""
    groups = by_speaker(load_manifest(shared_data), prefix="librispeech/test-other")
    folder = tmp_path_factory.mktemp("console-audio")
    pieces = [(speaker, load_audio(groups[speaker][i])[: 8 * 16000]) for speaker, i in TURNS]
    audio, reference = build_conversation(pieces, np.random.default_rng(0))
    audio = np.concatenate([audio, np.zeros(16000, np.float32)])
    conversation = folder / "conversation.wav"
    sf.write(conversation, audio, 16000, subtype="PCM_16")
    bad = {
        "notes.txt": b"these are notes, not audio\n",
        "empty.wav": b"",
    }
    for name, content in bad.items():
        (folder / name).write_bytes(content)
    # 70 s of 16-bit audio is over the 2 MB upload limit set below; 12 s of faint noise holds no speech.
    sf.write(folder / "long.wav", np.zeros(70 * 16000, np.float32), 16000, subtype="PCM_16")
    quiet = np.random.default_rng(1).normal(0, 0.001, 12 * 16000).astype(np.float32)
    sf.write(folder / "silence.wav", quiet, 16000, subtype="PCM_16")
    return {
        "enroll": {s: [groups[s][i].path for i in rows] for s, rows in ENROLL_FILES.items()},
        "verify": groups[ALICE][7].path,
        "conversation": conversation,
        "duration_s": len(audio) / 16000,
        "reference": reference,
        "folder": folder,
    }


@pytest.fixture(scope="module")
def gateway(broker, pg_server, ge2e, tmp_path_factory) -> Iterator[dict]:
    """A worker (all stages, sink included) and the gateway with one admin API key (the console's user
    deletes speakers and opens any stream id), on a free port."""
    settings = broker.run_settings(
        tmp_path_factory.mktemp("console"), admin_keys=API_KEY, api_max_upload_mb=2.0, idle_timeout_s=5.0
    )
    with scratch_database(pg_server, "speakerflow_console", migrated=False) as url:
        worker = Worker(settings, database_url=url, embedder=ge2e)
        worker.start()
        with serving_gateway(settings, url) as port:
            yield {"base": f"http://127.0.0.1:{port}", "url": url}
        worker.stop()


@pytest.fixture(scope="module")
def browser(speech: dict):
    sync_playwright = _playwright()
    with sync_playwright() as p:
        chromium = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={speech['conversation']}%noloop",
                "--autoplay-policy=no-user-gesture-required",
            ],
            timeout=60_000,
        )
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def page(browser, gateway: dict):
    """One tab for the whole walk-through; every request it makes is recorded."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    context.grant_permissions(["microphone"], origin=gateway["base"])
    tab = context.new_page()
    tab.set_default_timeout(WAIT_MS)
    tab.on("request", lambda r: SEEN["requests"].append(r.url))
    tab.on("pageerror", lambda e: SEEN["errors"].append(str(e)))
    yield tab
    context.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Where screenshots go: SPEAKERFLOW_SCREENSHOT_DIR (docs/ to refresh the README's), else a temp dir."""
    folder = Path(os.environ.get("SPEAKERFLOW_SCREENSHOT_DIR") or tmp_path_factory.mktemp("screens"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _shot(page, shots: Path, name: str) -> None:
    page.screenshot(path=str(shots / f"console-{name}.png"), full_page=True)


def _verdict(page) -> str:
    page.wait_for_function(
        "() => { const v = document.getElementById('enroll-verdict');"
        " return !v.hidden && !v.classList.contains('busy'); }"
    )
    return page.inner_text("#enroll-verdict")


def _no_stack_trace(page) -> None:
    text = page.inner_text("body")
    assert "Traceback" not in text and 'File "' not in text, text


def test_without_a_key_the_console_shows_nothing_but_the_key_prompt(page, gateway, shots):
    page.goto(gateway["base"] + "/")
    page.wait_for_selector("#page-key:not([hidden])")
    assert page.is_hidden("#nav") and page.is_hidden("#page-live") and page.is_hidden("#page-speakers")
    page.fill("#key-input", "wrong-key")
    page.click("#key-form button")
    page.wait_for_selector("#message:not([hidden])")
    assert "refused" in page.inner_text("#message")
    assert page.is_hidden("#nav")
    _shot(page, shots, "key")
    page.fill("#key-input", API_KEY)
    page.click("#key-form button")
    page.wait_for_selector("#nav:not([hidden])")
    page.wait_for_selector("#page-live:not([hidden])")


def test_enroll_two_speakers_by_uploading_files(page, gateway, speech, shots):
    for speaker_id, files in speech["enroll"].items():
        page.goto(gateway["base"] + "/#enroll")
        page.wait_for_selector("#page-enroll:not([hidden])")
        page.fill("#enroll-name", NAMES[speaker_id])
        page.set_input_files("#enroll-files", [str(f) for f in files])
        page.click("#enroll-check")
        verdict = _verdict(page)
        assert verdict.startswith("Passes the quality gate"), verdict
        assert "Nothing is stored" in verdict
        if speaker_id == BRUNO:
            _shot(page, shots, "enroll")
        page.click("#enroll-store")
        page.wait_for_function(
            "() => document.getElementById('enroll-verdict').textContent.startsWith('Stored')"
        )
        assert NAMES[speaker_id] in page.inner_text("#enroll-verdict")
    page.goto(gateway["base"] + "/#speakers")
    for name in NAMES.values():
        page.wait_for_selector(f"#speaker-rows tr:has-text('{name}')")

    # verify a held-out sample of Alice against Alice
    alice = page.locator("#speaker-rows tr", has_text=NAMES[ALICE]).first
    alice.locator("input.verify-file").set_input_files(str(speech["verify"]))
    page.wait_for_selector(".row-result.good")
    assert page.inner_text(".row-result.good").startswith("Accepted: this is Alice Moore")
    _shot(page, shots, "speakers")


@pytest.mark.parametrize(
    ("file", "expected"),
    [
        ("notes.txt", "text/plain is not audio"),
        ("empty.wav", "is empty (0 bytes)"),
        ("long.wav", "larger than the 2 MB upload limit"),
        ("silence.wav", "s of speech found"),
    ],
)
def test_bad_input_gets_a_clear_message_on_the_page(page, gateway, speech, file, expected):
    page.goto(gateway["base"] + "/#enroll")
    page.wait_for_selector("#page-enroll:not([hidden])")
    page.fill("#enroll-name", "Someone")
    page.set_input_files("#enroll-files", str(speech["folder"] / file))
    page.click("#enroll-check")
    verdict = _verdict(page)
    assert verdict.startswith("Refused:") and expected in verdict, verdict
    assert page.is_disabled("#enroll-store")
    _no_stack_trace(page)


def _timeline(page, container: str) -> list[dict]:
    return page.eval_on_selector_all(
        f"{container} .seg",
        "els => els.map(e => ({name: e.dataset.name, start: +e.dataset.start, end: +e.dataset.end,"
        " final: e.dataset.final === 'true', revision: +e.dataset.revision}))",
    )


def _named_turns(segments: list[dict], reference: list[Turn]) -> list[str]:
    """For each reference turn, the name of the timeline segment that overlaps it most."""
    names = []
    for turn in reference:
        best = max(segments, key=lambda s: min(s["end"], turn.end_s) - max(s["start"], turn.start_s))
        names.append(best["name"])
    return names


def test_microphone_conversation_is_labelled_live(page, gateway, speech, shots):
    page.goto(gateway["base"] + "/#mic")
    page.wait_for_selector("#page-mic:not([hidden])")
    page.fill("#mic-stream", "mic-call")
    page.click("#mic-start")
    # Names appear while the call goes on: the first segment shows up before the audio has all played.
    page.wait_for_selector("#mic-timeline .seg", timeout=int(speech["duration_s"] * 1000) + WAIT_MS)
    sent = re.search(r"([0-9.]+) s sent", page.inner_text("#mic-status"))
    assert sent and float(sent.group(1)) < speech["duration_s"], page.inner_text("#mic-status")
    page.wait_for_function(
        "seconds => { const m = /([0-9.]+) s sent/.exec(document.getElementById('mic-status').textContent);"
        " return m && parseFloat(m[1]) >= seconds; }",
        arg=speech["duration_s"],
        timeout=int(speech["duration_s"] * 1000) + WAIT_MS,
    )
    _shot(page, shots, "microphone")
    page.click("#mic-stop")
    page.wait_for_function("() => document.getElementById('mic-status').textContent.includes('ended')")
    expected = [NAMES[ALICE], "UNKNOWN", NAMES[BRUNO]]
    assert _named_turns(_timeline(page, "#mic-timeline"), speech["reference"]) == expected

    # The Live page watches the same stream without sending audio, and shows the final labelling.
    page.goto(gateway["base"] + "/#live")
    page.click("#stream-list button[data-stream='mic-call']")
    page.wait_for_function("() => document.getElementById('live-title').textContent.includes('ended')")
    page.wait_for_selector("#live-timeline .seg.final")
    segments = _timeline(page, "#live-timeline")
    assert all(s["final"] for s in segments), segments
    assert _named_turns(segments, speech["reference"]) == expected
    with page.expect_response(lambda r: "/audio/" in r.url) as clip:  # a click plays the segment
        page.locator("#live-timeline .seg.known").first.click()
    assert clip.value.status == 200 and clip.value.headers["content-type"] == "audio/wav"
    wav = httpx.get(clip.value.url, headers={"X-API-Key": API_KEY})
    assert len(wav.content) > 16000  # over half a second of 16-bit audio at 16 kHz
    assert page.is_hidden("#message"), page.inner_text("#message")
    _shot(page, shots, "live")


def _talk(page) -> dict[str, float]:
    rows = page.eval_on_selector_all(
        "#history-detail .bar-row", "els => els.map(e => [e.dataset.name, +e.dataset.seconds])"
    )
    talk: dict[str, float] = {}
    for name, seconds in rows:
        talk[name] = talk.get(name, 0.0) + seconds
    return talk


def _database_talk(url: str, stream_id: str) -> dict[str, float]:
    import psycopg

    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT name, sum(talk_seconds) FROM stream_speaker_summary WHERE stream_id = %s GROUP BY name",
            (stream_id,),
        ).fetchall()
    return {name: float(seconds) for name, seconds in rows}


def _open_history(page, gateway) -> None:
    page.goto(gateway["base"] + "/#history/mic-call")
    page.wait_for_selector("#history-detail .bar-row")


def test_history_shows_talk_times_from_postgresql(page, gateway, shots):
    deadline = time.monotonic() + 30  # the sink writes the end-of-stream labelling shortly after
    while time.monotonic() < deadline:
        _open_history(page, gateway)
        if set(_talk(page)) == {NAMES[ALICE], NAMES[BRUNO], "UNKNOWN"}:
            break
        time.sleep(1)
    talk = _talk(page)
    assert set(talk) == {NAMES[ALICE], NAMES[BRUNO], "UNKNOWN"}, talk
    assert talk == pytest.approx(_database_talk(gateway["url"], "mic-call"), abs=0.01)
    assert all(seconds > 3 for seconds in talk.values()), talk
    _shot(page, shots, "history")


def test_deleting_a_speaker_turns_their_segments_unknown(page, gateway, speech):
    page.goto(gateway["base"] + "/#speakers")
    row = page.locator("#speaker-rows tr", has_text=NAMES[BRUNO]).first
    row.locator("button.delete").click()
    page.click("button.confirm-delete")
    page.wait_for_function(
        "name => ![...document.querySelectorAll('#speaker-rows tr')].some(r => r.textContent.includes(name))",
        arg=NAMES[BRUNO],
    )
    assert "deleted" in page.inner_text("#message")

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        _open_history(page, gateway)
        if NAMES[BRUNO] not in _talk(page):
            break
        time.sleep(1)
    assert set(_talk(page)) == {NAMES[ALICE], "UNKNOWN"}

    page.goto(gateway["base"] + "/#live/mic-call")
    page.wait_for_selector("#live-timeline .seg")
    names = _named_turns(_timeline(page, "#live-timeline"), speech["reference"])
    assert names == [NAMES[ALICE], "UNKNOWN", "UNKNOWN"]


def test_docs_and_console_load_nothing_from_outside(page, gateway):
    base = gateway["base"]
    SEEN["requests"].clear()
    page.goto(base + "/docs")
    page.wait_for_selector(".swagger-ui .info .title")
    assert "speakerflow" in page.inner_text(".swagger-ui .info .title")
    html = page.content()
    page.goto(base + "/#speakers")
    page.wait_for_selector("#page-speakers:not([hidden]), #page-key:not([hidden])")
    outside = [u for u in SEEN["requests"] if not u.startswith((base, "data:", "blob:"))]
    assert outside == []
    assert not SEEN["errors"], SEEN["errors"]

    docs_html = httpx.get(base + "/docs").text
    assert not re.search(r"https?://", docs_html), docs_html
    assert "swagger-ui" in html
    for asset in (REPO_ROOT / "streams" / "console").iterdir():
        assert not re.search(r"https?://", asset.read_text()), asset
