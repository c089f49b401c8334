-- Operator tools (issue 13): redrive bookkeeping, a restartable attempt budget, and
-- indexes that let purge and forget work in small batches.

-- One row per dead letter `herald redrive` took, by where it lay on the DLQ. Written
-- 'pending' before the record is produced and 'moved' once the broker acknowledged it
-- (or 'already_sent': a delivery that went out meanwhile is never produced again). A
-- rerun finds a 'pending' row's record on the target topic by its herald-redriven-from
-- header before it produces anything: a crash between produce and record moves nothing twice.
CREATE TABLE IF NOT EXISTS redrives (
    dlq_topic    text        NOT NULL,
    dlq_partition integer    NOT NULL,
    dlq_offset   bigint      NOT NULL,
    target_topic text        NOT NULL,
    reason       text,
    delivery_id  uuid,
    status       text        NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'moved', 'already_sent')),
    taken_at     timestamptz NOT NULL DEFAULT now(),
    moved_at     timestamptz,
    PRIMARY KEY (dlq_topic, dlq_partition, dlq_offset)
);

-- A redriven delivery gets its whole attempt budget again while keeping its history:
-- attempts keeps counting (attempt numbers stay unique in delivery_attempts), and the
-- budget counts only the tries after budget_base (attempts when it was last redriven).
ALTER TABLE deliveries ADD COLUMN IF NOT EXISTS budget_base integer NOT NULL DEFAULT 0
    CHECK (budget_base >= 0);

-- herald purge: old read or archived notifications, oldest first, a batch at a time.
-- Rows enter this partial index only when read or archived, never on ingest's insert.
CREATE INDEX IF NOT EXISTS notifications_done ON notifications (created_at)
    WHERE read_at IS NOT NULL OR archived_at IS NOT NULL;
-- herald purge: closed digest windows, oldest first. (No index on deliveries.user_id for
-- herald forget: ingest would pay for it on every insert; forget finds a user's rows through
-- their notifications and digest windows, and the few orphans with one scan.)
CREATE INDEX IF NOT EXISTS digest_windows_closed ON digest_windows (closed_at) WHERE status <> 'open';
