//! Start-up: the blocks and bans the ledger holds go back into the fast path (the matchmaker's
//! block lists, the moderation backend's bans), so that a Redis flush or a restart of the
//! embedded mode forgets none that are still in force.
//!
//! The fast path keeps a user's blocks for the block TTL after the user was last seen, at most
//! `--max-blocks-per-user` of them: the ledger loads the newest that many of each user seen
//! (in a session or blocking) within the TTL. Of the bans, the newest per kind and value, if
//! it was not lifted and has not run out.

use std::time::{Duration, SystemTime};

use deadpool_postgres::Client;

use super::LedgerError;
use crate::ids::unix_ms;
use crate::matching::{Administration, UserId};
use crate::moderation::{Ban, BanKind, Moderation};

/// Which blocks the fast path keeps (from the matching rules).
#[derive(Debug, Clone, Copy)]
pub struct BlockScope {
    pub ttl: Duration,
    pub max_per_user: usize,
}

/// What was loaded.
#[derive(Debug, Default)]
pub(super) struct Loaded {
    pub blockers: usize,
    pub blocks: usize,
    pub bans: usize,
}

/// The blocks of users active since $1, the newest $2 per user, each user's oldest first.
const BLOCKS: &str = "WITH active AS (
        SELECT blocker AS id FROM blocks WHERE created_at > $1
        UNION SELECT offerer FROM sessions WHERE started_at > $1
        UNION SELECT answerer FROM sessions WHERE started_at > $1
    ), ranked AS (
        SELECT b.blocker, b.blocked, b.created_at,
            row_number() OVER (PARTITION BY b.blocker ORDER BY b.created_at DESC) AS n
        FROM blocks b JOIN active a ON a.id = b.blocker
    )
    SELECT blocker, blocked FROM ranked WHERE n <= $2 ORDER BY blocker, created_at";

/// The bans in force at $1: the newest of each kind and value, unless lifted or over.
const BANS: &str = "SELECT kind, value, reason, until FROM (
        SELECT DISTINCT ON (kind, value) kind, value, reason, until, lifted_at
        FROM bans ORDER BY kind, value, created_at DESC, ban_id DESC
    ) latest
    WHERE lifted_at IS NULL AND until > $1";

pub(super) async fn load(
    client: &Client,
    matchmaker: &dyn Administration,
    moderation: &dyn Moderation,
    scope: BlockScope,
) -> Result<Loaded, LedgerError> {
    let now = SystemTime::now();
    let since = now.checked_sub(scope.ttl).unwrap_or(SystemTime::UNIX_EPOCH);
    let max = i64::try_from(scope.max_per_user).unwrap_or(i64::MAX);
    let mut loaded = Loaded::default();
    let rows = client.query(BLOCKS, &[&since, &max]).await?;
    for user in rows.chunk_by(|a, b| a.get::<_, &str>(0) == b.get::<_, &str>(0)) {
        let blocker: UserId = user[0].get::<_, &str>(0).into();
        let blocked: Vec<UserId> = user.iter().map(|r| r.get::<_, &str>(1).into()).collect();
        matchmaker.restore_blocks(&blocker, &blocked).await?;
        loaded.blockers += 1;
        loaded.blocks += blocked.len();
    }
    for row in client.query(BANS, &[&now]).await? {
        let kind: &str = row.get(0);
        let Some(kind) = BanKind::parse(kind) else {
            tracing::warn!(kind, "ledger: a ban of an unknown kind left alone");
            continue;
        };
        let until: SystemTime = row.get(3);
        let until_ms = until
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        // Ran out while loading: nothing to put back.
        if until_ms <= unix_ms() {
            continue;
        }
        let ban = Ban {
            kind,
            value: row.get(1),
            reason: row.get(2),
            until_ms,
        };
        moderation.ban(&ban).await?;
        loaded.bans += 1;
    }
    Ok(loaded)
}
