-- The in-app API: keyset pages of the inbox, cheap unread counts, per-category choices.
--
-- The API pages on (created_at, id), newest first, in one direction:
-- ORDER BY created_at DESC, id DESC with WHERE (created_at, id) < (cursor). The old
-- inbox index ordered id ascending inside a timestamp, so it could not serve that
-- row comparison as one index range; both indexes are replaced, not added to, so
-- ingest still maintains the same number of indexes per row.
--
-- Building an index blocks writes to the table meanwhile. On a large inbox, build the two
-- new indexes first with CREATE INDEX CONCURRENTLY (same names and definitions) outside a
-- transaction, then run `herald migrate`: IF NOT EXISTS skips them here.
DROP INDEX IF EXISTS notifications_inbox;
CREATE INDEX IF NOT EXISTS notifications_inbox_page ON notifications (user_id, created_at DESC, id DESC)
    WHERE NOT hidden AND archived_at IS NULL;

-- Unread: the count is an index-only scan of this partial index (no heap visit once
-- the visibility map is set), and the ?unread=1 list pages over it in the same order.
DROP INDEX IF EXISTS notifications_unread;
CREATE INDEX IF NOT EXISTS notifications_unread_page ON notifications (user_id, created_at DESC, id DESC)
    WHERE read_at IS NULL AND NOT hidden AND archived_at IS NULL;

-- Per-category choices: {"<category>": {"<channel>": false, ...}, ...}; a channel not
-- named follows the user's channel switch. Categories the operator marks mandatory
-- (HERALD_POLICY__MANDATORY_CATEGORIES) ignore these choices.
ALTER TABLE notification_preferences
    ADD COLUMN categories jsonb NOT NULL DEFAULT '{}'::jsonb
    CHECK (jsonb_typeof(categories) = 'object');
