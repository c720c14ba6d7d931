//! The reply consumer: turns participants' replies into saga events.

use saga_shared_events::Body;
use saga_shared_events::consumer::{self, Handler, HandlerError, Incoming};
use saga_shared_events::inbox;

use crate::saga::machine::Event;
use crate::saga::store::{SagaStore, StoreError};

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

impl Handler for ReplyHandler {
    /// Replies for different sagas in one transaction, locked in saga-id order (so concurrent
    /// batches cannot deadlock); if anything fails, each reply is retried on its own.
    async fn handle_batch(&self, mut msgs: Vec<Incoming>) -> Vec<Result<(), HandlerError>> {
        use tracing::Instrument;
        let mut order: Vec<usize> = (0..msgs.len()).collect();
        order.sort_by_key(|i| msgs[*i].envelope.saga_id);
        let mut outcomes: Vec<Result<(), HandlerError>> = msgs.iter().map(|_| Ok(())).collect();
        let mut applied = Vec::new();
        let batch: Result<(), StoreError> = async {
            let mut tx = self.store.pool().begin().await?;
            for &i in &order {
                let env = &msgs[i].envelope;
                let Some(event) = valid_event(env) else {
                    outcomes[i] = Err(invalid(env));
                    continue;
                };
                let span = msgs[i].span.clone();
                let done = async {
                    if !inbox::record(&mut tx, env.message_id).await? {
                        return Ok(None);
                    }
                    self.store
                        .apply_locked(&mut tx, env.saga_id, &event, Some(env.message_id))
                        .await
                        .map(Some)
                }
                .instrument(span)
                .await;
                match done {
                    Ok(a) => applied.extend(a),
                    Err(StoreError::NotFound(id)) => {
                        // Undo its inbox entry (a replay must not look like a duplicate); the
                        // rest of the batch goes on.
                        sqlx::query("delete from processed_message where message_id = $1")
                            .bind(env.message_id)
                            .execute(&mut *tx)
                            .await?;
                        outcomes[i] = Err(HandlerError::Permanent(format!("no saga {id}")));
                    }
                    Err(e) => return Err(e),
                }
            }
            tx.commit().await?;
            Ok(())
        }
        .instrument(tracing::info_span!(
            "commit batch",
            db.system = "postgresql",
            messages = msgs.len()
        ))
        .await;
        match batch {
            Ok(()) => {
                for mut a in applied {
                    a.record_metrics();
                    self.store
                        .outbox()
                        .publish_committed(std::mem::take(&mut a.messages));
                }
                outcomes
            }
            Err(e) => {
                tracing::debug!(error = %e, "batch failed; handling its replies one by one");
                consumer::one_by_one(self, std::mem::take(&mut msgs)).await
            }
        }
    }

    async fn handle(&self, msg: Incoming) -> Result<(), HandlerError> {
        let env = &msg.envelope;
        let Some(event) = valid_event(env) else {
            return Err(invalid(env));
        };
        let order_id = env.saga_id;
        let mut tx = self.store.pool().begin().await?;
        if !inbox::record(&mut tx, env.message_id).await? {
            tracing::debug!(saga_id = %order_id, "duplicate reply ignored");
            return Ok(());
        }
        match self
            .store
            .apply_locked(&mut tx, order_id, &event, Some(env.message_id))
            .await
        {
            Ok(mut applied) => {
                tx.commit().await?;
                applied.record_metrics();
                self.store
                    .outbox()
                    .publish_committed(std::mem::take(&mut applied.messages));
                if !applied.changed {
                    tracing::debug!(saga_id = %order_id, event = event.name(), "late or duplicate reply ignored");
                }
                Ok(())
            }
            Err(StoreError::NotFound(id)) => Err(HandlerError::Permanent(format!("no saga {id}"))),
            Err(StoreError::Db(e)) => Err(e.into()),
            Err(e) => Err(HandlerError::Transient(e.to_string())),
        }
    }
}
