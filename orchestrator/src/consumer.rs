//! The reply consumer: turns participants' replies into saga events.

use saga_shared_events::Body;
use saga_shared_events::consumer::{Handler, HandlerError, Incoming};
use saga_shared_events::inbox;

use crate::saga::machine::Event;
use crate::saga::store::{SagaStore, StoreError};

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
    async fn handle(&self, msg: Incoming) -> Result<(), HandlerError> {
        let env = &msg.envelope;
        let Some(event) = event_of(&env.body) else {
            return Err(HandlerError::Permanent(format!(
                "{} is not a reply",
                env.body.message_type()
            )));
        };
        let order_id = env.body.order_id();
        if order_id != env.saga_id {
            return Err(HandlerError::Permanent(
                "payload order_id differs from saga_id".into(),
            ));
        }
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
