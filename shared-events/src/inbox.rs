//! Inbox: the ids of messages already handled, so a redelivery is recognised.

use sqlx::PgConnection;
use uuid::Uuid;

/// Records a batch of message ids in one statement; returns the ids that were new. Ids already
/// recorded (redeliveries) are left out, so their work is skipped.
pub async fn record_many(
    conn: &mut PgConnection,
    message_ids: &[Uuid],
) -> Result<std::collections::HashSet<Uuid>, sqlx::Error> {
    if message_ids.is_empty() {
        return Ok(Default::default());
    }
    let new: Vec<Uuid> = sqlx::query_scalar(
        "insert into processed_message (message_id) select unnest($1::uuid[]) \
         on conflict do nothing returning message_id",
    )
    .bind(message_ids)
    .fetch_all(conn)
    .await?;
    Ok(new.into_iter().collect())
}

/// Forgets ids recorded in this transaction whose work could not be done (a replay must not look
/// like a duplicate).
pub async fn forget(conn: &mut PgConnection, message_ids: &[Uuid]) -> Result<(), sqlx::Error> {
    if !message_ids.is_empty() {
        sqlx::query("delete from processed_message where message_id = any($1)")
            .bind(message_ids)
            .execute(conn)
            .await?;
    }
    Ok(())
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
