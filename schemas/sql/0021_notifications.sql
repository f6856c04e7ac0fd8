-- Alert notifications waiting for delivery (docs/rules.md, "Notifications"): one row per
-- event and channel, written before the event counts as announced, deleted once the
-- receiver took it. The notification actor locks due rows for a round (FOR UPDATE SKIP
-- LOCKED), so workers share the table and one that dies leaves its rows due.
CREATE TABLE IF NOT EXISTS notification_outbox (
    id bigserial PRIMARY KEY,
    channel text NOT NULL,              -- "alertmanager {url}" or "webhook {name}"
    event_key text NOT NULL,            -- `{alert_id}:{kind}`: the receivers' deduplication key
    alert_id text NOT NULL,
    body json NOT NULL,                 -- the notification (worker/rules/events.py), as sent
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (channel, event_key)
);
CREATE INDEX IF NOT EXISTS notification_outbox_due ON notification_outbox (next_attempt_at, id);
CREATE INDEX IF NOT EXISTS notification_outbox_alert ON notification_outbox (alert_id);
