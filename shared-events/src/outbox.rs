//! Transactional outbox: messages are written in the same transaction as the state change that
//! caused them. The writer publishes them right after commit (fast path) and the [`Relay`]
//! publishes whatever is still there after a grace period (crash, broker down), both with
//! `Nats-Msg-Id`, deleting each row only after its PubAck. A crash between commit and publish
//! only delays a message; a crash after publish and before delete makes a duplicate that
//! JetStream's window and the inbox absorb.

use std::collections::BTreeMap;
use std::future::{Future, IntoFuture};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::Context as JetStream;
use async_nats::jetstream::context::PublishError;
use async_nats::jetstream::publish::PublishAck;
use bytes::Bytes;
use futures_util::future::{BoxFuture, join_all};
use sqlx::postgres::PgListener;
use sqlx::{PgConnection, PgPool};
use tokio::sync::Notify;
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
            otel.name = tracing::field::Empty,
            otel.kind = "producer",
            messaging.system = "nats",
            messaging.destination.name = %subject,
            messaging.operation.type = "send",
            messaging.message.id = %envelope.message_id,
            saga_id = %envelope.saga_id,
        );
        crate::telemetry::name_span(&span, || format!("{subject} publish"));
        let fields = propagation::context_fields(&crate::telemetry::context(&span));
        Self::build(envelope, subject, fields)
    }

    /// Wraps an envelope with explicit trace propagation fields.
    pub fn with_trace(envelope: &Envelope, headers: BTreeMap<String, String>) -> Self {
        Self::build(envelope, envelope.body.subject(), headers)
    }

    fn build(envelope: &Envelope, subject: String, mut headers: BTreeMap<String, String>) -> Self {
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
            subject,
            headers,
            payload: envelope.encode(),
        }
    }
}

/// How long a row written for the fast path waits before the relay may publish it: the writer
/// publishes it itself right after commit, and the relay is the safety net after a crash.
pub const FAST_PATH_GRACE: Duration = Duration::from_secs(2);

/// The outbox of one service: writes rows in the caller's transaction, publishes them right after
/// commit (the fast path), and deletes them once JetStream acknowledged them. A row whose fast
/// publish never happened (crash, broker down) is published by the [`Relay`] later.
#[derive(Clone)]
pub struct Outbox {
    js: JetStream,
    /// Rows handed to the client whose acknowledgements the sweeper has yet to see.
    handed: Arc<Handed>,
    tracker: tokio_util::task::TaskTracker,
    fast_path: bool,
}

/// A publish acknowledgement still to come.
type AckFuture = BoxFuture<'static, Result<PublishAck, PublishError>>;

/// A row whose messages the client took, waiting for their acknowledgements.
struct HandedRow {
    row: (Uuid, u64),
    acks: Vec<AckFuture>,
    since: Instant,
}

/// Rows handed over, shared by the publishing handlers and the sweeper. Handing a row over wakes
/// nobody while the sweeper is awake: a wake-up there would push the client's connection task,
/// woken by the publish a moment before, off the handler's worker, and the messages would wait for
/// the other worker to wake up and write them.
#[derive(Default)]
struct Handed {
    rows: Mutex<Vec<HandedRow>>,
    /// The sweeper found nothing to check and waits for `wake`.
    asleep: AtomicBool,
    wake: Notify,
}

impl Handed {
    /// A row's hand-over ended: its acknowledgements are awaited, or the row is left to the relay.
    fn handed_over(&self, row: (Uuid, u64), handed: Result<Vec<AckFuture>, PublishError>) {
        match handed {
            Ok(acks) => self.push(HandedRow {
                row,
                acks,
                since: Instant::now(),
            }),
            Err(e) => tracing::debug!(error = %e, "fast publish failed; relay will retry"),
        }
    }

    fn push(&self, row: HandedRow) {
        if let Ok(mut rows) = self.rows.lock() {
            rows.push(row);
        }
        if self.asleep.swap(false, Ordering::AcqRel) {
            self.wake.notify_one();
        }
    }

    fn take_into(&self, checking: &mut Vec<HandedRow>) {
        if let Ok(mut rows) = self.rows.lock() {
            checking.append(&mut rows);
        }
    }
}

/// How often the sweeper looks at the acknowledgements of the rows handed over; a row is deleted
/// later anyway ([`DELETE_WINDOW`]), and the relay leaves it alone for [`FAST_PATH_GRACE`].
const ACK_SWEEP: Duration = Duration::from_millis(20);

/// How long a handed-over row waits for its acknowledgements before it is left to the relay.
const ACK_WAIT: Duration = Duration::from_secs(5);

impl Outbox {
    /// An outbox publishing on `js`; spawns the task that deletes acknowledged rows in batches,
    /// and the one that collects the fast path's acknowledgements. With `fast_path` off, rows are
    /// left to the relay (woken by NOTIFY).
    pub fn new(pool: PgPool, js: JetStream, fast_path: bool, shutdown: CancellationToken) -> Self {
        let (acked, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(delete_acked(pool, rx, shutdown));
        let handed = Arc::new(Handed::default());
        let tracker = tokio_util::task::TaskTracker::new();
        tracker.spawn(sweep_acks(handed.clone(), acked, tracker.clone()));
        Outbox {
            js,
            handed,
            tracker,
            fast_path,
        }
    }

    /// Writes `messages` in the caller's transaction, as one row.
    pub async fn enqueue(
        &self,
        conn: &mut PgConnection,
        messages: &[OutgoingMessage],
    ) -> Result<(), sqlx::Error> {
        enqueue_due_in(conn, messages, self.grace()).await
    }

    /// Publishes the messages of a row whose transaction has committed; the row is deleted once
    /// every message was acknowledged, in the background. Failures are left to the relay.
    ///
    /// A message the client takes at once (it nearly always does) is handed to it here, so it
    /// leaves before the caller acknowledges what it consumed and without waking another task;
    /// the next service waits for it. One the client cannot take now (its buffer full or too many
    /// acknowledgements pending, as while NATS is away) goes in the background with the rest, so
    /// the caller never waits for the broker.
    pub fn publish_committed(&self, messages: Vec<OutgoingMessage>) {
        if !self.fast_path || messages.is_empty() {
            return;
        }
        let row = (messages[0].message_id, messages.len() as u64);
        let js = self.js.clone();
        let mut handing = Box::pin(async move {
            let mut acks: Vec<AckFuture> = Vec::with_capacity(messages.len());
            for m in messages {
                let headers = header_map(&m.headers);
                let ack = js
                    .publish_with_headers(m.subject, headers, Bytes::from(m.payload))
                    .await?;
                acks.push(ack.into_future());
            }
            Ok::<_, PublishError>(acks)
        });
        // Polled once here: the messages the client takes at once are handed over on the
        // caller's task, before it acknowledges what it consumed (the next service starts
        // sooner); the rest, if the client's buffer is full (broker down), in the background,
        // so the caller never waits for the broker.
        let mut cx = std::task::Context::from_waker(futures_util::task::noop_waker_ref());
        match handing.as_mut().poll(&mut cx) {
            Poll::Ready(handed) => self.handed.handed_over(row, handed),
            Poll::Pending => {
                let handed = self.handed.clone();
                self.tracker
                    .spawn(async move { handed.handed_over(row, handing.await) });
            }
        }
    }

    /// Waits (bounded) for fast-path publishes in flight; used at shutdown.
    pub async fn drain(&self, within: Duration) {
        self.tracker.close();
        self.handed.wake.notify_one();
        let _ = tokio::time::timeout(within, self.tracker.wait()).await;
    }
}

/// Collects the acknowledgements of the rows handed over every [`ACK_SWEEP`], and reports each row
/// whose messages were all acknowledged. It polls them without a waker of its own: an arriving
/// acknowledgement wakes no task, and a row costs the sweeper one look per sweep. It sleeps while
/// nothing is handed over, and ends at [`Outbox::drain`] once the rows it holds are settled.
async fn sweep_acks(
    handed: Arc<Handed>,
    acked: tokio::sync::mpsc::UnboundedSender<(Uuid, u64)>,
    tracker: tokio_util::task::TaskTracker,
) {
    let mut checking: Vec<HandedRow> = Vec::new();
    loop {
        handed.take_into(&mut checking);
        if checking.is_empty() {
            if tracker.is_closed() {
                return;
            }
            handed.asleep.store(true, Ordering::Release);
            // A row pushed before `asleep` was set found no one to wake: look once more.
            handed.take_into(&mut checking);
            if checking.is_empty() {
                handed.wake.notified().await;
            }
            handed.asleep.store(false, Ordering::Release);
            continue;
        }
        tokio::time::sleep(ACK_SWEEP).await;
        handed.take_into(&mut checking);
        // Unconstrained: with hundreds of rows, tokio's budget would otherwise cut the sweep short.
        tokio::task::unconstrained(futures_util::future::poll_fn(|_| {
            let mut cx = std::task::Context::from_waker(futures_util::task::noop_waker_ref());
            checking.retain_mut(|row| match settle(row, &mut cx) {
                Poll::Pending => true,
                Poll::Ready(true) => {
                    let _ = acked.send(row.row);
                    false
                }
                Poll::Ready(false) => false,
            });
            Poll::Ready(())
        }))
        .await;
    }
}

/// Whether all of a row's messages were acknowledged (`true`) or one of them will not be (`false`:
/// left to the relay); pending while acknowledgements are still to come.
fn settle(row: &mut HandedRow, cx: &mut std::task::Context<'_>) -> Poll<bool> {
    let mut failed = false;
    row.acks.retain_mut(|ack| match ack.as_mut().poll(cx) {
        Poll::Pending => true,
        Poll::Ready(Ok(_)) => false,
        Poll::Ready(Err(_)) => {
            failed = true;
            false
        }
    });
    if failed || (!row.acks.is_empty() && row.since.elapsed() >= ACK_WAIT) {
        tracing::debug!("fast publish not acknowledged; relay will retry");
        return Poll::Ready(false);
    }
    if row.acks.is_empty() {
        Poll::Ready(true)
    } else {
        Poll::Pending
    }
}

/// NATS headers from a stored header map.
fn header_map(headers: &BTreeMap<String, String>) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.insert(k.as_str(), v.as_str());
    }
    map
}

/// How long acknowledged ids gather before one delete removes them all.
const DELETE_WINDOW: Duration = Duration::from_millis(100);

/// A one-connection pool for deleting published rows whose commits do not wait for the WAL
/// flush. Only this clean-up is asynchronous: a delete lost in a crash makes its row reappear,
/// and the relay publishes it again as a duplicate that `Nats-Msg-Id` and the inbox absorb.
/// Every state change and every outbox insert still commits synchronously. Its one statement,
/// a delete by key, is planned once ([`crate::db::PINNED_PLANS`]); the connection goes back
/// without sqlx's ping, a round trip per delete.
fn cleanup_pool(pool: &PgPool) -> crate::db::BatchPool {
    let options = (*pool.connect_options())
        .clone()
        .options([("synchronous_commit", "off")]);
    crate::db::batch_pool_with(options, 1)
}

/// Deletes acknowledged rows in batches: one statement for everything acknowledged within a
/// short window.
async fn delete_acked(
    pool: PgPool,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<(Uuid, u64)>,
    shutdown: CancellationToken,
) {
    let pool = cleanup_pool(&pool);
    let mut batch = Vec::new();
    let mut messages = 0;
    loop {
        let first = tokio::select! {
            row = rx.recv() => row,
            _ = shutdown.cancelled() => {
                // Give in-flight publishes a moment, then flush what arrived.
                tokio::time::sleep(Duration::from_millis(200)).await;
                rx.try_recv().ok()
            }
        };
        let Some((id, n)) = first else { break };
        batch.push(id);
        messages += n;
        let window = tokio::time::sleep(DELETE_WINDOW);
        tokio::pin!(window);
        while batch.len() < 1000 {
            tokio::select! {
                row = rx.recv() => match row {
                    Some((id, n)) => {
                        batch.push(id);
                        messages += n;
                    }
                    None => break,
                },
                _ = &mut window => break,
                _ = shutdown.cancelled() => break,
            }
        }
        if shutdown.is_cancelled() {
            while let Ok((id, n)) = rx.try_recv() {
                batch.push(id);
                messages += n;
            }
        }
        let result = match pool.acquire().await {
            Ok(mut conn) => {
                let deleted = sqlx::query("delete from outbox where outbox_id = any($1)")
                    .bind(&batch)
                    .execute(&mut *conn)
                    .await;
                if deleted.is_ok() {
                    conn.release();
                }
                deleted
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(_) => {
                metrics::counter!("outbox_published_total", "path" => "fast").increment(messages);
                batch.clear();
                messages = 0;
            }
            // Keep the ids: the next round retries (the relay would republish, harmlessly).
            Err(e) => {
                tracing::warn!(error = %e, "deleting published outbox rows failed");
                if shutdown.is_cancelled() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                if batch.len() > 100_000 {
                    batch.clear();
                    messages = 0;
                }
            }
        }
        if shutdown.is_cancelled() {
            break;
        }
    }
}

/// The values of one outbox row (every message of a transaction, keyed by the first message's
/// id), for a handler that inserts it inside a statement of its own, as a data-modifying CTE,
/// to save the round trip of a separate insert.
pub struct OutboxRow<'a> {
    id: Option<Uuid>,
    subjects: Vec<&'a str>,
    headers: sqlx::types::Json<Vec<&'a BTreeMap<String, String>>>,
    payloads: Vec<&'a [u8]>,
    due_in_secs: f64,
}

impl<'a> OutboxRow<'a> {
    /// The row for `messages` (no row at all when there are none).
    fn new(messages: &'a [OutgoingMessage], due_in: Duration) -> Self {
        OutboxRow {
            id: messages.first().map(|m| m.message_id),
            subjects: messages.iter().map(|m| m.subject.as_str()).collect(),
            headers: sqlx::types::Json(messages.iter().map(|m| &m.headers).collect()),
            payloads: messages.iter().map(|m| m.payload.as_slice()).collect(),
            due_in_secs: due_in.as_secs_f64(),
        }
    }

    /// The insert, with its five parameters numbered from `first`; it inserts nothing when the
    /// row has no messages.
    pub fn insert_sql(first: usize) -> String {
        Self::insert_sql_if(first, "true")
    }

    /// Like [`OutboxRow::insert_sql`], inserting only if the SQL `condition` holds (it may read
    /// the other parts of the caller's statement).
    pub fn insert_sql_if(first: usize, condition: &str) -> String {
        let [id, subjects, headers, payloads, due] = [0, 1, 2, 3, 4].map(|i| first + i);
        format!(
            "insert into outbox (outbox_id, subjects, headers, payloads, next_attempt_at) \
             select ${id}::uuid, ${subjects}::text[], ${headers}::jsonb, ${payloads}::bytea[], \
             now() + make_interval(secs => ${due}::float8) \
             where ${id}::uuid is not null and ({condition})"
        )
    }

    /// Binds the five parameters of [`OutboxRow::insert_sql`], in order.
    pub fn bind<'q, O>(
        self,
        query: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>
    where
        'a: 'q,
    {
        query
            .bind(self.id)
            .bind(self.subjects)
            .bind(self.headers)
            .bind(self.payloads)
            .bind(self.due_in_secs)
    }
}

impl Outbox {
    /// The outbox row for `messages`, to insert inside the caller's own statement.
    pub fn row<'a>(&self, messages: &'a [OutgoingMessage]) -> OutboxRow<'a> {
        OutboxRow::new(messages, self.grace())
    }

    fn grace(&self) -> Duration {
        if self.fast_path {
            FAST_PATH_GRACE
        } else {
            Duration::ZERO
        }
    }
}

/// Writes messages to the outbox inside the caller's transaction (one row for all, keyed by
/// the first message's id), due for the relay after `due_in`.
async fn enqueue_due_in(
    conn: &mut PgConnection,
    messages: &[OutgoingMessage],
    due_in: Duration,
) -> Result<(), sqlx::Error> {
    if messages.is_empty() {
        return Ok(());
    }
    static INSERT: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| OutboxRow::insert_sql(1));
    OutboxRow::new(messages, due_in)
        .bind(sqlx::query_as::<_, (i32,)>(sqlx::AssertSqlSafe(
            INSERT.as_str(),
        )))
        .fetch_optional(conn)
        .await?;
    Ok(())
}

/// Rows not yet published, counted exactly (the audit).
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
    Vec<String>,
    sqlx::types::Json<Vec<BTreeMap<String, String>>>,
    Vec<Vec<u8>>,
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
            let published = match self.publish_batch(false).await {
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
            match self.publish_batch(true).await {
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

    /// Claims one batch of due rows (every row when `flush`), publishes it with pipelined
    /// PubAcks, deletes what was acknowledged and pushes back what was not. Returns how many rows
    /// were published.
    pub async fn publish_batch(&self, flush: bool) -> Result<usize, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        // Two statements rather than one with `$2 or …`, so the due one can use its index.
        let sql = if flush {
            "select outbox_id, subjects, headers, payloads from outbox \
             order by created_at limit $1 for update skip locked"
        } else {
            "select outbox_id, subjects, headers, payloads from outbox \
             where next_attempt_at <= now() order by next_attempt_at limit $1 for update skip locked"
        };
        let rows: Vec<Row> = sqlx::query_as(sql)
            .bind(self.batch_size)
            .fetch_all(&mut *tx)
            .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut pending = Vec::with_capacity(rows.len());
        for (id, subjects, headers, payloads) in rows {
            let mut sent = Vec::with_capacity(subjects.len());
            for ((subject, headers), payload) in subjects.into_iter().zip(&headers.0).zip(payloads)
            {
                let map = header_map(headers);
                sent.push(
                    self.js
                        .publish_with_headers(subject, map, payload.into())
                        .await,
                );
            }
            pending.push((id, sent));
        }
        let timeout = self.publish_timeout;
        // A row is done when every one of its messages was acknowledged.
        let acks = join_all(pending.into_iter().map(|(id, sent)| async move {
            let count = sent.len() as u64;
            let mut result = Ok(count);
            for s in sent {
                let r = match s {
                    Ok(ack) => match tokio::time::timeout(timeout, ack).await {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("timed out waiting for PubAck".to_string()),
                    },
                    Err(e) => Err(e.to_string()),
                };
                if let Err(e) = r {
                    result = Err(e);
                }
            }
            (id, result)
        }))
        .await;
        let mut done = Vec::new();
        let mut failed = Vec::new();
        let mut last_error = String::new();
        let mut messages = 0;
        for (id, r) in acks {
            match r {
                Ok(n) => {
                    done.push(id);
                    messages += n;
                }
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
        metrics::counter!("outbox_published_total", "path" => "relay").increment(messages);
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

/// Keeps the `outbox_pending` gauge current until `shutdown`. It reads the table statistics
/// live-row estimate: an exact `count(*)` scans every dead row the queue's churn leaves behind
/// and, every few seconds, cost more than the work it watches.
pub async fn watch_pending(pool: PgPool, shutdown: CancellationToken) {
    loop {
        let estimate: Result<Option<i64>, _> = sqlx::query_scalar(
            "select n_live_tup from pg_stat_user_tables where relid = 'outbox'::regclass",
        )
        .fetch_optional(&pool)
        .await;
        if let Ok(Some(n)) = estimate {
            metrics::gauge!("outbox_pending").set(n.max(0) as f64);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    fn ack_ok() -> AckFuture {
        Box::pin(async { Ok(serde_json::from_str(r#"{"stream":"S","seq":1}"#).expect("an ack")) })
    }

    fn ack_failed() -> AckFuture {
        Box::pin(async {
            Err(PublishError::new(
                async_nats::jetstream::context::PublishErrorKind::TimedOut,
            ))
        })
    }

    fn row(acks: Vec<AckFuture>) -> HandedRow {
        HandedRow {
            row: (Uuid::now_v7(), acks.len() as u64),
            acks,
            since: Instant::now(),
        }
    }

    fn settled(row: &mut HandedRow) -> Poll<bool> {
        let mut cx = std::task::Context::from_waker(futures_util::task::noop_waker_ref());
        settle(row, &mut cx)
    }

    #[test]
    fn a_row_settles_when_all_its_acks_are_in() {
        assert_eq!(
            settled(&mut row(vec![ack_ok(), ack_ok()])),
            Poll::Ready(true)
        );

        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let later: AckFuture = Box::pin(async move {
            let _ = rx.await;
            ack_ok().await
        });
        let mut waiting = row(vec![ack_ok(), later]);
        assert_eq!(settled(&mut waiting), Poll::Pending);
        assert_eq!(
            waiting.acks.len(),
            1,
            "the acknowledged message is not looked at again"
        );
        let _ = tx.send(());
        assert_eq!(settled(&mut waiting), Poll::Ready(true));
    }

    #[test]
    fn a_failed_or_overdue_ack_leaves_the_row_to_the_relay() {
        assert_eq!(
            settled(&mut row(vec![ack_ok(), ack_failed()])),
            Poll::Ready(false)
        );

        let mut overdue = row(vec![Box::pin(std::future::pending())]);
        assert_eq!(settled(&mut overdue), Poll::Pending);
        overdue.since = Instant::now()
            .checked_sub(ACK_WAIT)
            .expect("the clock is past ACK_WAIT");
        assert_eq!(settled(&mut overdue), Poll::Ready(false));
    }

    #[test]
    fn handing_over_wakes_only_a_sleeping_sweeper() {
        let handed = Handed::default();
        handed.push(row(vec![]));
        assert!(
            handed.wake.notified().now_or_never().is_none(),
            "an awake sweeper is not woken"
        );
        handed.asleep.store(true, Ordering::Release);
        handed.push(row(vec![]));
        assert!(handed.wake.notified().now_or_never().is_some());
        assert!(!handed.asleep.load(Ordering::Acquire));
        let mut checking = Vec::new();
        handed.take_into(&mut checking);
        assert_eq!(checking.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweeper_reports_settled_rows_and_ends_when_drained() {
        let handed = Arc::new(Handed::default());
        let (acked, mut reported) = tokio::sync::mpsc::unbounded_channel();
        let tracker = tokio_util::task::TaskTracker::new();
        let sweeper = tokio::spawn(sweep_acks(handed.clone(), acked, tracker.clone()));
        let good = row(vec![ack_ok(), ack_ok()]);
        let id = good.row;
        handed.push(good);
        handed.push(row(vec![ack_failed()]));
        assert_eq!(reported.recv().await, Some(id));
        tracker.close();
        handed.wake.notify_one();
        sweeper.await.expect("the sweeper ends");
        assert!(
            reported.try_recv().is_err(),
            "the failed row is not reported"
        );
    }
}
