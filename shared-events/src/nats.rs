//! NATS connection and idempotent JetStream topology (streams and durable pull consumers).

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};

use crate::contract::{STREAM_CMD, STREAM_DLQ, STREAM_ORDERS, STREAM_REPLY};

/// Failures talking to NATS during start-up or readiness checks.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// The server could not be reached.
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        /// The URL tried.
        url: String,
        /// Why.
        source: async_nats::ConnectError,
    },
    /// A stream could not be created or updated.
    #[error("cannot create or update stream {name}: {source}")]
    Stream {
        /// The stream.
        name: String,
        /// Why.
        source: async_nats::jetstream::context::CreateStreamError,
    },
    /// A stream is missing.
    #[error("stream {name} is not available: {source}")]
    GetStream {
        /// The stream.
        name: String,
        /// Why.
        source: async_nats::jetstream::context::GetStreamError,
    },
    /// The NATS credential settings are inconsistent or unreadable.
    #[error("NATS credentials: {0}")]
    Credentials(String),
    /// A consumer could not be created or updated.
    #[error("cannot create or update consumer {name}: {source}")]
    Consumer {
        /// The durable name.
        name: String,
        /// Why.
        source: async_nats::jetstream::stream::ConsumerError,
    },
}

/// Counts the reconnections of this process' clients from [`connect`]. A pull request does not
/// outlive its connection (a restarted broker forgot it, and the broker drops one whose inbox lost
/// its subscriber), so each [`crate::pull::Pull`] asks again as soon as this changes instead of
/// waiting for its silence check.
static RECONNECTIONS: std::sync::LazyLock<tokio::sync::watch::Sender<u64>> =
    std::sync::LazyLock::new(|| tokio::sync::watch::Sender::new(0));

/// Watches [`RECONNECTIONS`].
pub fn reconnections() -> tokio::sync::watch::Receiver<u64> {
    RECONNECTIONS.subscribe()
}

/// Connects with a client name and unlimited reconnects, retrying the first connection for up to
/// `wait` so services can start before the broker.
pub async fn connect(
    url: &str,
    name: &str,
    auth: &crate::config::NatsAuthArgs,
    wait: Duration,
) -> Result<async_nats::Client, NatsError> {
    auth.validate().map_err(NatsError::Credentials)?;
    let deadline = tokio::time::Instant::now() + wait;
    // `url` may list several servers separated by commas (the nodes of a cluster).
    let servers: Vec<&str> = url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    loop {
        // The client's first connection is not a reconnection.
        let connected_before = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut opts = async_nats::ConnectOptions::new()
            .name(name)
            // Each service's replies and deliveries arrive under its own prefix, so NATS
            // permissions can keep one service from reading another's (deploy/nats).
            .custom_inbox_prefix(format!("_INBOX_{name}"))
            .connection_timeout(Duration::from_secs(3))
            .max_reconnects(None)
            .event_callback(move |event| {
                let connected_before = connected_before.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            tracing::info!("NATS connected");
                            if connected_before.swap(true, std::sync::atomic::Ordering::Relaxed) {
                                RECONNECTIONS.send_modify(|n| *n += 1);
                            }
                        }
                        async_nats::Event::Disconnected => tracing::warn!("NATS disconnected"),
                        async_nats::Event::ServerError(e) => {
                            tracing::error!(error = %e, "NATS server error")
                        }
                        other => tracing::debug!(event = %other, "NATS event"),
                    }
                }
            });
        if let (Some(user), Some(pass)) = (&auth.nats_user, &auth.nats_password) {
            opts = opts.user_and_password(user.clone(), pass.clone());
        }
        if let Some(token) = &auth.nats_token {
            opts = opts.token(token.clone());
        }
        if let Some(seed) = &auth.nats_nkey_seed {
            opts = opts.nkey(seed.clone());
        }
        if let Some(path) = &auth.nats_creds {
            opts = opts.credentials_file(path).await.map_err(|e| {
                NatsError::Credentials(format!("NATS_CREDS {}: {e}", path.display()))
            })?;
        }
        if let Some(ca) = &auth.nats_tls_ca {
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&auth.nats_tls_cert, &auth.nats_tls_key) {
            opts = opts.add_client_certificate(cert.clone(), key.clone());
        }
        match opts.connect(servers.as_slice()).await {
            Ok(client) => return Ok(client),
            Err(source) if tokio::time::Instant::now() >= deadline => {
                return Err(NatsError::Connect {
                    url: url.to_string(),
                    source,
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "NATS not reachable yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// The stream definitions every service agrees on, at `replicas` copies each.
pub fn stream_configs(replicas: usize) -> Vec<stream::Config> {
    let dedup = Duration::from_secs(120);
    let mut configs = vec![
        stream::Config {
            name: STREAM_CMD.into(),
            subjects: vec!["saga.cmd.>".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            duplicate_window: dedup,
            ..Default::default()
        },
        stream::Config {
            name: STREAM_REPLY.into(),
            subjects: vec!["saga.reply.>".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            duplicate_window: dedup,
            ..Default::default()
        },
        stream::Config {
            name: STREAM_ORDERS.into(),
            subjects: vec!["orders.>".into()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            duplicate_window: dedup,
            max_age: Duration::from_secs(7 * 24 * 3600),
            ..Default::default()
        },
        stream::Config {
            name: STREAM_DLQ.into(),
            subjects: vec!["saga.dlq.>".into()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            duplicate_window: dedup,
            max_age: Duration::from_secs(30 * 24 * 3600),
            ..Default::default()
        },
    ];
    for c in &mut configs {
        c.num_replicas = replicas;
    }
    configs
}

/// Creates or updates every stream (safe to run from every replica at every start).
/// Warns about each stream whose settings, as the server reports them, are weaker than
/// recommended (`clustered`: the server is part of a cluster).
pub async fn ensure_streams(
    js: &jetstream::Context,
    replicas: usize,
    clustered: bool,
) -> Result<(), NatsError> {
    for config in stream_configs(replicas) {
        let name = config.name.clone();
        let info = js
            .create_or_update_stream(config)
            .await
            .map_err(|source| NatsError::Stream { name, source })?;
        for weakness in weaknesses(&info.config, clustered) {
            tracing::warn!(stream = %info.config.name, "{weakness}");
        }
    }
    Ok(())
}

/// How a stream's settings fall short of what the saga relies on. Postgres stays the source of
/// truth (deadlines re-send what the broker lost), but a lost message still costs a deadline.
pub fn weaknesses(config: &stream::Config, clustered: bool) -> Vec<String> {
    let mut found = Vec::new();
    if config.storage == stream::StorageType::Memory {
        found.push("memory storage: a broker restart loses every message not yet consumed".into());
    }
    if clustered && config.num_replicas < 3 {
        found.push(format!(
            "{} replica(s) on a NATS cluster: losing one node loses acknowledged messages; \
             set STREAM_REPLICAS=3",
            config.num_replicas.max(1)
        ));
    }
    if config.duplicate_window < Duration::from_secs(120) {
        found.push(format!(
            "duplicate window of {:?}: the outbox may republish after up to two minutes, and only \
             the inbox would catch the copy",
            config.duplicate_window
        ));
    }
    if config.discard == stream::DiscardPolicy::Old
        && (config.max_messages > 0 || config.max_bytes > 0)
        && config.retention == stream::RetentionPolicy::WorkQueue
    {
        found.push("size limits with discard old: unconsumed commands may be dropped".into());
    }
    found
}

/// Checks that every stream exists (readiness).
pub async fn check_streams(js: &jetstream::Context) -> Result<(), NatsError> {
    for config in stream_configs(1) {
        js.get_stream(&config.name)
            .await
            .map_err(|source| NatsError::GetStream {
                name: config.name.clone(),
                source,
            })?;
    }
    Ok(())
}

/// A durable pull consumer shared by all replicas of one service.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    /// The stream it reads.
    pub stream: String,
    /// Durable name (one per service kind, shared by replicas).
    pub durable: String,
    /// Subject filter.
    pub filter_subject: String,
    /// Deliveries before the message is dead-lettered.
    pub max_deliver: i64,
    /// How long a delivery may stay unacknowledged before redelivery.
    pub ack_wait: Duration,
    /// Messages a replica handles at once.
    pub concurrency: usize,
    /// Messages handed to the handler together (1 turns batching off).
    pub batch_size: usize,
}

impl ConsumerSpec {
    /// Creates or updates the durable consumer.
    pub async fn ensure(
        &self,
        js: &jetstream::Context,
    ) -> Result<consumer::Consumer<consumer::pull::Config>, NatsError> {
        let stream = js
            .get_stream(&self.stream)
            .await
            .map_err(|source| NatsError::GetStream {
                name: self.stream.clone(),
                source,
            })?;
        stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(self.durable.clone()),
                filter_subject: self.filter_subject.clone(),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: self.ack_wait,
                // One more than we act on, so our own dead-lettering at `max_deliver` runs first.
                max_deliver: self.max_deliver + 1,
                max_ack_pending: (self.concurrency as i64 * 4).max(256),
                ..Default::default()
            })
            .await
            .map_err(|source| NatsError::Consumer {
                name: self.durable.clone(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_streams_are_not_weak_on_a_single_node_and_r1_is_weak_on_a_cluster() {
        for c in stream_configs(1) {
            assert!(weaknesses(&c, false).is_empty(), "{}", c.name);
            assert_eq!(weaknesses(&c, true).len(), 1, "{}", c.name);
        }
        for c in stream_configs(3) {
            assert!(weaknesses(&c, true).is_empty(), "{}", c.name);
        }
        let mut memory = stream_configs(3).remove(0);
        memory.storage = stream::StorageType::Memory;
        memory.duplicate_window = Duration::from_secs(10);
        assert_eq!(weaknesses(&memory, true).len(), 2);
    }
}
