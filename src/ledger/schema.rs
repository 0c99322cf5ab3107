//! The ledger's schema: migrations embedded in the binary, applied in order at start-up (and
//! by `matchgate migrate`), each once, recorded in `matchgate_migrations`. Instances starting
//! together take turns through an advisory lock, so each migration runs once per database.

use std::collections::HashSet;

use deadpool_postgres::Client;

use super::LedgerError;

struct Migration {
    version: i32,
    name: &'static str,
    sql: &'static str,
}

/// Every migration, oldest first. Never edit one that shipped: add the next.
const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "sessions, blocks, reports and bans",
    sql: include_str!("migrations/0001_ledger.sql"),
}];

/// The advisory lock migrations run under ("matchgat").
const LOCK: i64 = 0x6d61_7463_6867_6174;

/// Applies the migrations the database lacks, in one transaction; returns their versions.
pub(super) async fn migrate(client: &mut Client) -> Result<Vec<i32>, LedgerError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS matchgate_migrations (
            version    integer PRIMARY KEY,
            name       text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now()
        )",
    )
    .await?;
    let done: HashSet<i32> = tx
        .query("SELECT version FROM matchgate_migrations", &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut applied = Vec::new();
    for migration in MIGRATIONS.iter().filter(|m| !done.contains(&m.version)) {
        tx.batch_execute(migration.sql).await?;
        tx.execute(
            "INSERT INTO matchgate_migrations (version, name) VALUES ($1, $2)",
            &[&migration.version, &migration.name],
        )
        .await?;
        applied.push(migration.version);
    }
    tx.commit().await?;
    Ok(applied)
}
