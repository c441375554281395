// speakerflow console: plain ES module, no framework, nothing loaded from outside the gateway.

const KEY_STORE = "speakerflow-api-key";
const PAGES = ["live", "mic", "enroll", "speakers", "history"];
const PALETTE = ["#2f6fb0", "#c4532d", "#3a8d4f", "#8a4fb0", "#b08a1f", "#1f8f95", "#b03a6f", "#5d6b2f"];
const SAMPLE_RATE = 16000;

const $ = (id) => document.getElementById(id);
let apiKey = sessionStorage.getItem(KEY_STORE) || "";
let leavePage = () => {};

// ---- helpers -----------------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else if (name === "style") node.style.cssText = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(name, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

class ApiFailure extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

// Every call: the envelope's message on failure, never a stack trace or raw body.
async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (apiKey) headers.set("X-API-Key", apiKey);
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch {
    throw new ApiFailure("Cannot reach the gateway. Is `speakerflow api` running?", 0);
  }
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (response.status === 401) {
    showKeyPage(apiKey ? "That API key was refused." : "");
    throw new ApiFailure("An API key is needed.", 401);
  }
  if (!body || typeof body !== "object" || !("success" in body)) {
    throw new ApiFailure(`The gateway answered HTTP ${response.status} without a readable message.`, response.status);
  }
  if (!body.success) {
    const error = body.error || {};
    throw new ApiFailure(error.message || `The request failed (HTTP ${response.status}).`, response.status);
  }
  return body.data;
}

function wsUrl(path, params = {}) {
  const url = new URL(path, location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  for (const [name, value] of Object.entries(params)) url.searchParams.set(name, value);
  if (apiKey) url.searchParams.set("api_key", apiKey);
  return url.toString();
}

function showMessage(text, kind = "error") {
  const box = $("message");
  box.textContent = text;
  box.className = `message ${kind}`;
  box.hidden = false;
}

function clearMessage() {
  $("message").hidden = true;
}

function report(error) {
  if (error instanceof ApiFailure && error.status === 401) return;
  showMessage(error instanceof ApiFailure ? error.message : "Something went wrong in the page; reload it.");
  if (!(error instanceof ApiFailure)) console.error(error);
}

function colourOf(speakerId) {
  let hash = 0;
  for (const c of speakerId) hash = (hash * 31 + c.charCodeAt(0)) >>> 0;
  return PALETTE[hash % PALETTE.length];
}

const seconds = (s) => `${Number(s).toFixed(1)} s`;
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "");

async function playSegment(streamId, segmentId) {
  const headers = apiKey ? { "X-API-Key": apiKey } : {};
  try {
    const response = await fetch(`/segments/${encodeURIComponent(streamId)}/audio/${encodeURIComponent(segmentId)}`, { headers });
    if (!response.ok) {
      let message = `No audio for this segment (HTTP ${response.status}).`;
      try {
        message = (await response.json()).error.message;
      } catch {
        // keep the generic message
      }
      throw new ApiFailure(message, response.status);
    }
    const audio = new Audio(URL.createObjectURL(await response.blob()));
    await audio.play();
  } catch (error) {
    report(error instanceof ApiFailure ? error : new ApiFailure("This browser could not play the clip.", 0));
  }
}

// ---- timeline: one lane per label, the latest record of each (segment, revision), highest revision wins

class Timeline {
  constructor(container, streamId) {
    this.container = container;
    this.streamId = streamId;
    this.records = new Map();
    this.pending = false;
    container.replaceChildren();
  }

  add(record) {
    this.records.set(`${record.segment_id}|${record.revision}`, record);
    if (!this.pending) {
      this.pending = true;
      requestAnimationFrame(() => {
        this.pending = false;
        this.render();
      });
    }
  }

  current() {
    const all = [...this.records.values()];
    const revision = Math.max(0, ...all.map((r) => r.revision));
    return all.filter((r) => r.revision === revision).sort((a, b) => a.start_s - b.start_s);
  }

  render() {
    const segments = this.current();
    const duration = Math.max(10, ...segments.map((s) => s.end_s)) * 1.02;
    const labels = [...new Set(segments.map((s) => s.label))].sort();
    const lanes = labels.map((label) =>
      el(
        "div",
        { class: "lane" },
        el("div", { class: "lane-label" }, label),
        el("div", { class: "lane-track" }, segments.filter((s) => s.label === label).map((s) => this.block(s, duration))),
      ),
    );
    const ticks = [];
    const step = duration > 120 ? 30 : duration > 40 ? 10 : 5;
    for (let t = 0; t < duration; t += step) ticks.push(el("span", { class: "tick", style: `left:${(t / duration) * 100}%` }, `${t}s`));
    const revision = Math.max(0, ...segments.map((s) => s.revision));
    this.container.replaceChildren(
      el("div", { class: "timeline" }, lanes, el("div", { class: "lane axis" }, el("div", { class: "lane-label" }), el("div", { class: "lane-track" }, ticks))),
      el(
        "p",
        { class: "legend muted" },
        el("span", { class: "swatch final" }),
        " final ",
        el("span", { class: "swatch provisional" }),
        " provisional ",
        el("span", { class: "swatch unknown" }),
        " UNKNOWN",
        revision ? ` · showing revision ${revision} (end-of-stream relabelling)` : "",
        " · the bar under a segment is its confidence; click a segment to hear it",
      ),
      this.table(segments),
    );
  }

  block(s, duration) {
    const unknown = !s.speaker_id;
    const classes = ["seg", s.is_final ? "final" : "provisional", unknown ? "unknown" : "known"].join(" ");
    const style = `left:${(s.start_s / duration) * 100}%;width:${Math.max(((s.end_s - s.start_s) / duration) * 100, 0.4)}%;` + (unknown ? "" : `--colour:${colourOf(s.speaker_id)}`);
    const title = `${s.name} (${s.label}) ${seconds(s.start_s)}–${seconds(s.end_s)}, confidence ${s.confidence.toFixed(2)}, score ${s.score.toFixed(2)}, ${s.is_final ? "final" : "provisional"}, revision ${s.revision}`;
    return el(
      "button",
      {
        class: classes,
        style,
        title,
        dataset: { name: s.name, label: s.label, start: s.start_s, end: s.end_s, final: s.is_final, revision: s.revision, segment: s.segment_id },
        onclick: () => playSegment(this.streamId, s.segment_id),
      },
      el("span", { class: "seg-name" }, s.name),
      el("span", { class: "seg-conf" }, s.confidence.toFixed(2)),
      el("span", { class: "conf-bar", style: `width:${Math.round(s.confidence * 100)}%` }),
    );
  }

  table(segments) {
    return el(
      "table",
      { class: "table segments" },
      el("thead", {}, el("tr", {}, el("th", {}, "From"), el("th", {}, "To"), el("th", {}, "Label"), el("th", {}, "Who"), el("th", { class: "num" }, "Confidence"), el("th", {}, "State"))),
      el(
        "tbody",
        {},
        segments.map((s) =>
          el(
            "tr",
            { class: s.speaker_id ? "" : "unknown-row" },
            el("td", {}, seconds(s.start_s)),
            el("td", {}, seconds(s.end_s)),
            el("td", {}, s.label),
            el("td", {}, el("span", { class: "dot", style: s.speaker_id ? `background:${colourOf(s.speaker_id)}` : "" }), s.name),
            el("td", { class: "num" }, s.confidence.toFixed(2)),
            el("td", {}, s.is_final ? "final" : "provisional"),
          ),
        ),
      ),
    );
  }
}

// ---- pages ---------------------------------------------------------------------------------------

const pages = {
  live(streamId) {
    let socket = null;
    let timeline = null;
    const list = $("stream-list");

    const select = (id) => {
      if (socket) socket.close();
      history.replaceState(null, "", `#live/${encodeURIComponent(id)}`);
      $("live-title").textContent = id;
      timeline = new Timeline($("live-timeline"), id);
      socket = new WebSocket(wsUrl(`/streams/${encodeURIComponent(id)}/watch`));
      socket.onmessage = (event) => {
        const message = JSON.parse(event.data);
        if (message.type === "snapshot") {
          message.segments.forEach((s) => timeline.add(s));
          if (message.stream) $("live-title").textContent = `${id} · ${message.stream.state.toLowerCase()}`;
        } else if (message.type === "segment") timeline.add(message);
        else if (message.type === "stream") {
          const state = message.event === "STARTED" ? "running" : message.event.toLowerCase();
          $("live-title").textContent = `${id} · ${state}`;
        }
      };
      socket.onclose = (event) => {
        if (event.code === 4401) showKeyPage("That API key was refused.");
      };
      refresh();
    };

    const refresh = async () => {
      try {
        const { items } = await api("/streams");
        $("stream-list-empty").hidden = items.length > 0;
        list.replaceChildren(
          ...items.map((s) =>
            el(
              "li",
              { class: s.stream_id === decodeURIComponent(location.hash.split("/")[1] || "") ? "chosen" : "" },
              el(
                "button",
                { class: "link", onclick: () => select(s.stream_id), dataset: { stream: s.stream_id } },
                s.stream_id,
              ),
              el("span", { class: `badge ${s.state.toLowerCase()}` }, s.state.toLowerCase()),
              el("span", { class: "muted" }, ` ${seconds(s.audio_seconds)}`),
            ),
          ),
        );
      } catch (error) {
        report(error);
      }
    };

    refresh();
    const timer = setInterval(refresh, 2000);
    if (streamId) select(streamId);
    else $("live-timeline").replaceChildren();
    return () => {
      clearInterval(timer);
      if (socket) socket.close();
    };
  },

  mic() {
    let capture = null;
    let socket = null;
    const status = $("mic-status");
    if (!$("mic-stream").value) {
      // A client key may open only stream ids that start with its owner (`owner.`); admin keys any.
      const suffix = `mic-${Math.random().toString(16).slice(2, 8)}`;
      $("mic-stream").value = suffix;
      api("/whoami")
        .then((who) => {
          if (!who.admin && $("mic-stream").value === suffix) $("mic-stream").value = `${who.owner}.${suffix}`;
        })
        .catch(() => {});
    }

    const start = async () => {
      clearMessage();
      const streamId = $("mic-stream").value.trim();
      if (!/^[A-Za-z0-9._-]+$/.test(streamId)) {
        showMessage("A stream id may hold letters, digits, '.', '_' and '-' only.");
        return;
      }
      const timeline = new Timeline($("mic-timeline"), streamId);
      socket = new WebSocket(wsUrl(`/streams/${encodeURIComponent(streamId)}`, { sample_rate: SAMPLE_RATE, export_segments: "true", linger_s: 10 }));
      socket.binaryType = "arraybuffer";
      socket.onmessage = (event) => {
        const message = JSON.parse(event.data);
        if (message.type === "segment") timeline.add(message);
      };
      socket.onclose = (event) => {
        if (event.code === 4401) showKeyPage("That API key was refused.");
        if (capture) stop();
        const count = timeline.current().length;
        status.textContent = `Stream ${streamId} ended: ${count} segment${count === 1 ? "" : "s"}.`;
        $("mic-start").disabled = false;
        $("mic-stop").disabled = true;
      };
      await new Promise((resolve, reject) => {
        socket.onopen = resolve;
        socket.onerror = () => reject(new ApiFailure("The gateway refused the audio stream.", 0));
      }).catch(report);
      if (socket.readyState !== WebSocket.OPEN) return;
      try {
        let sent = 0;
        capture = await startCapture((pcm) => {
          if (socket.readyState === WebSocket.OPEN) socket.send(pcm.buffer);
          sent += pcm.length;
          status.textContent = `Listening… ${seconds(sent / SAMPLE_RATE)} sent as ${streamId}`;
        });
      } catch (error) {
        socket.close();
        report(error);
        return;
      }
      $("mic-start").disabled = true;
      $("mic-stop").disabled = false;
      status.textContent = "Listening…";
    };

    const stop = () => {
      if (capture) {
        capture.stop();
        capture = null;
      }
      if (socket && socket.readyState === WebSocket.OPEN) {
        socket.send(JSON.stringify({ event: "stop" }));
        status.textContent = "Stopped; waiting for the final labelling…";
      }
      $("mic-stop").disabled = true;
    };

    $("mic-start").onclick = start;
    $("mic-stop").onclick = stop;
    return () => {
      if (capture) capture.stop();
      capture = null;
      if (socket) socket.close();
    };
  },

  enroll() {
    let recorded = null;
    const verdict = $("enroll-verdict");
    const store = $("enroll-store");
    const say = (text, kind) => {
      verdict.textContent = text;
      verdict.className = `verdict ${kind}`;
      verdict.hidden = false;
    };

    const samples = () => {
      const files = [...$("enroll-files").files];
      if (recorded) files.push(recorded);
      if (!files.length) throw new ApiFailure("Choose one or more audio files, or record a sample, first.", 0);
      const empty = files.find((f) => f.size === 0);
      if (empty) throw new ApiFailure(`${empty.name} is empty (0 bytes): choose a file with speech in it.`, 0);
      return files;
    };

    const form = (files) => {
      const data = new FormData();
      data.set("name", $("enroll-name").value.trim());
      if ($("enroll-id").value.trim()) data.set("speaker_id", $("enroll-id").value.trim());
      for (const f of files) data.append("files", f, f.name);
      return data;
    };

    $("enroll-form").onsubmit = async (event) => {
      event.preventDefault();
      clearMessage();
      store.disabled = true;
      try {
        const files = samples();
        say("Checking the sample…", "busy");
        const result = await api("/speakers/check", { method: "POST", body: form(files) });
        if (result.passes) {
          say(`Passes the quality gate: ${seconds(result.speech_seconds)} of speech, quality ${result.quality.toFixed(2)}. Nothing is stored until you press “Store voiceprint”.`, "good");
          store.disabled = false;
        } else {
          say(`Refused: ${result.reason}.`, "bad");
        }
      } catch (error) {
        say(`Refused: ${error.message}`, "bad");
      }
    };

    store.onclick = async () => {
      store.disabled = true;
      try {
        const result = await api("/speakers/enroll", { method: "POST", body: form(samples()) });
        say(`Stored ${result.name} (${result.speaker_id}): ${seconds(result.speech_seconds)} of speech from ${result.sample_count} sample${result.sample_count === 1 ? "" : "s"}, model ${result.model_id}.`, "good");
        $("enroll-form").reset();
        recorded = null;
        $("enroll-recorded").textContent = "";
      } catch (error) {
        say(`Not stored: ${error.message}`, "bad");
      }
    };

    $("enroll-record").onclick = async () => {
      const button = $("enroll-record");
      button.disabled = true;
      const chunks = [];
      try {
        const capture = await startCapture((pcm) => chunks.push(pcm));
        for (let left = 15; left > 0; left--) {
          $("enroll-recorded").textContent = `Recording… ${left} s left`;
          await new Promise((r) => setTimeout(r, 1000));
        }
        capture.stop();
        recorded = new File([wavFile(chunks)], "recording.wav", { type: "audio/wav" });
        const total = chunks.reduce((n, c) => n + c.length, 0);
        $("enroll-recorded").textContent = `Recorded ${seconds(total / SAMPLE_RATE)}; it is sent with the files.`;
      } catch (error) {
        report(error);
        $("enroll-recorded").textContent = "";
      } finally {
        button.disabled = false;
      }
    };
    return () => {};
  },

  speakers() {
    const rows = $("speaker-rows");
    let shown = null;
    let loading = false;
    const load = async () => {
      if (loading) return; // one request at a time: a slow answer must not redraw over a newer one
      loading = true;
      try {
        const { items } = await api("/speakers?limit=500");
        const signature = JSON.stringify(items.map((s) => [s.speaker_id, s.updated_at]));
        if (signature === shown) return; // keep open verdicts and confirmations while nothing changed
        shown = signature;
        $("speakers-empty").hidden = items.length > 0;
        rows.replaceChildren(...items.flatMap(speakerRow));
      } catch (error) {
        report(error);
      } finally {
        loading = false;
      }
    };

    const speakerRow = (s) => {
      const result = el("td", { colspan: 6, class: "row-result" });
      const resultRow = el("tr", { class: "result-row", hidden: true }, result);
      const say = (text, kind = "") => {
        result.replaceChildren(...(Array.isArray(text) ? text : [text]));
        result.className = `row-result ${kind}`;
        resultRow.hidden = false;
      };
      const file = el("input", { type: "file", accept: "audio/*", hidden: true, class: "verify-file" });
      file.onchange = async () => {
        if (!file.files.length) return;
        const data = new FormData();
        data.set("speaker_id", s.speaker_id);
        data.set("file", file.files[0], file.files[0].name);
        say("Verifying…");
        try {
          const v = await api("/verify", { method: "POST", body: data });
          say(
            v.accepted
              ? `Accepted: this is ${s.name} (score ${v.score.toFixed(2)} ≥ threshold ${v.threshold.toFixed(2)}, confidence ${v.confidence.toFixed(2)}).`
              : `Rejected: not ${s.name} (score ${v.score.toFixed(2)} < threshold ${v.threshold.toFixed(2)}, confidence ${v.confidence.toFixed(2)}).`,
            v.accepted ? "good" : "bad",
          );
        } catch (error) {
          say(`Could not verify: ${error.message}`, "bad");
        }
        file.value = "";
      };
      const remove = async () => {
        say("Deleting…");
        try {
          await api(`/speakers/${encodeURIComponent(s.speaker_id)}`, { method: "DELETE" });
          showMessage(`${s.name} was deleted: the voiceprint is gone and their segments are now UNKNOWN.`, "info");
          for (let i = 0; i < 20; i++) {
            const { items } = await api("/speakers?limit=500");
            if (!items.some((x) => x.speaker_id === s.speaker_id)) break;
            await new Promise((r) => setTimeout(r, 500));
          }
          load();
        } catch (error) {
          say(`Could not delete: ${error.message}`, "bad");
        }
      };
      const confirmDelete = () =>
        say(
          [
            `Delete ${s.name}? The voiceprint is erased and their past segments become UNKNOWN. `,
            el("button", { class: "danger confirm-delete", onclick: remove }, "Delete"),
            " ",
            el("button", { class: "link", onclick: () => (resultRow.hidden = true) }, "Cancel"),
          ],
          "warn",
        );
      return [
        el(
          "tr",
          { dataset: { speaker: s.speaker_id } },
          el("td", {}, el("span", { class: "dot", style: `background:${colourOf(s.speaker_id)}` }), s.name),
          el("td", { class: "mono" }, s.speaker_id),
          el("td", { class: "mono" }, s.model_id),
          el("td", { class: "num" }, Number(s.speech_seconds).toFixed(1)),
          el("td", {}, when(s.updated_at)),
          el(
            "td",
            { class: "actions-cell" },
            el(
              "div",
              { class: "actions" },
              el("button", { class: "verify", onclick: () => file.click() }, "Verify a sample…"),
              file,
              el("button", { class: "danger delete", onclick: confirmDelete }, "Delete"),
            ),
          ),
        ),
        resultRow,
      ];
    };

    rows.replaceChildren(); // never act on the rows of an earlier visit
    load();
    const timer = setInterval(load, 2000); // enrollments and deletions land in PostgreSQL shortly after
    return () => clearInterval(timer);
  },

  history(streamId) {
    const show = async (id) => {
      history.replaceState(null, "", `#history/${encodeURIComponent(id)}`);
      $("history-title").textContent = id;
      const detail = $("history-detail");
      detail.replaceChildren(el("p", { class: "muted" }, "Loading…"));
      try {
        const stream = await api(`/history/${encodeURIComponent(id)}`);
        const total = stream.talk.reduce((n, t) => n + t.talk_seconds, 0) || 1;
        const longest = Math.max(...stream.talk.map((t) => t.talk_seconds), 1);
        const timeline = el("div");
        detail.replaceChildren(
          el(
            "p",
            { class: "muted" },
            `${stream.status.toLowerCase()} · ${seconds(stream.audio_seconds || 0)} of audio · ${stream.speakers ?? "?"} speakers · started ${when(stream.started_at || stream.created_at)}`,
            stream.error ? ` · ${stream.error}` : "",
          ),
          el("h3", {}, "Talk time"),
          el(
            "div",
            { class: "bars" },
            stream.talk.map((t) =>
              el(
                "div",
                { class: "bar-row", dataset: { name: t.name, seconds: t.talk_seconds } },
                el("span", { class: "bar-name" }, t.speaker_id ? t.name : `${t.name} (${t.label})`),
                el(
                  "span",
                  { class: "bar-track" },
                  el("span", { class: `bar ${t.speaker_id ? "" : "unknown"}`, style: `width:${(t.talk_seconds / longest) * 100}%;` + (t.speaker_id ? `background:${colourOf(t.speaker_id)}` : "") }),
                ),
                el("span", { class: "bar-value" }, `${seconds(t.talk_seconds)} · ${Math.round((t.talk_seconds / total) * 100)} % · ${t.turns} turn${t.turns === 1 ? "" : "s"}`),
              ),
            ),
          ),
          el("h3", {}, "Segments"),
          timeline,
        );
        const view = new Timeline(timeline, id);
        stream.segments.forEach((s) => view.add(s));
      } catch (error) {
        detail.replaceChildren();
        report(error);
      }
    };

    const load = async () => {
      try {
        const { items } = await api("/history?limit=100");
        $("history-empty").hidden = items.length > 0;
        $("history-list").replaceChildren(
          ...items.map((s) =>
            el(
              "li",
              {},
              el("button", { class: "link", onclick: () => show(s.stream_id), dataset: { stream: s.stream_id } }, s.stream_id),
              el("span", { class: `badge ${s.status.toLowerCase()}` }, s.status.toLowerCase()),
              el("span", { class: "muted" }, ` ${seconds(s.audio_seconds || 0)}` + (s.speakers ? ` · ${s.speakers} speaker${s.speakers === 1 ? "" : "s"}` : "")),
            ),
          ),
        );
      } catch (error) {
        report(error);
      }
    };
    load();
    if (streamId) show(streamId);
    else $("history-detail").replaceChildren();
    return () => {};
  },
};

// ---- microphone capture: AudioWorklet at 16 kHz -> Int16 frames of 100 ms ---------------------------

async function startCapture(onFrame) {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    throw new ApiFailure("This browser gives no microphone access here (it needs https or localhost).", 0);
  }
  let media;
  try {
    media = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
  } catch {
    throw new ApiFailure("The microphone could not be opened (permission refused or no device).", 0);
  }
  // Chromium resamples the microphone into a 16 kHz context; browsers that cannot (Firefox refuses to
  // connect a source of another rate) get the device's rate and a linear resampler below.
  let context = new AudioContext({ sampleRate: SAMPLE_RATE });
  let source;
  try {
    source = context.createMediaStreamSource(media);
  } catch {
    context.close();
    context = new AudioContext();
    source = context.createMediaStreamSource(media);
  }
  await context.audioWorklet.addModule("/console/worklet.js");
  const node = new AudioWorkletNode(context, "capture");
  const mute = context.createGain();
  mute.gain.value = 0;
  source.connect(node).connect(mute).connect(context.destination); // keeps the worklet pulled
  const step = context.sampleRate / SAMPLE_RATE; // input samples per output sample
  const frame = new Int16Array(SAMPLE_RATE / 10);
  let filled = 0;
  let position = 0; // of the next output sample, in input samples from the start of `previous`
  let previous = 0;
  node.port.onmessage = (event) => {
    const input = event.data;
    for (; position < input.length; position += step) {
      const i = Math.floor(position);
      const before = i === 0 ? previous : input[i - 1];
      const x = step === 1 ? input[i] : before + (input[i] - before) * (position - i);
      frame[filled++] = Math.max(-32768, Math.min(32767, Math.round(x * 32767)));
      if (filled === frame.length) {
        onFrame(frame.slice(0));
        filled = 0;
      }
    }
    position -= input.length;
    previous = input[input.length - 1];
  };
  return {
    stop() {
      if (filled) onFrame(frame.slice(0, filled));
      filled = 0;
      node.port.onmessage = null;
      media.getTracks().forEach((t) => t.stop());
      context.close();
    },
  };
}

function wavFile(chunks) {
  const samples = chunks.reduce((n, c) => n + c.length, 0);
  const view = new DataView(new ArrayBuffer(44 + samples * 2));
  const text = (offset, s) => [...s].forEach((c, i) => view.setUint8(offset + i, c.charCodeAt(0)));
  text(0, "RIFF");
  view.setUint32(4, 36 + samples * 2, true);
  text(8, "WAVEfmt ");
  view.setUint32(16, 16, true);
  view.setUint16(20, 1, true);
  view.setUint16(22, 1, true);
  view.setUint32(24, SAMPLE_RATE, true);
  view.setUint32(28, SAMPLE_RATE * 2, true);
  view.setUint16(32, 2, true);
  view.setUint16(34, 16, true);
  text(36, "data");
  view.setUint32(40, samples * 2, true);
  let offset = 44;
  for (const c of chunks) for (const x of c) (view.setInt16(offset, x, true), (offset += 2));
  return view.buffer;
}

// ---- routing and the API key ---------------------------------------------------------------------

function hidePages() {
  for (const section of document.querySelectorAll("main > section")) section.hidden = true;
}

function showKeyPage(problem = "") {
  leavePage();
  leavePage = () => {};
  hidePages();
  $("nav").hidden = true;
  $("logout").hidden = true;
  $("page-key").hidden = false;
  if (problem) showMessage(problem);
  else clearMessage();
}

function route() {
  const [name, arg] = location.hash.slice(1).split("/");
  const page = PAGES.includes(name) ? name : "live";
  leavePage();
  hidePages();
  clearMessage();
  $("nav").hidden = false;
  $("logout").hidden = !apiKey;
  for (const link of document.querySelectorAll("#nav a")) link.classList.toggle("active", link.dataset.page === page);
  $(`page-${page}`).hidden = false;
  leavePage = pages[page](arg ? decodeURIComponent(arg) : "") || (() => {});
}

async function start() {
  try {
    await api("/streams");
  } catch (error) {
    if (error.status !== 401) report(error);
    if (error.status === 401) return;
  }
  route();
}

window.addEventListener("hashchange", () => {
  if ($("page-key").hidden && !$("nav").hidden) route();
});

$("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  apiKey = $("key-input").value.trim();
  sessionStorage.setItem(KEY_STORE, apiKey);
  try {
    await api("/streams");
    $("page-key").hidden = true;
    $("key-input").value = "";
    start();
  } catch (error) {
    if (error.status !== 401) report(error);
  }
});

$("logout").addEventListener("click", () => {
  apiKey = "";
  sessionStorage.removeItem(KEY_STORE);
  showKeyPage();
});

start();
