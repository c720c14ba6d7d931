//! The consumer loop every service shares: pull, decode, handle, then ack, nak with backoff or
//! dead-letter. A poison message never blocks the loop and never crash-loops the service.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use sqlx::PgConnection;

use crate::contract::{DLQ_PREFIX, Envelope, header};
use crate::db::BatchPool;
use crate::nats::{ConsumerSpec, NatsError};
use crate::outbox::{Outbox, OutgoingMessage};
use crate::propagation;
use crate::pull::{Pull, PullOptions};

/// Largest payload a consumer decodes; larger ones are dead-lettered unread. The biggest valid
/// message (100 order lines) is a few KiB.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// How a handler failed, which decides what happens to the message.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Worth retrying (database or broker hiccup): nak with backoff, dead-letter after
    /// `max_deliver` deliveries.
    #[error("transient: {0}")]
    Transient(String),
    /// Will never succeed (a contract violation): dead-letter at once.
    #[error("permanent: {0}")]
    Permanent(String),
}

impl From<sqlx::Error> for HandlerError {
    fn from(e: sqlx::Error) -> Self {
        HandlerError::Transient(format!("database: {e}"))
    }
}

/// A decoded message handed to a handler.
#[derive(Debug)]
pub struct Incoming {
    /// The decoded envelope.
    pub envelope: Envelope,
    /// The subject it arrived on.
    pub subject: String,
    /// 1 on first delivery.
    pub delivered: i64,
    /// The consumer span of this message (batch handlers run each message's work inside it).
    pub span: tracing::Span,
}

/// A service's message handler. Runs inside a span that continues the sender's trace.
pub trait Handler: Send + Sync + 'static {
    /// Handles one message; `Ok` acknowledges it.
    fn handle(&self, msg: Incoming) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// Handles the messages that were ready together, returning one outcome per message in
    /// order. Handlers override this to commit them in one transaction (group commit); by
    /// default they are handled one by one.
    fn handle_batch(
        &self,
        msgs: Vec<Incoming>,
    ) -> impl Future<Output = Vec<Result<(), HandlerError>>> + Send {
        one_by_one(self, msgs)
    }
}

/// Handles messages one at a time, each in its own span: the default for a batch of a handler
/// that does not batch.
pub async fn one_by_one<H: Handler + ?Sized>(
    handler: &H,
    msgs: Vec<Incoming>,
) -> Vec<Result<(), HandlerError>> {
    let mut out = Vec::with_capacity(msgs.len());
    for m in msgs {
        let span = m.span.clone();
        out.push(handler.handle(m).instrument(span).await);
    }
    out
}

/// What a batch of messages did.
#[derive(Debug)]
pub struct BatchWork<C> {
    /// One outcome per message, in the order given.
    pub outcomes: Vec<Result<(), HandlerError>>,
    /// Messages `work` wrote to the outbox with its changes, to publish now that they committed.
    pub messages: Vec<OutgoingMessage>,
    /// What the handler wants back after commit (metrics to record).
    pub committed: C,
}

/// A handler that does the work of all messages ready together with a few set-based statements
/// (application-level group commit). Every `GroupCommit` is a [`Handler`]: inbox, work and
/// outbox commit together; if the batch fails, each message is tried again on its own, so one
/// bad message cannot hold back the others.
pub trait GroupCommit: Send + Sync + 'static {
    /// Handed from `work` to `after_commit`.
    type Committed: Send;

    /// The connections batches are written on.
    fn pool(&self) -> &BatchPool;

    /// The outbox the replies go through.
    fn outbox(&self) -> &Outbox;

    /// Runs before the batch's work (fault injection).
    fn before(&self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Does the work of `msgs` on `conn`, a connection outside any transaction, and commits it
    /// with the inbox entries and the outbox row of `messages`: in one statement (which commits
    /// atomically on its own, so BEGIN and COMMIT, two round trips, are saved), or in a
    /// transaction it opens when that statement cannot do. A per-message failure is an outcome;
    /// an `Err` must leave nothing of the batch written.
    fn work(
        &self,
        conn: &mut PgConnection,
        msgs: &[Incoming],
    ) -> impl Future<Output = Result<BatchWork<Self::Committed>, HandlerError>> + Send;

    /// Runs once the batch committed.
    fn after_commit(&self, committed: Self::Committed) {
        let _ = committed;
    }
}

impl<G: GroupCommit> Handler for G {
    async fn handle(&self, msg: Incoming) -> Result<(), HandlerError> {
        group_commit(self, vec![msg])
            .await
            .pop()
            .unwrap_or(Err(HandlerError::Transient("no outcome".into())))
    }

    async fn handle_batch(&self, msgs: Vec<Incoming>) -> Vec<Result<(), HandlerError>> {
        group_commit(self, msgs).await
    }
}

/// Commits `msgs` together; on failure of a batch of several, each message on its own.
pub async fn group_commit<G: GroupCommit>(
    handler: &G,
    msgs: Vec<Incoming>,
) -> Vec<Result<(), HandlerError>> {
    handler.before().await;
    match commit_together(handler, &msgs).await {
        Ok(outcomes) => outcomes,
        Err(e) if msgs.len() == 1 => vec![Err(e)],
        Err(e) => {
            tracing::debug!(error = %e, "batch failed; handling its messages one by one");
            let mut outcomes = Vec::with_capacity(msgs.len());
            for m in msgs {
                let one = std::slice::from_ref(&m);
                outcomes.push(match commit_together(handler, one).await {
                    Ok(mut o) => o.pop().unwrap_or(Ok(())),
                    Err(e) => Err(e),
                });
            }
            outcomes
        }
    }
}

async fn commit_together<G: GroupCommit>(
    handler: &G,
    msgs: &[Incoming],
) -> Result<Vec<Result<(), HandlerError>>, HandlerError> {
    let span = tracing::info_span!(
        "commit batch",
        db.system = "postgresql",
        messages = msgs.len()
    );
    let mut conn = handler.pool().acquire().instrument(span.clone()).await?;
    // On an error the connection is dropped, and so closed: its state is unknown.
    let work = handler.work(&mut conn, msgs).instrument(span).await?;
    conn.release();
    handler.after_commit(work.committed);
    handler.outbox().publish_committed(work.messages);
    Ok(work.outcomes)
}

/// How often the broker reports a pull request it holds with no message to deliver. Two missed in
/// a row mean it holds none of ours and the consumer pulls anew: a lost pull stalls a service for
/// twice this, and an idle consumer costs the broker one small message per interval.
const PULL_HEARTBEAT: Duration = Duration::from_secs(1);

/// Pulls from the durable consumer described by `spec` until `shutdown`, then lets the handlers
/// in flight finish.
pub async fn run<H: Handler>(
    js: jetstream::Context,
    spec: ConsumerSpec,
    handler: Arc<H>,
    shutdown: CancellationToken,
) -> Result<(), NatsError> {
    spec.ensure(&js).await?;
    let spec = Arc::new(spec);
    let options = PullOptions {
        batch: spec.concurrency.max(1) * 2,
        expires: Duration::from_secs(30),
        heartbeat: PULL_HEARTBEAT,
    };
    let mut renew = false;
    while !shutdown.is_cancelled() {
        if renew {
            // The broker lost our request (seen on a cluster, and once on a single node) or the
            // consumer is gone: make sure it exists, then pull anew.
            if let Err(e) = spec.ensure(&js).await {
                tracing::warn!(error = %e, consumer = %spec.durable, "cannot recreate; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
            renew = false;
        }
        let mut pull = match Pull::start(&js, &spec.stream, &spec.durable, options).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, consumer = %spec.durable, "cannot pull; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        // Whatever is ready, up to a batch, goes to the handler together (one transaction in
        // handlers that batch); several batches run at once.
        let batch = spec.batch_size.max(1);
        let parallel = spec.concurrency.max(1).div_ceil(batch);
        for_each_bounded(
            pull.messages()
                .take_until(shutdown.cancelled())
                .ready_chunks(batch),
            parallel,
            |msgs| {
                let js = js.clone();
                let spec = spec.clone();
                let handler = handler.clone();
                async move { process(&js, &spec, handler.as_ref(), msgs).await }
            },
        )
        .await;
        if let Some(e) = pull.ended() {
            tracing::warn!(error = %e, consumer = %spec.durable, "pull ended; pulling anew");
            metrics::counter!("consumer_pulls_renewed_total", "consumer" => spec.durable.clone())
                .increment(1);
            renew = true;
        }
    }
    Ok(())
}

/// Runs `work` on each item of `items`, at most `limit` at a time, until `items` ends.
///
/// `for_each_concurrent` does the same through `FuturesUnordered`, which wakes its own task
/// whenever every future it holds has been polled and is still pending: with one batch in
/// flight, after every statement a handler sent. Tokio takes that wake-up for a yield: it
/// requeues the task and wakes the other worker thread to steal it, which then also takes the
/// socket poller, so each step of a saga paid two thread wake-ups and the answer from Postgres
/// was read on the other core. This polls every future in flight on every wake-up instead, and
/// never wakes itself: meant for the few batches a consumer runs at once (`CONSUMER_CONCURRENCY`
/// over `CONSUMER_BATCH`, one by default). Tokio's per-task budget still makes it yield when
/// `items` stays ready for long.
pub async fn for_each_bounded<S, F, Fut>(items: S, limit: usize, mut work: F)
where
    S: futures_util::Stream,
    F: FnMut(S::Item) -> Fut,
    Fut: Future<Output = ()>,
{
    let limit = limit.max(1);
    let mut items = std::pin::pin!(items);
    let mut ended = false;
    let mut running: Vec<std::pin::Pin<Box<Fut>>> = Vec::with_capacity(limit);
    std::future::poll_fn(|cx| {
        running.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        while !ended && running.len() < limit {
            match items.as_mut().poll_next(cx) {
                std::task::Poll::Ready(Some(item)) => {
                    let mut f = Box::pin(work(item));
                    if f.as_mut().poll(cx).is_pending() {
                        running.push(f);
                    }
                }
                std::task::Poll::Ready(None) => ended = true,
                std::task::Poll::Pending => break,
            }
        }
        // Every future in `running` and, below the limit, `items` has registered this task's
        // waker: whichever can move on wakes it.
        if ended && running.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await
}

/// A delivered message with its decoded envelope (or why it could not be decoded) and span.
struct Delivery {
    msg: jetstream::Message,
    delivered: i64,
    span: tracing::Span,
    decoded: Result<Envelope, HandlerError>,
}

fn prepare(spec: &ConsumerSpec, msg: jetstream::Message) -> Delivery {
    let delivered = msg.info().map(|i| i.delivered).unwrap_or(1);
    if delivered > 1 {
        metrics::counter!("messages_redelivered_total", "consumer" => spec.durable.clone())
            .increment(1);
    }
    let subject = msg.subject.as_str();
    let header = |name: &str| {
        msg.headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str())
            .unwrap_or_default()
    };
    let parent = propagation::context_from_headers(msg.headers.as_ref());
    // The same span either way; only its target differs, which keeps the part of a trace the
    // sampler drops out of OpenTelemetry (`telemetry::UNTRACED`).
    macro_rules! process_span {
        ($target:expr) => {
            tracing::info_span!(
                target: $target,
                "process",
                otel.name = tracing::field::Empty,
                otel.kind = "consumer",
                otel.status_code = tracing::field::Empty,
                otel.status_description = tracing::field::Empty,
                messaging.system = "nats",
                messaging.destination.name = %subject,
                messaging.operation.type = "process",
                messaging.message.id = %header(header::MSG_ID),
                messaging.consumer.group.name = %spec.durable,
                delivery = delivered,
                saga_id = %header(header::SAGA_ID),
                trace_id = tracing::field::Empty,
            )
        };
    }
    let span = if crate::telemetry::untraced(&parent) {
        process_span!(crate::telemetry::UNTRACED)
    } else {
        process_span!(module_path!())
    };
    crate::telemetry::name_span(&span, || format!("{subject} process"));
    crate::telemetry::set_parent(&span, parent);
    crate::telemetry::record_trace_id(&span);
    let decoded = if msg.payload.len() > MAX_MESSAGE_BYTES {
        Err(HandlerError::Permanent(format!(
            "message of {} bytes exceeds the limit of {MAX_MESSAGE_BYTES}",
            msg.payload.len()
        )))
    } else {
        Envelope::decode(&msg.payload).map_err(|e| HandlerError::Permanent(e.to_string()))
    };
    Delivery {
        msg,
        delivered,
        span,
        decoded,
    }
}

async fn process<H: Handler>(
    js: &jetstream::Context,
    spec: &ConsumerSpec,
    handler: &H,
    msgs: Vec<jetstream::Message>,
) {
    let mut deliveries = Vec::with_capacity(msgs.len());
    let mut incoming = Vec::with_capacity(msgs.len());
    let mut index = Vec::with_capacity(msgs.len());
    let mut outcomes: Vec<Result<(), HandlerError>> = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.into_iter().enumerate() {
        let d = prepare(spec, m);
        match d.decoded {
            Ok(envelope) => {
                incoming.push(Incoming {
                    envelope,
                    subject: d.msg.subject.to_string(),
                    delivered: d.delivered,
                    span: d.span.clone(),
                });
                index.push(i);
                outcomes.push(Ok(()));
            }
            Err(e) => outcomes.push(Err(e)),
        }
        deliveries.push((d.msg, d.delivered, d.span));
    }
    let results = match incoming.len() {
        0 => Vec::new(),
        1 => {
            let one = incoming.pop().into_iter().next();
            match one {
                Some(m) => {
                    let span = m.span.clone();
                    vec![handler.handle(m).instrument(span).await]
                }
                None => Vec::new(),
            }
        }
        _ => handler.handle_batch(incoming).await,
    };
    for (i, r) in index.into_iter().zip(results) {
        outcomes[i] = r;
    }
    for ((msg, delivered, span), outcome) in deliveries.into_iter().zip(outcomes) {
        // Instrumented, never entered: an entered span held across an await stays current on
        // the thread the task was suspended on, and a span another task opens there under it
        // after it closed panics in tracing-subscriber (seen at 64 in flight).
        settle(js, spec, &msg, delivered, &span, outcome)
            .instrument(span.clone())
            .await;
    }
}

/// Acknowledges, retries or dead-letters a message; runs in its span.
async fn settle(
    js: &jetstream::Context,
    spec: &ConsumerSpec,
    msg: &jetstream::Message,
    delivered: i64,
    span: &tracing::Span,
    outcome: Result<(), HandlerError>,
) {
    match outcome {
        Ok(()) => ack(msg, AckKind::Ack).await,
        Err(HandlerError::Transient(e)) if delivered < spec.max_deliver => {
            span.record("otel.status_code", "ERROR");
            span.record("otel.status_description", e.as_str());
            tracing::warn!(error = %e, delivery = delivered, "handler failed; will retry");
            ack(msg, AckKind::Nak(Some(retry_delay(delivered)))).await;
        }
        Err(e) => {
            span.record("otel.status_code", "ERROR");
            let reason = match &e {
                HandlerError::Transient(e) => format!("gave up after {delivered} deliveries: {e}"),
                HandlerError::Permanent(e) => e.clone(),
            };
            span.record("otel.status_description", reason.as_str());
            tracing::error!(error = %reason, "dead-lettering message");
            match dead_letter(js, msg, &spec.durable, &reason, delivered).await {
                Ok(()) => ack(msg, AckKind::Ack).await,
                Err(e) => {
                    tracing::error!(error = %e, "cannot dead-letter; will retry");
                    ack(msg, AckKind::Nak(Some(Duration::from_secs(1)))).await;
                }
            }
        }
    }
}

async fn ack(msg: &jetstream::Message, kind: AckKind) {
    if let Err(e) = msg.ack_with(kind).await {
        // The message will be redelivered after ack_wait; handlers are idempotent.
        tracing::warn!(error = %e, "ack failed");
    }
}

/// Exponential backoff with jitter, capped at 30 s.
pub fn retry_delay(delivered: i64) -> Duration {
    let exp = (delivered.clamp(1, 10) - 1) as u32;
    let base = 200u64.saturating_mul(1 << exp).min(30_000);
    let jitter = rand::random_range(0..=base / 4);
    Duration::from_millis(base + jitter)
}

/// Why a dead letter could not be written.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// The publish failed.
    #[error("publish to dead-letter stream failed: {0}")]
    Publish(String),
}

/// Publishes `msg` to `saga.dlq.<subject>`, keeping its headers and payload and adding the reason,
/// delivery count, time and consumer.
pub async fn dead_letter(
    js: &jetstream::Context,
    msg: &async_nats::Message,
    consumer: &str,
    reason: &str,
    delivered: i64,
) -> Result<(), DeadLetterError> {
    let mut headers = HeaderMap::new();
    if let Some(h) = msg.headers.as_ref() {
        for (k, values) in h.iter() {
            // The original id stays readable; the broker must not treat a later dead letter of a
            // replayed message as a duplicate.
            let name: &str = k.as_ref();
            let name = if name == header::MSG_ID {
                "Dlq-Original-Msg-Id"
            } else {
                name
            };
            for v in values {
                headers.append(name, v.as_str());
            }
        }
    }
    headers.insert(header::DLQ_ERROR, sanitize_header(reason).as_str());
    headers.insert(header::DLQ_SUBJECT, msg.subject.as_str());
    headers.insert(header::DLQ_DELIVERIES, delivered.to_string().as_str());
    headers.insert(header::DLQ_AT, chrono::Utc::now().to_rfc3339().as_str());
    headers.insert(header::DLQ_CONSUMER, consumer);
    let subject = format!("{DLQ_PREFIX}{}", msg.subject);
    js.publish_with_headers(subject, headers, msg.payload.clone())
        .await
        .map_err(|e| DeadLetterError::Publish(e.to_string()))?
        .await
        .map_err(|e| DeadLetterError::Publish(e.to_string()))?;
    metrics::counter!("dead_letters_total", "consumer" => consumer.to_owned()).increment(1);
    Ok(())
}

/// Header values may not contain line breaks; keep them short too.
fn sanitize_header(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(512)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls `fut` with a waker that counts its wake-ups.
    fn poll_counting<F: Future>(
        fut: std::pin::Pin<&mut F>,
        wakes: &Arc<CountingWaker>,
    ) -> std::task::Poll<F::Output> {
        let waker = std::task::Waker::from(wakes.clone());
        fut.poll(&mut std::task::Context::from_waker(&waker))
    }

    #[derive(Default)]
    struct CountingWaker(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn bounded_work_never_wakes_itself_and_keeps_to_its_limit() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..5)
            .map(|_| tokio::sync::oneshot::channel::<()>())
            .unzip();
        let (running, most, done) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let mut all = std::pin::pin!(for_each_bounded(
            futures_util::stream::iter(receivers),
            2,
            |rx| {
                let (running, most, done) = (running.clone(), most.clone(), done.clone());
                async move {
                    most.fetch_max(running.fetch_add(1, SeqCst) + 1, SeqCst);
                    let _ = rx.await;
                    running.fetch_sub(1, SeqCst);
                    done.fetch_add(1, SeqCst);
                }
            },
        ));
        let wakes = Arc::new(CountingWaker::default());
        assert!(poll_counting(all.as_mut(), &wakes).is_pending());
        // Two in flight, both waiting: nothing may wake the task but their senders.
        assert_eq!(wakes.0.load(SeqCst), 0);
        assert_eq!(running.load(SeqCst), 2);
        for (i, tx) in senders.into_iter().enumerate() {
            let _ = tx.send(());
            assert_eq!(wakes.0.load(SeqCst), i + 1, "woken by the sender, once");
            let finished = poll_counting(all.as_mut(), &wakes).is_ready();
            assert_eq!(finished, i == 4);
            assert_eq!(wakes.0.load(SeqCst), i + 1, "no wake-up of its own");
        }
        assert_eq!(done.load(SeqCst), 5);
        assert_eq!(most.load(SeqCst), 2);
    }

    #[test]
    fn retry_delay_grows_and_is_capped() {
        let first = retry_delay(1);
        let third = retry_delay(3);
        assert!(first >= Duration::from_millis(200) && first <= Duration::from_millis(250));
        assert!(third >= Duration::from_millis(800) && third <= Duration::from_millis(1000));
        assert!(retry_delay(50) <= Duration::from_millis(37_500));
    }

    #[test]
    fn header_values_lose_line_breaks() {
        assert_eq!(sanitize_header("a\r\nb"), "a  b");
        assert_eq!(sanitize_header(&"x".repeat(600)).len(), 512);
    }
}
