-- Every rejected message, with why. One row per distinct (topic, payload):
-- `occurrences` counts deliveries, broker redeliveries included.
CREATE TABLE IF NOT EXISTS dead_letters (
    id               bigserial PRIMARY KEY,
    fingerprint      bytea NOT NULL UNIQUE,  -- sha256(topic \0 payload)
    topic            text NOT NULL,
    payload          bytea NOT NULL,         -- capped at pipeline.dead_letter_payload_bytes
    payload_size     integer NOT NULL,       -- the size before capping
    reason           text NOT NULL,
    received_at      timestamptz NOT NULL,
    last_received_at timestamptz NOT NULL,
    occurrences      integer NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS dead_letters_received_at ON dead_letters (received_at);
