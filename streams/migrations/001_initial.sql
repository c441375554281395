-- Speakers and their voiceprints, as last seen on the gallery topic.
CREATE TABLE speakers (
    speaker_id      text PRIMARY KEY,
    name            text NOT NULL,
    model_id        text NOT NULL,
    dim             integer NOT NULL,
    embedding       real[] NOT NULL,
    sample_count    integer NOT NULL,
    speech_seconds  double precision NOT NULL,
    metadata        jsonb NOT NULL DEFAULT '{}',
    updated_at      timestamptz NOT NULL
);

-- Identified segments. A segment is rewritten in place while it grows (same revision) and a new
-- revision (end-of-stream re-clustering, identity settled) supersedes the live one.
CREATE TABLE segments (
    segment_id       text NOT NULL,
    revision         integer NOT NULL,
    stream_id        text NOT NULL,
    label            text NOT NULL,
    start_s          double precision NOT NULL,
    end_s            double precision NOT NULL,
    speaker_id       text,
    name             text NOT NULL,
    confidence       double precision NOT NULL,
    score            double precision NOT NULL,
    candidates       jsonb NOT NULL DEFAULT '[]',
    model_id         text NOT NULL,
    is_final         boolean NOT NULL,
    source_capture_at timestamptz NOT NULL,
    emitted_at       timestamptz NOT NULL,
    written_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (segment_id, revision)
);
CREATE INDEX segments_stream_idx ON segments (stream_id, start_s);
CREATE INDEX segments_speaker_idx ON segments (speaker_id);
