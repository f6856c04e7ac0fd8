-- Relational core: users, devices, groups and the decoder's metadata.
CREATE TABLE IF NOT EXISTS users (
    id          serial PRIMARY KEY,
    username    text NOT NULL UNIQUE,
    email       text,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS devices (
    id          serial PRIMARY KEY,
    mac         text UNIQUE,                 -- F2 controllers, lower-case colon form
    device_key  text NOT NULL UNIQUE,        -- devices/{device_key}/telemetry
    user_id     integer REFERENCES users (id) ON DELETE SET NULL,
    name        text NOT NULL,
    status      text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'inactive', 'disabled')),
    is_online   boolean NOT NULL DEFAULT false,
    last_seen   timestamptz,
    max_silence_s integer,                   -- allowed silence before the sweep marks it offline
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS device_groups (
    id          serial PRIMARY KEY,
    user_id     integer REFERENCES users (id) ON DELETE CASCADE,
    name        text NOT NULL,
    description text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, name)
);

CREATE TABLE IF NOT EXISTS device_group_members (
    group_id    integer NOT NULL REFERENCES device_groups (id) ON DELETE CASCADE,
    device_id   integer NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    PRIMARY KEY (group_id, device_id)
);

CREATE TABLE IF NOT EXISTS datapoints (
    id          serial PRIMARY KEY,
    device_id   integer NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    label       text NOT NULL,
    unit        text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (device_id, label)
);
