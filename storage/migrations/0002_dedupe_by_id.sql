-- One unique index on notifications, not two.
--
-- The primary key already is the dedupe key: id = uuid5(user_id NUL idempotency_key),
-- a hash of the full key, computed before any round trip. With a second unique index on
-- (user_id, idempotency_key), INSERT ... ON CONFLICT could name only one of them, and a
-- concurrent duplicate from a second ingest process raised unique_violation on the other
-- instead of doing nothing. That index also limited keys to what a btree row can hold
-- (about 2.7 kB): a long key made PostgreSQL refuse the record (54000). The full key is
-- kept in idempotency_key, unindexed.
ALTER TABLE notifications DROP CONSTRAINT notifications_dedupe;
COMMENT ON COLUMN notifications.idempotency_key IS
    'tagged key (k:, r:, s:, h:); unique per user through id = uuid5(user_id NUL key)';
