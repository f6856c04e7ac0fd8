-- One row per (job, period) the arq jobs ran: the durable half of "never run a period
-- twice" (arq's job id is the other half, while its result is kept in Redis), and the
-- record of what each run did or why it failed.
CREATE TABLE IF NOT EXISTS job_runs (
    job          text NOT NULL,              -- rollup, device_health, retention, offline_sweep
    period       text NOT NULL,              -- ISO start of the period, or "from/to" for a backfill
    status       text NOT NULL CHECK (status IN ('running', 'retrying', 'done', 'failed')),
    attempts     integer NOT NULL DEFAULT 1,
    job_id       text,                       -- the arq job id of the latest attempt
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    duration_ms  integer,
    rows_in      bigint,
    rows_out     bigint,
    details      jsonb,
    error        text,                       -- why the latest attempt failed
    PRIMARY KEY (job, period)
);
CREATE INDEX IF NOT EXISTS job_runs_started ON job_runs (started_at);
