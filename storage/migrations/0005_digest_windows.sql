-- Digests (issue 11): durable event-time windows, items linked to them by a key.
--
-- The window of a digest item is fixed at ingest, on its delivery row (and its record):
-- a preference change between ingest and a replay cannot form different windows.
ALTER TABLE deliveries ADD COLUMN window_start timestamptz;
ALTER TABLE deliveries ADD COLUMN window_seconds integer CHECK (window_seconds > 0);

-- 0001's digest_windows kept its items in a uuid[] (a hot row rewritten per append) under a
-- key without batch_key or a follow-up sequence. Nothing ever wrote it (no process read
-- herald.digests.pending before this migration), so it is replaced, not converted.
DROP TABLE digest_windows;

-- One row per window and follow-up: (user, channel, batch_key, window_start, sequence).
-- id is the digest's delivery id, uuid5 of that key (core/digest.py), so a window gives
-- one digest ever. batch_key '' stands for "no batch key" (one window per user and channel).
CREATE TABLE digest_windows (
    id             uuid PRIMARY KEY,
    user_id        text        NOT NULL,
    channel        text        NOT NULL,
    batch_key      text        NOT NULL DEFAULT '',
    window_start   timestamptz NOT NULL,
    window_seconds integer     NOT NULL CHECK (window_seconds > 0),
    sequence       integer     NOT NULL DEFAULT 0 CHECK (sequence >= 0),
    -- open: taking items; sent: its digest delivery row exists (deliveries.id = id);
    -- suppressed: every item was read before the window closed, nothing sent.
    status         text        NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'sent', 'suppressed')),
    item_count     integer     NOT NULL DEFAULT 0,
    -- When a tick closes it: window end + grace, or at once when it reached max items.
    closes_at      timestamptz NOT NULL,
    closed_at      timestamptz,
    -- The digest record as published (redacted): the relay publishes it again, unchanged,
    -- when a crash fell between the commit and the broker's acknowledgement.
    digest         jsonb,
    -- Items left out of the digest (read before the close, or their notification gone).
    left_out       uuid[]      NOT NULL DEFAULT '{}',
    -- When the items' delivery rows took the window's outcome (digested / suppressed): right
    -- after the tick's digests went out; a crash in between leaves it to the next tick.
    settled_at     timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT digest_windows_key UNIQUE (user_id, channel, batch_key, window_start, sequence)
);
-- The tick's question: which open windows are due?
CREATE INDEX digest_windows_due ON digest_windows (closes_at) WHERE status = 'open';
CREATE INDEX digest_windows_unsettled ON digest_windows (closed_at) WHERE status <> 'open' AND settled_at IS NULL;

-- One row per digest item, unique per delivery id: a replayed item is a duplicate here.
-- Title and link are the record's (already redacted); the rest stays in notifications.
CREATE TABLE digest_items (
    delivery_id     uuid        PRIMARY KEY,
    window_id       uuid        NOT NULL REFERENCES digest_windows (id),
    notification_id uuid,
    severity        text        NOT NULL,
    title           text        NOT NULL,
    target_url      text,
    occurred_at     timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX digest_items_window ON digest_items (window_id, occurred_at, delivery_id);
