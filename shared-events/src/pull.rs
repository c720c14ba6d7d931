//! Pull requests of our own on a durable consumer, in place of `async-nats`' pull stream.
//!
//! That stream counts the messages it still expects in one task while another sends the pull
//! requests and reports each one afterwards. Messages of a request that arrive before its report
//! are subtracted from a count that does not hold them yet (saturating at zero), so the count
//! drifts upwards until the client waits for messages it never asked for and stops pulling: every
//! saga stalled until the heartbeat check noticed (seen at 256 in flight). Here the task that
//! reads the messages also sends each request and counts it before it reads on, so the count is
//! exact.

use std::pin::Pin;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::{Client, StatusCode, Subject, Subscriber};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::time::{Instant, Sleep};

/// The JetStream API prefix of a context made by `jetstream::new` (no domain).
const API_PREFIX: &str = "$JS.API";

/// How a consumer pulls.
#[derive(Debug, Clone, Copy)]
pub struct PullOptions {
    /// Messages asked for in one request; the next request goes out when half are delivered.
    pub batch: usize,
    /// How long the broker keeps a request it cannot fill.
    pub expires: Duration,
    /// How often the broker reports a request it holds with nothing to deliver. Silence for twice
    /// this means it holds none of ours any more (lost, or the consumer is gone).
    pub heartbeat: Duration,
}

/// Why a pull ended; the caller makes sure the consumer exists and pulls anew.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("cannot subscribe to the pull inbox: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    #[error("cannot send a pull request: {0}")]
    Request(#[from] async_nats::PublishError),
    #[error("no message or heartbeat from the server for two heartbeats")]
    Silent,
    #[error("the server ended the pull: {0}")]
    Ended(String),
    #[error("the pull inbox's subscription closed")]
    Closed,
}

/// Messages of one durable consumer, pulled on an inbox of our own.
pub struct Pull {
    client: Client,
    context: jetstream::Context,
    subject: Subject,
    inbox: Subject,
    subscription: Subscriber,
    request: Bytes,
    batch: usize,
    /// Messages asked for that the broker has neither delivered nor given up on.
    expected: usize,
    heartbeat: Duration,
    last_heard: Instant,
    /// Changes when a client of this process reconnects ([`crate::nats::reconnections`]).
    reconnections: tokio::sync::watch::Receiver<u64>,
    watchdog: Pin<Box<Sleep>>,
    /// What ended [`Pull::messages`].
    ended: Option<PullError>,
}

impl Pull {
    /// Subscribes to a new inbox for the consumer `durable` of `stream`; the first request goes
    /// out with the first call to [`Pull::next`].
    pub async fn start(
        js: &jetstream::Context,
        stream: &str,
        durable: &str,
        options: PullOptions,
    ) -> Result<Self, PullError> {
        let client = js.client();
        let inbox = Subject::from(client.new_inbox());
        let subscription = client.subscribe(inbox.clone()).await?;
        let batch = options.batch.max(1);
        let request = serde_json::json!({
            "batch": batch,
            "expires": options.expires.as_nanos() as u64,
            "idle_heartbeat": options.heartbeat.as_nanos() as u64,
        });
        let heartbeat = options.heartbeat;
        let mut reconnections = crate::nats::reconnections();
        reconnections.mark_unchanged();
        Ok(Self {
            client,
            context: js.clone(),
            subject: Subject::from(format!("{API_PREFIX}.CONSUMER.MSG.NEXT.{stream}.{durable}")),
            inbox,
            subscription,
            request: Bytes::from(request.to_string()),
            batch,
            expected: 0,
            heartbeat,
            last_heard: Instant::now(),
            reconnections,
            watchdog: Box::pin(tokio::time::sleep(heartbeat * 2)),
            ended: None,
        })
    }

    /// The next message. An error ends this pull: the broker no longer holds a request of ours.
    pub async fn next(&mut self) -> Result<jetstream::Message, PullError> {
        loop {
            if self.expected <= self.batch / 2 {
                self.client
                    .publish_with_reply(
                        self.subject.clone(),
                        self.inbox.clone(),
                        self.request.clone(),
                    )
                    .await?;
                // Counted before any message is read, so none of this request's can be missed.
                self.expected += self.batch;
                // The broker gets its two heartbeats' time to answer a request, however long
                // the handlers kept this pull from reading.
                self.last_heard = Instant::now();
            }
            let message = tokio::select! {
                biased;
                message = self.subscription.next() => message.ok_or(PullError::Closed)?,
                Ok(()) = self.reconnections.changed() => {
                    // Our requests went with the old connection; the inbox's subscription was
                    // renewed before anything sent from now on. Whatever an old request still
                    // delivers arrives here all the same and only lowers the count.
                    tracing::info!(consumer = %self.subject, "NATS reconnected; pulling again");
                    self.expected = 0;
                    continue;
                }
                () = &mut self.watchdog => {
                    // Re-armed only when it fires, not for every message.
                    let due = self.last_heard + self.heartbeat * 2;
                    let connected =
                        self.client.connection_state() == async_nats::connection::State::Connected;
                    // Disconnected, silence is expected: the reconnection asks again.
                    if Instant::now() >= due && connected {
                        return Err(PullError::Silent);
                    }
                    let now = Instant::now();
                    let next = if due > now { due } else { now + self.heartbeat };
                    self.watchdog.as_mut().reset(next);
                    continue;
                }
            };
            self.last_heard = Instant::now();
            match message.status {
                None | Some(StatusCode::OK) => {
                    self.expected = self.expected.saturating_sub(1);
                    return Ok(jetstream::Message {
                        message,
                        context: self.context.clone(),
                    });
                }
                Some(StatusCode::IDLE_HEARTBEAT) => {}
                Some(StatusCode::NO_RESPONDERS) => {
                    return Err(PullError::Ended("no responders".into()));
                }
                Some(status) => {
                    let description = message.description.as_deref().unwrap_or_default();
                    if description.contains("Deleted") || description.contains("push based") {
                        return Err(PullError::Ended(format!("{status} {description}")));
                    }
                    // A request expired or was ended (408, 409): it will deliver no more than
                    // the broker says it left; without a figure, assume all of a batch, as
                    // asking for too much only costs a request the broker holds in vain.
                    let left = message
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("Nats-Pending-Messages"))
                        .and_then(|v| v.as_str().parse().ok())
                        .unwrap_or(self.batch);
                    self.expected = self.expected.saturating_sub(left);
                    tracing::debug!(%status, description, left, "pull request ended");
                }
            }
        }
    }

    /// The messages as a stream, which ends with the pull; [`Pull::ended`] then says why.
    pub fn messages(&mut self) -> impl futures_util::Stream<Item = jetstream::Message> + '_ {
        futures_util::stream::unfold(self, |pull| async move {
            match pull.next().await {
                Ok(message) => Some((message, pull)),
                Err(e) => {
                    pull.ended = Some(e);
                    None
                }
            }
        })
    }

    /// Why [`Pull::messages`] ended, if an error ended it (rather than its consumer stopping).
    pub fn ended(&mut self) -> Option<PullError> {
        self.ended.take()
    }
}
