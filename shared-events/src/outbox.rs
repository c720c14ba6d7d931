//! Transactional outbox: messages are written in the same transaction as the state change that
//! caused them, then a relay publishes them to JetStream with `Nats-Msg-Id` and deletes each row
//! only after its PubAck. A crash between commit and publish only delays a message; a crash after
//! publish and before delete makes a duplicate that JetStream's window and the inbox absorb.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::Context as JetStream;
use futures_util::future::join_all;
use sqlx::postgres::PgListener;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::contract::{Envelope, header};
use crate::propagation;

/// The NOTIFY channel the outbox trigger signals after each insert statement.
pub const CHANNEL: &str = "outbox";

/// A message ready to be written to the outbox.
#[derive(Debug, Clone)]
pub struct OutgoingMessage {
    /// Outbox row id, `Nats-Msg-Id` and envelope `message_id`.
    pub message_id: Uuid,
    /// Where it goes.
    pub subject: String,
    /// Headers, including the trace context captured at write time.
    pub headers: BTreeMap<String, String>,
    /// The encoded envelope.
    pub payload: Vec<u8>,
}

impl OutgoingMessage {
    /// Wraps an envelope under a producer span (a child of the current span), whose context
    /// travels with the message. The span ends here, when the message is committed to be sent;
    /// the relay's actual publish may come later, even after a restart.
    pub fn new(envelope: &Envelope) -> Self {
        let subject = envelope.body.subject();
        let span = tracing::info_span!(
            "publish",
            otel.name = %format!("{subject} publish"),
            otel.kind = "producer",
            messaging.system = "nats",
            messaging.destination.name = %subject,
            messaging.operation.type = "send",
            messaging.message.id = %envelope.message_id,
            saga_id = %envelope.saga_id,
        );
        let fields = {
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            propagation::context_fields(&span.context())
        };
        Self::with_trace(envelope, fields)
    }

    /// Wraps an envelope with explicit trace propagation fields.
    pub fn with_trace(envelope: &Envelope, mut headers: BTreeMap<String, String>) -> Self {
        headers.insert(header::MSG_ID.into(), envelope.message_id.to_string());
        headers.insert(header::SAGA_ID.into(), envelope.saga_id.to_string());
        headers.insert(
            header::MESSAGE_TYPE.into(),
            envelope.body.message_type().into(),
        );
        if let Some(c) = envelope.causation_id {
            headers.insert(header::CAUSATION_ID.into(), c.to_string());
        }
        OutgoingMessage {
            message_id: envelope.message_id,
            subject: envelope.body.subject(),
            headers,
            payload: envelope.encode(),
        }
    }
}

/// Writes messages to the outbox inside the caller's transaction (one statement for all).
pub async fn enqueue(
    conn: &mut PgConnection,
    messages: &[OutgoingMessage],
) -> Result<(), sqlx::Error> {
    if messages.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = messages.iter().map(|m| m.message_id).collect();
    let subjects: Vec<&str> = messages.iter().map(|m| m.subject.as_str()).collect();
    let headers: Vec<String> = messages
        .iter()
        .map(|m| serde_json::to_string(&m.headers).unwrap_or_else(|_| "{}".into()))
        .collect();
    let payloads: Vec<&[u8]> = messages.iter().map(|m| m.payload.as_slice()).collect();
    sqlx::query(
        "insert into outbox (outbox_id, subject, headers, payload) \
         select id, subject, headers::jsonb, payload \
         from unnest($1::uuid[], $2::text[], $3::text[], $4::bytea[]) as t(id, subject, headers, payload)",
    )
    .bind(&ids)
    .bind(&subjects)
    .bind(&headers)
    .bind(&payloads)
    .execute(conn)
    .await?;
    Ok(())
}

/// Rows not yet published (the `outbox_pending` gauge and the audit).
pub async fn pending(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("select count(*) from outbox")
        .fetch_one(pool)
        .await
}

/// Publishes outbox rows to JetStream. Several relays (replicas) may run against one database:
/// each claims its batch with `for update skip locked`.
#[derive(Clone)]
pub struct Relay {
    pool: PgPool,
    js: JetStream,
    batch_size: i64,
    poll_interval: Duration,
    publish_timeout: Duration,
}

type Row = (
    Uuid,
    String,
    sqlx::types::Json<BTreeMap<String, String>>,
    Vec<u8>,
);

impl Relay {
    /// A relay with sensible defaults (batches of 256, a 500 ms poll as safety net).
    pub fn new(pool: PgPool, js: JetStream) -> Self {
        Relay {
            pool,
            js,
            batch_size: 256,
            poll_interval: Duration::from_millis(500),
            publish_timeout: Duration::from_secs(10),
        }
    }

    /// Runs until `shutdown`, then publishes what is left (bounded by the publish timeout).
    pub async fn run(self, shutdown: CancellationToken) {
        let mut listener = self.listen().await;
        loop {
            let published = match self.publish_batch().await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "outbox relay batch failed");
                    0
                }
            };
            if shutdown.is_cancelled() {
                break;
            }
            if published as i64 >= self.batch_size {
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = wait_notification(&mut listener) => {}
                _ = tokio::time::sleep(self.poll_interval) => {}
            }
        }
        // Flush on the way out so a graceful stop leaves nothing behind.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::time::Instant::now() < deadline {
            match self.publish_batch().await {
                Ok(n) if n as i64 >= self.batch_size => continue,
                _ => break,
            }
        }
    }

    async fn listen(&self) -> Option<PgListener> {
        match PgListener::connect_with(&self.pool).await {
            Ok(mut l) => match l.listen(CHANNEL).await {
                Ok(()) => Some(l),
                Err(e) => {
                    tracing::warn!(error = %e, "outbox LISTEN failed; polling only");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "outbox listener connect failed; polling only");
                None
            }
        }
    }

    /// Claims one batch, publishes it with pipelined PubAcks, deletes what was acknowledged and
    /// pushes back what was not. Returns how many rows were published.
    pub async fn publish_batch(&self) -> Result<usize, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let rows: Vec<Row> = sqlx::query_as(
            "select outbox_id, subject, headers, payload from outbox \
             where next_attempt_at <= now() order by created_at limit $1 for update skip locked",
        )
        .bind(self.batch_size)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut pending = Vec::with_capacity(rows.len());
        for (id, subject, headers, payload) in rows {
            let mut map = HeaderMap::new();
            for (k, v) in headers.0.iter() {
                map.insert(k.as_str(), v.as_str());
            }
            let sent = self
                .js
                .publish_with_headers(subject, map, payload.into())
                .await;
            pending.push((id, sent));
        }
        let timeout = self.publish_timeout;
        let acks = join_all(pending.into_iter().map(|(id, sent)| async move {
            let result = match sent {
                Ok(ack) => match tokio::time::timeout(timeout, ack).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("timed out waiting for PubAck".to_string()),
                },
                Err(e) => Err(e.to_string()),
            };
            (id, result)
        }))
        .await;
        let mut done = Vec::new();
        let mut failed = Vec::new();
        let mut last_error = String::new();
        for (id, r) in acks {
            match r {
                Ok(()) => done.push(id),
                Err(e) => {
                    failed.push(id);
                    last_error = e;
                }
            }
        }
        if !done.is_empty() {
            sqlx::query("delete from outbox where outbox_id = any($1)")
                .bind(&done)
                .execute(&mut *tx)
                .await?;
        }
        if !failed.is_empty() {
            tracing::warn!(count = failed.len(), error = %last_error, "outbox publish failed; will retry");
            sqlx::query(
                "update outbox set attempts = attempts + 1, last_error = $2, \
                 next_attempt_at = now() + least(interval '100 ms' * power(2, attempts), interval '10 s') \
                 where outbox_id = any($1)",
            )
            .bind(&failed)
            .bind(&last_error)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        metrics::counter!("outbox_published_total").increment(done.len() as u64);
        Ok(done.len())
    }
}

async fn wait_notification(listener: &mut Option<PgListener>) {
    match listener {
        Some(l) => {
            if let Err(e) = l.recv().await {
                tracing::debug!(error = %e, "outbox listener error");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        None => std::future::pending().await,
    }
}

/// Keeps the `outbox_pending` gauge current until `shutdown`.
pub async fn watch_pending(pool: PgPool, shutdown: CancellationToken) {
    loop {
        if let Ok(n) = pending(&pool).await {
            metrics::gauge!("outbox_pending").set(n as f64);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}
