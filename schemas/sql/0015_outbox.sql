-- The durable outbox of "both" mode (docs/storage.md): batches a readings store that is
-- down has not received, in arrival order (`id`), replayed and deleted when it returns.
-- `body` is the batch in the outbox record format of worker/sinks/outbox.py.
CREATE TABLE IF NOT EXISTS outbox (
    id bigserial PRIMARY KEY,
    store text NOT NULL,
    body bytea NOT NULL,
    readings integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS outbox_store_id ON outbox (store, id);
-- Bodies come compressed (zlib): stored as they are, out of line, not compressed again.
ALTER TABLE outbox ALTER COLUMN body SET STORAGE EXTERNAL;

-- Redis hot state that missed readings (docs/storage.md, "Redis is derived"): the oldest
-- reading a worker could not write there. A worker stopped before Redis returned leaves
-- the row, and the next start rebuilds the latest values of every device since then.
CREATE TABLE IF NOT EXISTS hot_state_stale (
    store text PRIMARY KEY,
    since timestamptz NOT NULL,
    marked_at timestamptz NOT NULL DEFAULT now()
);
