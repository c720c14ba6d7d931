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
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::contract::{DLQ_PREFIX, Envelope, header};
use crate::nats::{ConsumerSpec, NatsError};
use crate::propagation;

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
}

/// A service's message handler. Runs inside a span that continues the sender's trace.
pub trait Handler: Send + Sync + 'static {
    /// Handles one message; `Ok` acknowledges it.
    fn handle(&self, msg: Incoming) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// Pulls from the durable consumer described by `spec` until `shutdown`, then lets the handlers
/// in flight finish.
pub async fn run<H: Handler>(
    js: jetstream::Context,
    spec: ConsumerSpec,
    handler: Arc<H>,
    shutdown: CancellationToken,
) -> Result<(), NatsError> {
    let consumer = spec.ensure(&js).await?;
    let spec = Arc::new(spec);
    while !shutdown.is_cancelled() {
        let messages = consumer
            .stream()
            .max_messages_per_batch(spec.concurrency.max(1) * 2)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await;
        let messages = match messages {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, consumer = %spec.durable, "cannot pull; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        messages
            .take_until(shutdown.cancelled())
            .for_each_concurrent(spec.concurrency.max(1), |item| {
                let js = js.clone();
                let spec = spec.clone();
                let handler = handler.clone();
                async move {
                    match item {
                        Ok(msg) => process(&js, &spec, handler.as_ref(), msg).await,
                        Err(e) => tracing::debug!(error = %e, "pull stream error"),
                    }
                }
            })
            .await;
    }
    Ok(())
}

async fn process<H: Handler>(
    js: &jetstream::Context,
    spec: &ConsumerSpec,
    handler: &H,
    msg: jetstream::Message,
) {
    let delivered = msg.info().map(|i| i.delivered).unwrap_or(1);
    if delivered > 1 {
        metrics::counter!("messages_redelivered_total", "consumer" => spec.durable.clone())
            .increment(1);
    }
    let subject = msg.subject.to_string();
    let saga_id = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(header::SAGA_ID))
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    let msg_id = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(header::MSG_ID))
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    let span = tracing::info_span!(
        "process",
        otel.name = %format!("{subject} process"),
        otel.kind = "consumer",
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
        messaging.system = "nats",
        messaging.destination.name = %subject,
        messaging.operation.type = "process",
        messaging.message.id = %msg_id,
        messaging.consumer.group.name = %spec.durable,
        delivery = delivered,
        saga_id = %saga_id,
        trace_id = tracing::field::Empty,
    );
    let _ = span.set_parent(propagation::context_from_headers(msg.headers.as_ref()));
    crate::telemetry::record_trace_id(&span);

    let outcome = match Envelope::decode(&msg.payload) {
        Err(e) => Err(HandlerError::Permanent(e.to_string())),
        Ok(envelope) => {
            handler
                .handle(Incoming {
                    envelope,
                    subject: subject.clone(),
                    delivered,
                })
                .instrument(span.clone())
                .await
        }
    };
    let _enter = span.enter();
    match outcome {
        Ok(()) => ack(&msg, AckKind::Ack).await,
        Err(HandlerError::Transient(e)) if delivered < spec.max_deliver => {
            span.record("otel.status_code", "ERROR");
            span.record("otel.status_description", e.as_str());
            tracing::warn!(error = %e, delivery = delivered, "handler failed; will retry");
            ack(&msg, AckKind::Nak(Some(retry_delay(delivered)))).await;
        }
        Err(e) => {
            span.record("otel.status_code", "ERROR");
            let reason = match &e {
                HandlerError::Transient(e) => format!("gave up after {delivered} deliveries: {e}"),
                HandlerError::Permanent(e) => e.clone(),
            };
            span.record("otel.status_description", reason.as_str());
            tracing::error!(error = %reason, "dead-lettering message");
            match dead_letter(js, &msg, &spec.durable, &reason, delivered).await {
                Ok(()) => ack(&msg, AckKind::Ack).await,
                Err(e) => {
                    tracing::error!(error = %e, "cannot dead-letter; will retry");
                    ack(&msg, AckKind::Nak(Some(Duration::from_secs(1)))).await;
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
