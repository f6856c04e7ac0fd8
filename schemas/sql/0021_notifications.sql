-- Alert notifications waiting for delivery (docs/rules.md, "Notifications"): one row per
-- event and channel, written before the event counts as announced, delivered by the
-- notification actor. Delivered rows stay `notify.keep_delivered_s`, so that a redelivered
-- event finds its row (the unique key) and is not sent again.
CREATE TABLE IF NOT EXISTS notification_outbox (
    id bigserial PRIMARY KEY,
    channel text NOT NULL,              -- "alertmanager {url}" or "webhook {name}"
    event_key text NOT NULL,            -- `{alert_id}:{kind}`: the receivers' deduplication key
    alert_id text NOT NULL,
    body jsonb NOT NULL,                -- the notification (worker/rules/events.py)
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),  -- also the lease of a claimed row
    last_error text,
    delivered_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (channel, event_key)
);
CREATE INDEX IF NOT EXISTS notification_outbox_due ON notification_outbox (next_attempt_at)
    WHERE delivered_at IS NULL;
CREATE INDEX IF NOT EXISTS notification_outbox_alert ON notification_outbox (alert_id);
CREATE INDEX IF NOT EXISTS notification_outbox_delivered ON notification_outbox (delivered_at)
    WHERE delivered_at IS NOT NULL;
