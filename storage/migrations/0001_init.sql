-- herald schema, version 1. The inbox (notifications) is the source of truth;
-- read_at is the only unread state (no is_read column).

CREATE TABLE notifications (
    id              uuid PRIMARY KEY,            -- uuid5(user_id, idempotency_key): deterministic
    user_id         text        NOT NULL,
    source          text        NOT NULL,
    type            text        NOT NULL,
    category        text,
    severity        text        NOT NULL CHECK (severity IN ('info', 'success', 'warning', 'critical')),
    title           text        NOT NULL,
    body            text,
    summary         text,
    target_url      text,
    data            jsonb,
    sensitive       boolean     NOT NULL DEFAULT false,
    idempotency_key text        NOT NULL,
    batch_key       text,
    hidden          boolean     NOT NULL DEFAULT false,  -- in-app off: kept for dedupe/audit, never listed
    occurred_at     timestamptz NOT NULL,
    read_at         timestamptz,
    archived_at     timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT notifications_dedupe UNIQUE (user_id, idempotency_key)
);

-- The inbox list: newest first per user, visible rows only.
CREATE INDEX notifications_inbox ON notifications (user_id, created_at DESC, id)
    WHERE NOT hidden AND archived_at IS NULL;
-- The unread count and unread filter.
CREATE INDEX notifications_unread ON notifications (user_id)
    WHERE read_at IS NULL AND NOT hidden AND archived_at IS NULL;

CREATE TABLE notification_preferences (
    user_id        text PRIMARY KEY,
    in_app         boolean,            -- NULL: use the policy default
    email          boolean,
    push           boolean,
    webhook        boolean,
    digest_minutes integer CHECK (digest_minutes >= 0),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE channel_endpoints (
    id         bigserial PRIMARY KEY,
    user_id    text        NOT NULL,
    channel    text        NOT NULL CHECK (channel IN ('email', 'push', 'webhook')),
    address    text        NOT NULL,   -- email address, push subscription JSON, or webhook URL
    secret     text,                   -- webhook signing secret, when the channel has one
    disabled_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT channel_endpoints_unique UNIQUE (user_id, channel, address)
);

-- One row per (notification, channel) decision, or per digest.
CREATE TABLE deliveries (
    id                  uuid PRIMARY KEY,        -- uuid5(notification id, channel): deterministic
    notification_id     uuid REFERENCES notifications (id) ON DELETE CASCADE,
    user_id             text        NOT NULL,
    channel             text        NOT NULL,
    route               text        NOT NULL CHECK (route IN ('immediate', 'digest')),
    reason              text,                    -- why it went to the digest: warning | rate_limited
    status              text        NOT NULL DEFAULT 'queued',
    attempts            integer     NOT NULL DEFAULT 0,
    last_error          text,
    provider_message_id text,
    published_at        timestamptz,             -- outbox: NULL until the broker acknowledged the record
    sent_at             timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX deliveries_notification ON deliveries (notification_id);
CREATE INDEX deliveries_unpublished ON deliveries (created_at) WHERE published_at IS NULL;

CREATE TABLE digest_windows (
    user_id      text        NOT NULL,
    channel      text        NOT NULL,
    window_start timestamptz NOT NULL,
    window_end   timestamptz NOT NULL,
    delivery_ids uuid[]      NOT NULL DEFAULT '{}',
    closed_at    timestamptz,
    digest_id    uuid,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, channel, window_start)
);

-- Per-user, per-channel counters in one-minute event-time windows.
CREATE TABLE rate_limits (
    user_id      text        NOT NULL,
    channel      text        NOT NULL,
    window_start timestamptz NOT NULL,
    count        integer     NOT NULL,
    PRIMARY KEY (user_id, channel, window_start)
);
