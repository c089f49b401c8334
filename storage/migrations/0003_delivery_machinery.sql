-- What channel consumers need: a status the database checks, a lease on claimed rows,
-- one history row per try and per endpoint, and deliveries that outlive their notification.

-- Every status DESIGN.md lists, and no other.
ALTER TABLE deliveries ADD CONSTRAINT deliveries_status CHECK (status IN (
    'queued', 'sending', 'retrying', 'sent', 'failed', 'skipped', 'digested', 'suppressed'));

-- A claimed row ('sending') belongs to one consumer until lease_until; after that (its
-- consumer died mid-send) the next consumer that meets the record takes it over.
ALTER TABLE deliveries ADD COLUMN lease_until timestamptz;
-- Why a row is skipped or failed, as a short code: no_endpoint, permanent, exhausted, endpoint_gone.
ALTER TABLE deliveries ADD COLUMN status_reason text;
ALTER TABLE deliveries ADD COLUMN first_attempt_at timestamptz;
ALTER TABLE deliveries ADD COLUMN last_attempt_at timestamptz;

-- Sent deliveries are evidence: deleting a notification (a purge, a user forgotten) keeps
-- the delivery row and only forgets the link. It used to cascade.
ALTER TABLE deliveries DROP CONSTRAINT deliveries_notification_id_fkey;
ALTER TABLE deliveries ADD CONSTRAINT deliveries_notification_id_fkey
    FOREIGN KEY (notification_id) REFERENCES notifications (id) ON DELETE SET NULL;

-- One row per try and per endpoint: what was sent where, when, and what came back.
-- A retry sends only to the endpoints without an 'ok' row for this delivery.
CREATE TABLE delivery_attempts (
    delivery_id         uuid        NOT NULL REFERENCES deliveries (id),
    attempt             integer     NOT NULL CHECK (attempt >= 1),
    endpoint_id         bigint      NOT NULL DEFAULT 0,   -- 0: no endpoint (nothing was sent)
    outcome             text        NOT NULL CHECK (outcome IN ('ok', 'transient', 'permanent', 'gone')),
    status_code         integer,
    error               text,
    provider_message_id text,
    started_at          timestamptz NOT NULL,
    finished_at         timestamptz NOT NULL,
    PRIMARY KEY (delivery_id, attempt, endpoint_id)
);

-- The deliverer loads the enabled endpoints of a batch's users in one query.
CREATE INDEX channel_endpoints_user ON channel_endpoints (user_id, channel) WHERE disabled_at IS NULL;
