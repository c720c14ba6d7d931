//! Inbox: the ids of messages already handled, so a redelivery is recognised.

use sqlx::PgConnection;
use uuid::Uuid;

/// Records `message_id` as handled inside the caller's transaction. Returns `false` when it was
/// already recorded: the caller skips the work (and, if its transaction rolls back, the record
/// goes with it, so nothing is marked handled that was not).
pub async fn record(conn: &mut PgConnection, message_id: Uuid) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "insert into processed_message (message_id) values ($1) on conflict do nothing",
    )
    .bind(message_id)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Deletes inbox entries older than `keep`, far beyond any redelivery window.
pub async fn prune(pool: &sqlx::PgPool, keep: std::time::Duration) -> Result<u64, sqlx::Error> {
    let secs = keep.as_secs_f64();
    let done = sqlx::query(
        "delete from processed_message where processed_at < now() - make_interval(secs => $1)",
    )
    .bind(secs)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Prunes entries older than seven days (far beyond any redelivery or replay window) every hour
/// until `shutdown`.
pub async fn prune_periodically(pool: sqlx::PgPool, shutdown: tokio_util::sync::CancellationToken) {
    loop {
        if let Err(e) = prune(&pool, std::time::Duration::from_secs(7 * 24 * 3600)).await {
            tracing::warn!(error = %e, "inbox prune failed");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(3600)) => {}
        }
    }
}
