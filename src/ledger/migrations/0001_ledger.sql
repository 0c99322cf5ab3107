-- The ledger's tables (see src/ledger/mod.rs and the README's "Session ledger"). Times are
-- the gateway's clock; user ids are the JWT `sub`s.

-- One row per session that went live: inserted when it starts, completed when it ends.
CREATE TABLE sessions (
    session_id    text PRIMARY KEY,
    offerer       text NOT NULL,
    answerer      text NOT NULL,
    -- The pool each member waited in (the key of its full preferences); NULL only when the
    -- start record was lost (queue full) and the end record was not.
    offerer_pool  text,
    answerer_pool text,
    started_at    timestamptz NOT NULL,
    -- NULL while live (or when the end was never recorded: the process died).
    ended_at      timestamptz,
    -- The member whose action or absence ended it; NULL when neither did (the media server
    -- closed the room) or while live.
    ended_by      text,
    -- skip, end, timeout or media_disconnected, from the side of ended_by.
    end_reason    text,
    duration_ms   bigint
);
CREATE INDEX sessions_started_at ON sessions (started_at);
CREATE INDEX sessions_offerer ON sessions (offerer, started_at);
CREATE INDEX sessions_answerer ON sessions (answerer, started_at);

-- Who blocked whom (for good, in both directions), from which session; a block made again
-- moves to its new time.
CREATE TABLE blocks (
    blocker    text NOT NULL,
    blocked    text NOT NULL,
    session_id text NOT NULL,
    created_at timestamptz NOT NULL,
    PRIMARY KEY (blocker, blocked)
);
CREATE INDEX blocks_created_at ON blocks (created_at);

-- Every report as filed (a report that replaced an earlier one about the same session is a
-- row of its own).
CREATE TABLE reports (
    report_id  text PRIMARY KEY,
    session_id text NOT NULL,
    reporter   text NOT NULL,
    reported   text NOT NULL,
    reason     text NOT NULL,
    details    text,
    created_at timestamptz NOT NULL
);
CREATE INDEX reports_reported ON reports (reported, created_at);
CREATE INDEX reports_created_at ON reports (created_at);

-- Every ban made (the newest per kind and value is the one in force), and when it was lifted.
CREATE TABLE bans (
    ban_id     text PRIMARY KEY,
    -- user, device or ip
    kind       text NOT NULL,
    value      text NOT NULL,
    reason     text,
    -- admin (the admin API) or reports (automatic)
    source     text NOT NULL,
    created_at timestamptz NOT NULL,
    until      timestamptz NOT NULL,
    lifted_at  timestamptz
);
CREATE INDEX bans_kind_value ON bans (kind, value, created_at);
CREATE INDEX bans_until ON bans (until);
