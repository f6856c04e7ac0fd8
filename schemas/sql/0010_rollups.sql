-- Hourly and daily aggregates of `decoded_data` per device and datapoint (the arq rollup job).
-- Plain tables: TimescaleDB continuous aggregates would replace them where the extension
-- exists, and Cassandra's `aggregated_data` (schemas/cql/telemetry.cql) is a later backend. A bucket is
-- recomputed whole (delete + insert in one transaction), so re-running it is harmless.
-- Readings with a NULL value are left out of every aggregate.
CREATE TABLE IF NOT EXISTS rollup_hourly (
    bucket       timestamptz NOT NULL,       -- start of the hour (UTC)
    device_id    integer NOT NULL,
    datapoint_id integer NOT NULL,
    count        bigint NOT NULL,
    min          double precision NOT NULL,
    max          double precision NOT NULL,
    sum          double precision NOT NULL,
    avg          double precision NOT NULL,
    last         double precision NOT NULL,  -- the value at last_ts
    last_ts      timestamptz NOT NULL,
    PRIMARY KEY (bucket, device_id, datapoint_id)
);
CREATE INDEX IF NOT EXISTS rollup_hourly_series ON rollup_hourly (device_id, datapoint_id, bucket DESC);

-- Built from rollup_hourly, not from raw readings: 24 rows per series instead of a day of data.
CREATE TABLE IF NOT EXISTS rollup_daily (
    bucket       timestamptz NOT NULL,       -- midnight UTC
    device_id    integer NOT NULL,
    datapoint_id integer NOT NULL,
    count        bigint NOT NULL,
    min          double precision NOT NULL,
    max          double precision NOT NULL,
    sum          double precision NOT NULL,
    avg          double precision NOT NULL,
    last         double precision NOT NULL,
    last_ts      timestamptz NOT NULL,
    PRIMARY KEY (bucket, device_id, datapoint_id)
);
CREATE INDEX IF NOT EXISTS rollup_daily_series ON rollup_daily (device_id, datapoint_id, bucket DESC);

-- How far the incremental rollup has got: every bucket before `watermark` has been rolled up
-- at least once (the late-data window recomputes the last few before it on each run).
CREATE TABLE IF NOT EXISTS rollup_watermarks (
    name        text PRIMARY KEY,
    watermark   timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
