-- The document store (docs/storage.md) for deployments without MongoDB: one JSONB table.
-- `collection` is the MongoDB collection name (device_configs, event_logs, alerts,
-- analytics, user_preferences, device_metadata); `key` is the document's `_id`.
CREATE TABLE IF NOT EXISTS documents (
    collection  text NOT NULL,
    key         text NOT NULL,
    doc         jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (collection, key)
);
CREATE INDEX IF NOT EXISTS documents_doc ON documents USING gin (doc jsonb_path_ops);
CREATE INDEX IF NOT EXISTS documents_created ON documents (collection, created_at);
