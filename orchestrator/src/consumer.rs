//! The reply consumer: turns participants' replies into saga events.

use sqlx::PgConnection;

use saga_shared_events::Body;
use saga_shared_events::consumer::{BatchWork, GroupCommit, HandlerError, Incoming};
use saga_shared_events::db::BatchPool;
use saga_shared_events::outbox::Outbox;

use crate::saga::machine::Event;
use crate::saga::store::{Applied, SagaEvent, SagaStore, StoreError};

fn valid_event(env: &saga_shared_events::Envelope) -> Option<Event> {
    event_of(&env.body).filter(|_| env.body.order_id() == env.saga_id)
}

fn invalid(env: &saga_shared_events::Envelope) -> HandlerError {
    if event_of(&env.body).is_none() {
        HandlerError::Permanent(format!("{} is not a reply", env.body.message_type()))
    } else {
        HandlerError::Permanent("payload order_id differs from saga_id".into())
    }
}

/// Handles `saga.reply.>`.
pub struct ReplyHandler {
    /// The saga store.
    pub store: SagaStore,
}

/// The saga event a reply stands for; `None` for a message that is not a reply.
pub fn event_of(body: &Body) -> Option<Event> {
    Some(match body {
        Body::InventoryReserved(_) => Event::InventoryReserved,
        Body::InventoryRejected(r) => Event::InventoryRejected {
            detail: r.reason.clone(),
        },
        Body::InventoryReleased(_) => Event::InventoryReleased,
        Body::PaymentCharged(_) => Event::PaymentCharged,
        Body::PaymentDeclined(r) => Event::PaymentDeclined {
            detail: r.reason.clone(),
        },
        Body::PaymentRefunded(_) => Event::PaymentRefunded,
        Body::Shipped(_) => Event::Shipped,
        Body::ShippingFailed(r) => Event::ShippingFailed {
            detail: r.reason.clone(),
        },
        _ => return None,
    })
}

impl GroupCommit for ReplyHandler {
    /// The transitions.
    type Committed = Vec<Applied>;

    fn pool(&self) -> &BatchPool {
        self.store.batch_pool()
    }

    fn outbox(&self) -> &Outbox {
        self.store.outbox()
    }

    /// The replies of a batch: the store's set-based transition of every saga they concern. It
    /// reads the batch's sagas (unless it wrote them all last) and which replies it saw before,
    /// then writes the inbox entries, transitions and outbox row in one statement.
    async fn work(
        &self,
        conn: &mut PgConnection,
        msgs: &[Incoming],
    ) -> Result<BatchWork<Self::Committed>, HandlerError> {
        let mut outcomes: Vec<Result<(), HandlerError>> = msgs.iter().map(|_| Ok(())).collect();
        let mut valid = Vec::with_capacity(msgs.len());
        for (i, m) in msgs.iter().enumerate() {
            match valid_event(&m.envelope) {
                Some(event) => valid.push((i, event)),
                None => outcomes[i] = Err(invalid(&m.envelope)),
            }
        }
        let events: Vec<SagaEvent> = valid
            .iter()
            .map(|(i, event)| SagaEvent {
                order_id: msgs[*i].envelope.saga_id,
                event: event.clone(),
                causation_id: Some(msgs[*i].envelope.message_id),
                parent: msgs[*i].span.clone(),
            })
            .collect();
        let batch = self
            .store
            .apply_replies(conn, &events)
            .await
            .map_err(|e| match e {
                StoreError::Db(e) => HandlerError::from(e),
                e => HandlerError::Transient(e.to_string()),
            })?;
        let mut applied = Vec::with_capacity(batch.results.len());
        for ((i, _), result) in valid.iter().zip(batch.results) {
            match result {
                // A redelivered reply was applied before (or is a second copy in this very
                // batch): acknowledged, not applied twice.
                Ok(a) if a.duplicate => {
                    tracing::debug!(parent: &msgs[*i].span, "duplicate reply acknowledged")
                }
                Ok(a) => {
                    if !a.changed {
                        tracing::debug!(parent: &msgs[*i].span, "late or duplicate reply ignored");
                    }
                    applied.push(a);
                }
                // A reply for no saga is dead-lettered (and was not recorded in the inbox).
                Err(e) => outcomes[*i] = Err(HandlerError::Permanent(e.to_string())),
            }
        }
        Ok(BatchWork {
            outcomes,
            messages: batch.outbox,
            committed: applied,
        })
    }

    fn after_commit(&self, applied: Self::Committed) {
        for a in &applied {
            a.record_metrics();
        }
    }
}
