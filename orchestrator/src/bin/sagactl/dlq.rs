//! `sagactl dlq list|replay`: inspect and re-publish dead letters.

use anyhow::{Context, bail};
use async_nats::HeaderMap;
use async_nats::jetstream;

use saga_shared_events::contract::{STREAM_DLQ, header};

/// One dead letter.
#[derive(Debug, serde::Serialize)]
pub struct DeadLetter {
    /// Sequence in `SAGA_DLQ` (the id to replay).
    pub id: u64,
    /// Where it was first published.
    pub subject: String,
    /// Why it was set aside.
    pub error: String,
    /// Deliveries before it was set aside.
    pub deliveries: String,
    /// When.
    pub at: String,
    /// Payload size in bytes.
    pub bytes: usize,
}

/// Lists up to `limit` dead letters, oldest first.
pub async fn list(js: &jetstream::Context, limit: usize) -> anyhow::Result<Vec<DeadLetter>> {
    let mut stream = js
        .get_stream(STREAM_DLQ)
        .await
        .context("no SAGA_DLQ stream")?;
    let state = stream.info().await?.state.clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return Ok(out);
    }
    for seq in state.first_sequence..=state.last_sequence {
        if out.len() >= limit {
            break;
        }
        let Ok(msg) = stream.get_raw_message(seq).await else {
            continue;
        };
        let get = |name: &str| {
            msg.headers
                .get(name)
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default()
        };
        out.push(DeadLetter {
            id: seq,
            subject: get(header::DLQ_SUBJECT),
            error: get(header::DLQ_ERROR),
            deliveries: get(header::DLQ_DELIVERIES),
            at: get(header::DLQ_AT),
            bytes: msg.payload.len(),
        });
    }
    Ok(out)
}

/// Re-publishes dead letters to their original subjects (original headers and payload, a fresh
/// `Nats-Msg-Id`), then removes them from `SAGA_DLQ`. Returns how many were replayed.
pub async fn replay(js: &jetstream::Context, ids: Option<Vec<u64>>) -> anyhow::Result<usize> {
    let stream = js
        .get_stream(STREAM_DLQ)
        .await
        .context("no SAGA_DLQ stream")?;
    let ids = match ids {
        Some(ids) => ids,
        None => list(js, usize::MAX)
            .await?
            .into_iter()
            .map(|d| d.id)
            .collect(),
    };
    let mut replayed = 0;
    for seq in ids {
        let msg = stream
            .get_raw_message(seq)
            .await
            .with_context(|| format!("no dead letter {seq}"))?;
        let Some(subject) = msg
            .headers
            .get(header::DLQ_SUBJECT)
            .map(|v| v.as_str().to_owned())
        else {
            bail!("dead letter {seq} has no {} header", header::DLQ_SUBJECT);
        };
        let mut headers = HeaderMap::new();
        for (k, values) in msg.headers.iter() {
            let name: &str = k.as_ref();
            if name.starts_with("Dlq-") || name == header::MSG_ID {
                continue;
            }
            for v in values {
                headers.append(name, v.as_str());
            }
        }
        headers.insert(
            header::MSG_ID,
            format!("replay-{seq}-{}", uuid::Uuid::now_v7()).as_str(),
        );
        js.publish_with_headers(subject.clone(), headers, msg.payload.clone())
            .await?
            .await
            .with_context(|| format!("re-publishing {seq} to {subject}"))?;
        stream.delete_message(seq).await?;
        replayed += 1;
    }
    Ok(replayed)
}
