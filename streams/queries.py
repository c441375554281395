"""Every SQL statement of the product, beside the migrations (streams/migrations/) that define the tables:
the sink's idempotent upserts, the gateway's reads and job rows, the CLI's and the demo's reads."""

# --- the sink (streams/stages/sink.py): upserts on natural keys, so a replayed batch changes nothing ---

UPSERT_SEGMENT = """
INSERT INTO segments (segment_id, revision, stream_id, label, start_s, end_s, speaker_id, name, confidence,
                      score, candidates, model_id, is_final, source_capture_at, emitted_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (segment_id, revision) DO UPDATE SET
    label = EXCLUDED.label, start_s = EXCLUDED.start_s, end_s = EXCLUDED.end_s,
    speaker_id = EXCLUDED.speaker_id, name = EXCLUDED.name, confidence = EXCLUDED.confidence,
    score = EXCLUDED.score, candidates = EXCLUDED.candidates, model_id = EXCLUDED.model_id,
    is_final = EXCLUDED.is_final, source_capture_at = EXCLUDED.source_capture_at,
    emitted_at = EXCLUDED.emitted_at, written_at = now()
WHERE NOT segments.is_final OR EXCLUDED.is_final
"""

UPSERT_SPEAKER = """
INSERT INTO speakers (speaker_id, name, model_id, dim, embedding, sample_count, speech_seconds, metadata,
                      updated_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (speaker_id) DO UPDATE SET
    name = EXCLUDED.name, model_id = EXCLUDED.model_id, dim = EXCLUDED.dim, embedding = EXCLUDED.embedding,
    sample_count = EXCLUDED.sample_count, speech_seconds = EXCLUDED.speech_seconds,
    metadata = EXCLUDED.metadata, updated_at = EXCLUDED.updated_at
"""


UPSERT_EMBEDDING = """
INSERT INTO speaker_embeddings (speaker_id, model_id, dim, embedding, updated_at)
VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (speaker_id, model_id) DO UPDATE SET
    dim = EXCLUDED.dim, embedding = EXCLUDED.embedding, updated_at = EXCLUDED.updated_at
"""

# Lifecycle events only move a stream forward: a replayed STARTED never reopens a finished stream.
UPSERT_STREAM = """
INSERT INTO streams (stream_id, status, started_at, ended_at, audio_seconds, speakers, final_revision, error)
VALUES (%(stream_id)s, %(status)s, %(started_at)s, %(ended_at)s, %(audio_seconds)s, %(speakers)s,
        %(revision)s, %(error)s)
ON CONFLICT (stream_id) DO UPDATE SET
    status = CASE WHEN streams.status IN ('DONE', 'FAILED') AND EXCLUDED.status = 'RUNNING'
                  THEN streams.status ELSE EXCLUDED.status END,
    started_at = coalesce(streams.started_at, EXCLUDED.started_at),
    ended_at = coalesce(EXCLUDED.ended_at, streams.ended_at),
    audio_seconds = greatest(coalesce(EXCLUDED.audio_seconds, 0), coalesce(streams.audio_seconds, 0)),
    speakers = coalesce(EXCLUDED.speakers, streams.speakers),
    final_revision = greatest(EXCLUDED.final_revision, streams.final_revision),
    error = coalesce(EXCLUDED.error, streams.error)
"""

FORGET_SPEAKERS = """
UPDATE segments SET
    speaker_id = CASE WHEN speaker_id = ANY(%s) THEN NULL ELSE speaker_id END,
    name = CASE WHEN speaker_id = ANY(%s) THEN 'UNKNOWN' ELSE name END,
    candidates = coalesce((SELECT jsonb_agg(c) FROM jsonb_array_elements(candidates) c
                           WHERE NOT (c->>'speaker_id' = ANY(%s))), '[]'::jsonb)
WHERE speaker_id = ANY(%s)
   OR EXISTS (SELECT 1 FROM jsonb_array_elements(candidates) c WHERE c->>'speaker_id' = ANY(%s))
"""

DELETE_SPEAKERS = "DELETE FROM speakers WHERE speaker_id = ANY(%s)"

# --- the gateway (streams/api/) ---------------------------------------------------------------------

LIST_SPEAKERS = (
    "SELECT speaker_id, name, model_id, sample_count, speech_seconds, updated_at FROM speakers "
    "ORDER BY name, speaker_id OFFSET %s LIMIT %s"
)
COUNT_SPEAKERS = "SELECT count(*) AS n FROM speakers"
GET_SPEAKER = (
    "SELECT speaker_id, name, model_id, dim, sample_count, speech_seconds, metadata, "
    "updated_at FROM speakers WHERE speaker_id = %s"
)
SPEAKER_EXISTS = "SELECT 1 FROM speakers WHERE speaker_id = %s"
# A job is a stream the gateway created from an upload; the sink moves it on from the stream's events.
INSERT_JOB = (
    "INSERT INTO streams (stream_id, kind, status, audio_seconds, metadata) "
    "VALUES (%s, %s, 'PENDING', %s, %s) RETURNING stream_id"
)
FAIL_JOB = "UPDATE streams SET status = 'FAILED', error = 'timed out' WHERE stream_id = %s RETURNING 1"
LIST_JOBS = (
    "SELECT stream_id AS job_id, kind, status, created_at, started_at, ended_at, "
    "audio_seconds, speakers, error FROM streams WHERE (%s OR starts_with(stream_id, %s)) "
    "ORDER BY created_at DESC OFFSET %s LIMIT %s"
)
GET_JOB = (
    "SELECT stream_id AS job_id, kind, status, created_at, started_at, ended_at, "
    "audio_seconds, speakers, final_revision, error FROM streams WHERE stream_id = %s"
)
JOB_SEGMENTS = (
    "SELECT segment_id, label, speaker_id, name, start_s, end_s, confidence, revision, is_final "
    "FROM current_segments WHERE stream_id = %s AND is_final ORDER BY start_s"
)

SEGMENT_SPAN = (
    "SELECT start_s, end_s FROM segments WHERE stream_id = %s AND segment_id = %s "
    "ORDER BY revision DESC LIMIT 1"
)
# The console's History page: streams newest first, talk time per speaker, one stream's final segments.
# Lists take (is admin, owner prefix, offset, limit): a client key sees only its own `owner.*` streams.
HISTORY_STREAMS = (
    "SELECT stream_id, kind, status, created_at, started_at, ended_at, audio_seconds, speakers, error "
    "FROM streams WHERE (%s OR starts_with(stream_id, %s)) "
    "ORDER BY coalesce(started_at, created_at) DESC OFFSET %s LIMIT %s"
)
HISTORY_STREAM = (
    "SELECT stream_id, kind, status, created_at, started_at, ended_at, audio_seconds, speakers, "
    "final_revision, error FROM streams WHERE stream_id = %s"
)
HISTORY_SEGMENTS = (
    "SELECT segment_id, stream_id, label, speaker_id, name, start_s, end_s, confidence, score, revision, "
    "is_final, model_id FROM current_segments WHERE stream_id = %s AND is_final ORDER BY start_s"
)
TALK_TIMES = (
    "SELECT stream_id, label, speaker_id, name, turns, talk_seconds, mean_confidence "
    "FROM stream_speaker_summary WHERE stream_id = ANY(%s) ORDER BY talk_seconds DESC"
)

# --- the CLI (`speakerflow db segments`) and the demo ------------------------------------------------


def list_segments(stream_id: str | None, all_revisions: bool = False) -> str:
    """Stored segments, of one stream when `stream_id` is given; parameters: [stream_id,] limit.
    By default each stream's current labelling (its highest revision); `all_revisions`: every row."""
    where = "WHERE stream_id = %s " if stream_id else ""
    table = "segments" if all_revisions else "current_segments"
    return (
        f"SELECT stream_id, start_s, end_s, label, name, confidence, is_final, revision FROM {table} "
        f"{where}ORDER BY stream_id, start_s, revision LIMIT %s"
    )


STREAM_STATUS = "SELECT status FROM streams WHERE stream_id = %s"
STREAM_ROWS_WRITTEN = "SELECT count(*), max(written_at) FROM segments WHERE stream_id = %s"
CURRENT_SEGMENTS_OF_STREAM = (
    "SELECT start_s, end_s, label, speaker_id, revision FROM current_segments "
    "WHERE stream_id = %s AND is_final ORDER BY start_s"
)
STREAM_SPEAKERS = (
    "SELECT name, count(*), round(sum(end_s - start_s)::numeric, 1) FROM current_segments "
    "WHERE stream_id = %s AND is_final GROUP BY name ORDER BY 3 DESC"
)
