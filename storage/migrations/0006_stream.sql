-- The live stream (GET /v1/stream): which transaction created each notification.
--
-- A stream client's position (its SSE event id) is a PostgreSQL snapshot: everything
-- that snapshot saw, the client has seen. What it has not seen is exactly the rows whose
-- creating transaction is not visible in it (pg_visible_in_snapshot), whatever their
-- created_at: created_at is the transaction's start, so a long ingest transaction that
-- commits late carries an older created_at than rows already streamed, and a resume by
-- time would skip it. Commit order is what a reconnect must follow, and xid8 gives it.
--
-- Both statements are catalog-only (no table rewrite): the column starts NULL on existing
-- rows, which count as seen, and only new rows get the default.
ALTER TABLE notifications ADD COLUMN IF NOT EXISTS created_xid xid8;
ALTER TABLE notifications ALTER COLUMN created_xid SET DEFAULT pg_current_xact_id();

-- A resume reads one user's rows created by transactions at or after the snapshot's xmin:
-- one index range. On a large inbox, build it first with CREATE INDEX CONCURRENTLY (same
-- name and definition), then run `herald migrate`: IF NOT EXISTS skips it here.
CREATE INDEX IF NOT EXISTS notifications_stream ON notifications (user_id, created_xid)
    WHERE created_xid IS NOT NULL AND NOT hidden AND archived_at IS NULL;
