-- Streams double as jobs: a live call, or a file posted to the API. The API creates PENDING rows;
-- the sink moves them along from StreamEvent records (STARTED -> RUNNING, ENDED -> DONE, FAILED).
CREATE TABLE streams (
    stream_id       text PRIMARY KEY,
    kind            text NOT NULL DEFAULT 'live',
    status          text NOT NULL CHECK (status IN ('PENDING', 'RUNNING', 'DONE', 'FAILED')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    ended_at        timestamptz,
    audio_seconds   double precision,
    speakers        integer,
    final_revision  integer NOT NULL DEFAULT 0,
    error           text,
    metadata        jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX streams_created_idx ON streams (created_at DESC);

-- One row per (speaker, model): vectors of different models are never compared.
CREATE TABLE speaker_embeddings (
    speaker_id  text NOT NULL REFERENCES speakers (speaker_id) ON DELETE CASCADE,
    model_id    text NOT NULL,
    dim         integer NOT NULL,
    embedding   real[] NOT NULL,
    updated_at  timestamptz NOT NULL,
    PRIMARY KEY (speaker_id, model_id)
);

-- A pgvector column where the extension is available, so the vectors can be searched in SQL too.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'vector') THEN
        CREATE EXTENSION IF NOT EXISTS vector;
        ALTER TABLE speaker_embeddings ADD COLUMN vec vector;
    END IF;
END
$$;

ALTER TABLE segments ADD COLUMN audio_path text;

-- The labelling in force for each stream: its highest revision (the end-of-stream pass or a
-- re-identification supersedes the live labelling).
CREATE VIEW current_segments AS
SELECT s.*
FROM segments s
JOIN (SELECT stream_id, max(revision) AS revision FROM segments GROUP BY stream_id) latest
  ON latest.stream_id = s.stream_id AND latest.revision = s.revision;

-- Analytics: talk time and turns per speaker of a stream, and overlapped speech per stream.
CREATE VIEW stream_speaker_summary AS
SELECT stream_id, label, speaker_id, name, count(*) AS turns, sum(end_s - start_s) AS talk_seconds,
       avg(confidence) AS mean_confidence
FROM current_segments
WHERE is_final
GROUP BY stream_id, label, speaker_id, name;

CREATE VIEW stream_overlap AS
SELECT a.stream_id, sum(least(a.end_s, b.end_s) - greatest(a.start_s, b.start_s)) AS overlap_seconds
FROM current_segments a
JOIN current_segments b
  ON a.stream_id = b.stream_id AND a.segment_id < b.segment_id AND a.label <> b.label
 AND a.start_s < b.end_s AND b.start_s < a.end_s
WHERE a.is_final AND b.is_final
GROUP BY a.stream_id;
