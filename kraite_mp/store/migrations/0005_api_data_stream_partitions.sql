-- api_data_stream becomes a table partitioned by day, so that old days are dropped whole
-- (kraite_mp.store.retention, `kraite-mp db prune`, docs/RETENTION.md).
--
-- A unique index of a partitioned table must contain the partition key: the idempotency barrier
-- becomes UNIQUE (frame_id, audit_day), and audit_day is a pure function of what every copy of a
-- frame shares (kraite_mp.store.audit.audit_day; the same rule is spelled out in SQL below, for the
-- rows already there). Same columns plus audit_day, same id sequence (and its values), the same
-- (account_id, received_at) index and source CHECK; the primary key becomes (id, audit_day).
--
-- Every row is copied once, under an exclusive lock: workers wait on it (their frames stay queued)
-- and catch up afterwards. A day partition is made for every day of the existing rows (of the last
-- ten years) and for yesterday .. today + 7; rows of other days go to the DEFAULT partition.

LOCK TABLE api_data_stream IN ACCESS EXCLUSIVE MODE;

ALTER TABLE api_data_stream RENAME TO api_data_stream_unpartitioned;
ALTER TABLE api_data_stream_unpartitioned RENAME CONSTRAINT api_data_stream_pkey TO api_data_stream_unpartitioned_pkey;
ALTER TABLE api_data_stream_unpartitioned
    RENAME CONSTRAINT api_data_stream_frame_id_key TO api_data_stream_unpartitioned_frame_id_key;
ALTER INDEX api_data_stream_account_idx RENAME TO api_data_stream_unpartitioned_account_idx;

-- Every raw frame, exactly once (frame_id is unique in its day: see kraite_mp.store.audit).
-- Secrets (listenKeys) are scrubbed before insert.
CREATE TABLE api_data_stream (
    id            bigint NOT NULL DEFAULT nextval('api_data_stream_id_seq'::regclass),
    frame_id      text NOT NULL,
    account_id    bigint,
    exchange      text NOT NULL DEFAULT 'binance',
    source        text NOT NULL DEFAULT 'ws' CONSTRAINT api_data_stream_source_check CHECK (source IN ('ws', 'rest')),
    event_type    text,
    event_time_ms bigint,
    payload       jsonb,
    -- the raw text, kept only when it is not valid JSON (truncated)
    raw_text      text,
    received_at   timestamptz NOT NULL,
    processed_at  timestamptz NOT NULL DEFAULT now(),
    outcome       text NOT NULL,
    error         text,
    -- the partition key (UTC day): the time in frame_id, else event_time_ms, else received_at
    audit_day     date NOT NULL,
    CONSTRAINT api_data_stream_pkey PRIMARY KEY (id, audit_day),
    CONSTRAINT api_data_stream_frame_id_key UNIQUE (frame_id, audit_day)
) PARTITION BY RANGE (audit_day);
CREATE INDEX api_data_stream_account_idx ON api_data_stream (account_id, received_at);
-- the sequence goes with the new table (dropping the old one would drop it otherwise)
ALTER SEQUENCE api_data_stream_id_seq OWNED BY api_data_stream.id;

-- Rows of a day that has no partition (a frame older than the kept days, a future event time) land
-- here, so that an insert never fails; kraite_mp.store.retention moves them when their day gets one.
CREATE TABLE api_data_stream_default PARTITION OF api_data_stream DEFAULT;

-- kraite_mp.store.audit.audit_day in SQL (only for this migration; Python is the writer's rule).
CREATE FUNCTION pg_temp.kraite_audit_day(frame_id text, event_time_ms bigint, received_at timestamptz)
RETURNS date LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN t.ms < 253402300800000 THEN date '1970-01-01' + div(t.ms, 86400000)::integer
        WHEN event_time_ms >= 0 AND event_time_ms < 253402300800000
            THEN date '1970-01-01' + (event_time_ms / 86400000)::integer
        ELSE (received_at AT TIME ZONE 'UTC')::date
    END
    FROM (SELECT COALESCE(
        substring(frame_id FROM '^[0-9]+-e([0-9]{1,20})-')::numeric,
        div(substring(frame_id FROM '^[0-9]+-r([0-9]{1,20})-')::numeric, 1000),
        substring(frame_id FROM '^rest:[0-9]+:(?:regular|algo):[^:]*:([0-9]{1,20}):[^:]*$')::numeric
    ) AS ms) t
$$;

DO $$
DECLARE
    today date := (now() AT TIME ZONE 'UTC')::date;
    part_day date;
BEGIN
    FOR part_day IN
        SELECT DISTINCT d FROM (
            SELECT pg_temp.kraite_audit_day(frame_id, event_time_ms, received_at) AS d FROM api_data_stream_unpartitioned
        ) old WHERE d >= today - 3650 AND d <= today + 7
        UNION
        SELECT today + i FROM generate_series(-1, 7) AS i
        ORDER BY 1
    LOOP
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF api_data_stream FOR VALUES FROM (%L) TO (%L)',
            'api_data_stream_p' || to_char(part_day, 'YYYYMMDD'), part_day, part_day + 1
        );
    END LOOP;
END $$;

INSERT INTO api_data_stream (
    id, frame_id, account_id, exchange, source, event_type, event_time_ms, payload, raw_text, received_at,
    processed_at, outcome, error, audit_day
)
SELECT id, frame_id, account_id, exchange, source, event_type, event_time_ms, payload, raw_text, received_at,
       processed_at, outcome, error, pg_temp.kraite_audit_day(frame_id, event_time_ms, received_at)
FROM api_data_stream_unpartitioned
ORDER BY id;

DROP TABLE api_data_stream_unpartitioned;
DROP FUNCTION pg_temp.kraite_audit_day(text, bigint, timestamptz);
