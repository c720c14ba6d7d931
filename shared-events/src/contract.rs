//! The wire contract: envelopes, commands, replies, order events and subject names.
//!
//! Plain data only (no tokio, sqlx or NATS here), so that every service and every test reads the
//! same definitions. Changes are additive; a breaking change gets a new `version` and subject.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde::de::value::{MapAccessDeserializer, StrDeserializer};
use serde::de::{DeserializeSeed, MapAccess};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

/// The only wire version this build speaks. Messages with another version are dead-lettered.
pub const WIRE_VERSION: u32 = 1;

/// Stream holding commands to participants (work-queue retention).
pub const STREAM_CMD: &str = "SAGA_CMD";
/// Stream holding participants' replies to the orchestrator (work-queue retention).
pub const STREAM_REPLY: &str = "SAGA_REPLY";
/// Stream holding order lifecycle events for any subscriber (limits retention).
pub const STREAM_ORDERS: &str = "ORDERS";
/// Stream holding dead letters (`saga.dlq.<original subject>`).
pub const STREAM_DLQ: &str = "SAGA_DLQ";

/// Subject prefix of dead letters; the original subject follows it.
pub const DLQ_PREFIX: &str = "saga.dlq.";

/// NATS header names. async-nats header names are case-sensitive, so these are the one spelling.
pub mod header {
    /// JetStream de-duplication id: the outbox row id.
    pub const MSG_ID: &str = "Nats-Msg-Id";
    /// The saga (= order) the message belongs to.
    pub const SAGA_ID: &str = "Saga-Id";
    /// The envelope's `type`, so tools can route without decoding the payload.
    pub const MESSAGE_TYPE: &str = "Message-Type";
    /// The message id that caused this one (a reply names its command).
    pub const CAUSATION_ID: &str = "Causation-Id";
    /// Dead letters: why the message was set aside.
    pub const DLQ_ERROR: &str = "Dlq-Error";
    /// Dead letters: the subject the message was first published on.
    pub const DLQ_SUBJECT: &str = "Dlq-Original-Subject";
    /// Dead letters: how many times it had been delivered.
    pub const DLQ_DELIVERIES: &str = "Dlq-Delivery-Count";
    /// Dead letters: when it was set aside (RFC 3339).
    pub const DLQ_AT: &str = "Dlq-At";
    /// Dead letters: the consumer that gave up on it.
    pub const DLQ_CONSUMER: &str = "Dlq-Consumer";
}

/// A participant service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Participant {
    /// Stock reservations.
    Inventory,
    /// Charges and refunds.
    Payment,
    /// Shipments.
    Shipping,
}

impl Participant {
    /// The lowercase name used in subjects, consumer names and databases.
    pub fn as_str(self) -> &'static str {
        match self {
            Participant::Inventory => "inventory",
            Participant::Payment => "payment",
            Participant::Shipping => "shipping",
        }
    }

    /// The filter subject of this participant's command consumer.
    pub fn command_filter(self) -> String {
        format!("saga.cmd.{}.>", self.as_str())
    }
}

/// Why an order was cancelled or failed. Serialized names are part of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelReason {
    /// Inventory refused the reservation (unknown product or too little stock).
    InventoryRejected,
    /// The payment was declined.
    PaymentDeclined,
    /// The shipment failed.
    ShippingFailed,
    /// A user asked to cancel.
    CancelRequested,
    /// A step got no answer within its retry budget.
    TimedOut,
}

impl CancelReason {
    /// The API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            CancelReason::InventoryRejected => "inventory_rejected",
            CancelReason::PaymentDeclined => "payment_declined",
            CancelReason::ShippingFailed => "shipping_failed",
            CancelReason::CancelRequested => "cancel_requested",
            CancelReason::TimedOut => "timed_out",
        }
    }

    /// Parses the API spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "inventory_rejected" => CancelReason::InventoryRejected,
            "payment_declined" => CancelReason::PaymentDeclined,
            "shipping_failed" => CancelReason::ShippingFailed,
            "cancel_requested" => CancelReason::CancelRequested,
            "timed_out" => CancelReason::TimedOut,
            _ => return None,
        })
    }
}

/// One order line as the participants see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Line {
    /// Product identifier (1 to 64 characters).
    pub product_id: String,
    /// Units (1 to 1000).
    pub quantity: i32,
}

/// `inventory.reserve`: hold stock for every line, or none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReserveInventory {
    /// The order.
    pub order_id: Uuid,
    /// What to hold.
    pub lines: Vec<Line>,
}

/// `payment.charge`: charge the customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChargePayment {
    /// The order.
    pub order_id: Uuid,
    /// Who pays.
    pub customer_id: String,
    /// How much, in minor units.
    pub amount_cents: i64,
}

/// `shipping.ship`: ship the order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipOrder {
    /// The order.
    pub order_id: Uuid,
    /// Who receives it.
    pub customer_id: String,
}

/// A command or reply that only names the order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRef {
    /// The order.
    pub order_id: Uuid,
}

/// A negative reply, with the participant's reason in human words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// The order.
    pub order_id: Uuid,
    /// Why, for people (shown as `cancel_detail`).
    pub reason: String,
}

/// `payment.charged`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charged {
    /// The order.
    pub order_id: Uuid,
    /// The amount charged, in minor units.
    pub amount_cents: i64,
}

/// An order lifecycle event on `orders.<event>.v1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderEvent {
    /// The order.
    pub order_id: Uuid,
    /// The API status after the event.
    pub status: String,
    /// Set when cancelled or failed.
    pub cancel_reason: Option<CancelReason>,
    /// Human words for the reason.
    pub cancel_detail: Option<String>,
    /// The order total, in minor units.
    pub total_cents: i64,
}

/// Every message body on the wire, tagged by `type` with its data in `payload`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "payload")]
pub enum Body {
    /// Command to inventory.
    #[serde(rename = "inventory.reserve")]
    ReserveInventory(ReserveInventory),
    /// Compensation command to inventory: give the stock back (also before a reservation).
    #[serde(rename = "inventory.release")]
    ReleaseInventory(OrderRef),
    /// Command to payment.
    #[serde(rename = "payment.charge")]
    ChargePayment(ChargePayment),
    /// Compensation command to payment: refund (also before a charge, which then never happens).
    #[serde(rename = "payment.refund")]
    RefundPayment(OrderRef),
    /// Command to shipping.
    #[serde(rename = "shipping.ship")]
    ShipOrder(ShipOrder),
    /// Command to shipping: stop a shipment that has not gone out; answered `shipped` if too late.
    #[serde(rename = "shipping.cancel")]
    CancelShipment(OrderRef),
    /// Reply from inventory.
    #[serde(rename = "inventory.reserved")]
    InventoryReserved(OrderRef),
    /// Reply from inventory.
    #[serde(rename = "inventory.rejected")]
    InventoryRejected(Refusal),
    /// Reply from inventory.
    #[serde(rename = "inventory.released")]
    InventoryReleased(OrderRef),
    /// Reply from payment.
    #[serde(rename = "payment.charged")]
    PaymentCharged(Charged),
    /// Reply from payment.
    #[serde(rename = "payment.declined")]
    PaymentDeclined(Refusal),
    /// Reply from payment.
    #[serde(rename = "payment.refunded")]
    PaymentRefunded(OrderRef),
    /// Reply from shipping.
    #[serde(rename = "shipping.shipped")]
    Shipped(OrderRef),
    /// Reply from shipping.
    #[serde(rename = "shipping.failed")]
    ShippingFailed(Refusal),
    /// Order event.
    #[serde(rename = "orders.created")]
    OrderCreated(OrderEvent),
    /// Order event (shipped).
    #[serde(rename = "orders.completed")]
    OrderCompleted(OrderEvent),
    /// Order event.
    #[serde(rename = "orders.cancelled")]
    OrderCancelled(OrderEvent),
    /// Order event (compensation gave up; needs an operator).
    #[serde(rename = "orders.failed")]
    OrderFailed(OrderEvent),
}

/// Subject filters for the events that end a saga (completed, cancelled, failed), any wire
/// version: what a client that waits for orders to end subscribes to, so it is not sent the
/// other order events.
pub const ORDER_ENDING_SUBJECTS: [&str; 3] = [
    "orders.completed.>",
    "orders.cancelled.>",
    "orders.failed.>",
];

impl Body {
    /// The `type` tag, as it appears in the envelope and the `Message-Type` header.
    pub fn message_type(&self) -> &'static str {
        match self {
            Body::ReserveInventory(_) => "inventory.reserve",
            Body::ReleaseInventory(_) => "inventory.release",
            Body::ChargePayment(_) => "payment.charge",
            Body::RefundPayment(_) => "payment.refund",
            Body::ShipOrder(_) => "shipping.ship",
            Body::CancelShipment(_) => "shipping.cancel",
            Body::InventoryReserved(_) => "inventory.reserved",
            Body::InventoryRejected(_) => "inventory.rejected",
            Body::InventoryReleased(_) => "inventory.released",
            Body::PaymentCharged(_) => "payment.charged",
            Body::PaymentDeclined(_) => "payment.declined",
            Body::PaymentRefunded(_) => "payment.refunded",
            Body::Shipped(_) => "shipping.shipped",
            Body::ShippingFailed(_) => "shipping.failed",
            Body::OrderCreated(_) => "orders.created",
            Body::OrderCompleted(_) => "orders.completed",
            Body::OrderCancelled(_) => "orders.cancelled",
            Body::OrderFailed(_) => "orders.failed",
        }
    }

    /// The subject this body is published on: `saga.cmd.<participant>.<action>.v1`,
    /// `saga.reply.<participant>.<outcome>.v1` or `orders.<event>.v1`.
    pub fn subject(&self) -> String {
        let ty = self.message_type();
        let kind = match self {
            Body::ReserveInventory(_)
            | Body::ReleaseInventory(_)
            | Body::ChargePayment(_)
            | Body::RefundPayment(_)
            | Body::ShipOrder(_)
            | Body::CancelShipment(_) => "saga.cmd.",
            Body::OrderCreated(_)
            | Body::OrderCompleted(_)
            | Body::OrderCancelled(_)
            | Body::OrderFailed(_) => "",
            _ => "saga.reply.",
        };
        format!("{kind}{ty}.v{WIRE_VERSION}")
    }

    /// The order this message is about.
    pub fn order_id(&self) -> Uuid {
        match self {
            Body::ReserveInventory(c) => c.order_id,
            Body::ChargePayment(c) => c.order_id,
            Body::ShipOrder(c) => c.order_id,
            Body::ReleaseInventory(r)
            | Body::RefundPayment(r)
            | Body::CancelShipment(r)
            | Body::InventoryReserved(r)
            | Body::InventoryReleased(r)
            | Body::PaymentRefunded(r)
            | Body::Shipped(r) => r.order_id,
            Body::InventoryRejected(r) | Body::PaymentDeclined(r) | Body::ShippingFailed(r) => {
                r.order_id
            }
            Body::PaymentCharged(c) => c.order_id,
            Body::OrderCreated(e)
            | Body::OrderCompleted(e)
            | Body::OrderCancelled(e)
            | Body::OrderFailed(e) => e.order_id,
        }
    }
}

/// The envelope every message travels in. Read with [`Envelope::decode`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Envelope {
    /// Unique per publish; also the `Nats-Msg-Id` and the inbox key.
    pub message_id: Uuid,
    /// The saga (= the order id).
    pub saga_id: Uuid,
    /// The message that caused this one, if any.
    pub causation_id: Option<Uuid>,
    /// Wire version of `type`.
    pub version: u32,
    /// When the sender decided to send it.
    pub occurred_at: DateTime<Utc>,
    /// `type` and `payload`.
    #[serde(flatten)]
    pub body: Body,
}

/// Why bytes off the wire are not a message this build understands. Always permanent:
/// the message goes to the dead-letter stream.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not JSON, a missing field, a wrong type or an unknown `type`.
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    /// A version this build does not speak.
    #[error("unsupported version {version} of message type {message_type}")]
    UnsupportedVersion {
        /// The envelope's `type`.
        message_type: &'static str,
        /// The envelope's `version`.
        version: u32,
    },
}

impl Envelope {
    /// A new envelope with a fresh time-ordered id.
    pub fn new(saga_id: Uuid, causation_id: Option<Uuid>, body: Body) -> Self {
        Envelope {
            message_id: Uuid::now_v7(),
            saga_id,
            causation_id,
            version: WIRE_VERSION,
            occurred_at: Utc::now(),
            body,
        }
    }

    /// Serializes to the JSON payload.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain derived data into a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a payload and checks its version.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let wire: WireEnvelope<'_> = serde_json::from_slice(bytes)?;
        let body = Body::deserialize(MapAccessDeserializer::new(TaggedBody {
            message_type: Some(wire.message_type),
            payload: Some(wire.payload),
        }))?;
        if wire.version != WIRE_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                message_type: body.message_type(),
                version: wire.version,
            });
        }
        Ok(Envelope {
            message_id: wire.message_id,
            saga_id: wire.saga_id,
            causation_id: wire.causation_id,
            version: wire.version,
            occurred_at: wire.occurred_at,
            body,
        })
    }
}

/// An envelope as read off the wire, its body's `type` and `payload` kept apart so that the body
/// is decoded straight from them. A derived `Deserialize` with `#[serde(flatten)]` first copies
/// every field it does not know into a buffer of its own: over 40 % of a consumer's preparation
/// of each message in a profile at 1 in flight.
#[derive(Deserialize)]
struct WireEnvelope<'a> {
    message_id: Uuid,
    saga_id: Uuid,
    causation_id: Option<Uuid>,
    version: u32,
    occurred_at: DateTime<Utc>,
    #[serde(rename = "type", borrow)]
    message_type: Cow<'a, str>,
    #[serde(borrow)]
    payload: &'a RawValue,
}

/// `type` then `payload`, as a map for `Body`'s adjacently tagged `Deserialize`: with the tag
/// first, it decodes the payload without buffering it.
struct TaggedBody<'a> {
    message_type: Option<Cow<'a, str>>,
    payload: Option<&'a RawValue>,
}

impl<'de> MapAccess<'de> for TaggedBody<'de> {
    type Error = serde_json::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Self::Error> {
        let key = if self.message_type.is_some() {
            "type"
        } else if self.payload.is_some() {
            "payload"
        } else {
            return Ok(None);
        };
        seed.deserialize(StrDeserializer::<serde_json::Error>::new(key))
            .map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, Self::Error> {
        if let Some(message_type) = self.message_type.take() {
            return seed.deserialize(StrDeserializer::<serde_json::Error>::new(&message_type));
        }
        match self.payload.take() {
            Some(payload) => seed.deserialize(payload),
            None => Err(serde::de::Error::custom("a value without a key")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_bodies() -> Vec<Body> {
        let order_id = Uuid::nil();
        let r = OrderRef { order_id };
        let no = Refusal {
            order_id,
            reason: "no".into(),
        };
        let ev = OrderEvent {
            order_id,
            status: "created".into(),
            cancel_reason: None,
            cancel_detail: None,
            total_cents: 5,
        };
        vec![
            Body::ReserveInventory(ReserveInventory {
                order_id,
                lines: vec![Line {
                    product_id: "p".into(),
                    quantity: 1,
                }],
            }),
            Body::ReleaseInventory(r.clone()),
            Body::ChargePayment(ChargePayment {
                order_id,
                customer_id: "c".into(),
                amount_cents: 5,
            }),
            Body::RefundPayment(r.clone()),
            Body::ShipOrder(ShipOrder {
                order_id,
                customer_id: "c".into(),
            }),
            Body::CancelShipment(r.clone()),
            Body::InventoryReserved(r.clone()),
            Body::InventoryRejected(no.clone()),
            Body::InventoryReleased(r.clone()),
            Body::PaymentCharged(Charged {
                order_id,
                amount_cents: 5,
            }),
            Body::PaymentDeclined(no.clone()),
            Body::PaymentRefunded(r.clone()),
            Body::Shipped(r),
            Body::ShippingFailed(no),
            Body::OrderCreated(ev.clone()),
            Body::OrderCompleted(ev.clone()),
            Body::OrderCancelled(ev.clone()),
            Body::OrderFailed(ev),
        ]
    }

    #[test]
    fn every_message_type_round_trips_through_its_wire_form() {
        for body in sample_bodies() {
            let env = Envelope::new(Uuid::nil(), Some(Uuid::nil()), body);
            let decoded = Envelope::decode(&env.encode()).unwrap();
            assert_eq!(decoded, env);
        }
    }

    #[test]
    fn subjects_follow_the_documented_scheme() {
        let subjects: Vec<String> = sample_bodies().iter().map(Body::subject).collect();
        assert!(subjects.contains(&"saga.cmd.payment.charge.v1".to_string()));
        assert!(subjects.contains(&"saga.reply.payment.declined.v1".to_string()));
        assert!(subjects.contains(&"saga.cmd.inventory.release.v1".to_string()));
        assert!(subjects.contains(&"orders.completed.v1".to_string()));
        for s in &subjects {
            assert!(s.ends_with(".v1"), "{s}");
        }
    }

    #[test]
    fn the_ending_subjects_match_exactly_the_events_that_end_a_saga() {
        for body in sample_bodies() {
            let subject = body.subject();
            let matched = ORDER_ENDING_SUBJECTS
                .iter()
                .any(|f| subject.starts_with(f.trim_end_matches('>')));
            let ends = matches!(
                body,
                Body::OrderCompleted(_) | Body::OrderCancelled(_) | Body::OrderFailed(_)
            );
            assert_eq!(matched, ends, "{subject}");
        }
    }

    #[test]
    fn the_envelope_has_a_stable_json_shape() {
        let env = Envelope {
            message_id: Uuid::nil(),
            saga_id: Uuid::nil(),
            causation_id: None,
            version: 1,
            occurred_at: DateTime::from_timestamp(0, 0).unwrap(),
            body: Body::RefundPayment(OrderRef {
                order_id: Uuid::nil(),
            }),
        };
        let json = serde_json::to_value(&env).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "message_id": "00000000-0000-0000-0000-000000000000",
                "saga_id": "00000000-0000-0000-0000-000000000000",
                "causation_id": null,
                "version": 1,
                "occurred_at": "1970-01-01T00:00:00Z",
                "type": "payment.refund",
                "payload": {"order_id": "00000000-0000-0000-0000-000000000000"}
            })
        );
    }

    #[test]
    fn decoding_takes_any_field_order_escapes_and_unknown_fields() {
        let order = "00000000-0000-0000-0000-000000000007";
        let json = format!(
            r#"{{"payload": {{"order_id": "{order}"}}, "added_later": [1, {{"x": 2}}],
                "type": "shipping\u002eshipped", "version": 1, "saga_id": "{order}",
                "occurred_at": "1970-01-01T00:00:00Z", "message_id": "{order}"}}"#
        );
        let decoded = Envelope::decode(json.as_bytes()).unwrap();
        assert_eq!(decoded.causation_id, None);
        assert_eq!(
            decoded.body,
            Body::Shipped(OrderRef {
                order_id: order.parse().unwrap()
            })
        );
    }

    #[test]
    fn a_missing_or_mistyped_type_or_payload_is_malformed() {
        let order = "00000000-0000-0000-0000-000000000007";
        let head = format!(
            r#""version": 1, "saga_id": "{order}", "message_id": "{order}",
               "occurred_at": "1970-01-01T00:00:00Z""#
        );
        for tail in [
            r#""type": "shipping.shipped""#.to_string(),
            format!(r#""payload": {{"order_id": "{order}"}}"#),
            format!(r#""type": 7, "payload": {{"order_id": "{order}"}}"#),
            r#""type": "shipping.shipped", "payload": {"order_id": 7}"#.to_string(),
            r#""type": "shipping.shipped", "payload": null"#.to_string(),
        ] {
            let json = format!("{{{head}, {tail}}}");
            assert!(
                matches!(
                    Envelope::decode(json.as_bytes()),
                    Err(DecodeError::Malformed(_))
                ),
                "{json}"
            );
        }
    }

    #[test]
    fn garbage_unknown_types_and_unknown_versions_are_rejected() {
        assert!(matches!(
            Envelope::decode(b"not json"),
            Err(DecodeError::Malformed(_))
        ));
        let mut v = serde_json::to_value(Envelope::new(
            Uuid::nil(),
            None,
            Body::Shipped(OrderRef {
                order_id: Uuid::nil(),
            }),
        ))
        .unwrap();
        v["type"] = "shipping.teleported".into();
        assert!(matches!(
            Envelope::decode(&serde_json::to_vec(&v).unwrap()),
            Err(DecodeError::Malformed(_))
        ));
        v["type"] = "shipping.shipped".into();
        v["version"] = 2.into();
        assert!(matches!(
            Envelope::decode(&serde_json::to_vec(&v).unwrap()),
            Err(DecodeError::UnsupportedVersion { version: 2, .. })
        ));
        v["version"] = 1.into();
        v["payload"] = serde_json::json!({"order_id": 7});
        assert!(Envelope::decode(&serde_json::to_vec(&v).unwrap()).is_err());
    }
}

#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;

    fn uuid() -> impl Strategy<Value = Uuid> {
        any::<u128>().prop_map(Uuid::from_u128)
    }

    fn text() -> impl Strategy<Value = String> {
        ".{0,80}"
    }

    fn reason() -> impl Strategy<Value = Option<CancelReason>> {
        prop_oneof![
            Just(None),
            Just(Some(CancelReason::InventoryRejected)),
            Just(Some(CancelReason::PaymentDeclined)),
            Just(Some(CancelReason::ShippingFailed)),
            Just(Some(CancelReason::CancelRequested)),
            Just(Some(CancelReason::TimedOut)),
        ]
    }

    /// Every message type with arbitrary contents.
    fn body() -> impl Strategy<Value = Body> {
        let line = (text(), any::<i32>()).prop_map(|(product_id, quantity)| Line {
            product_id,
            quantity,
        });
        let event = || {
            (uuid(), text(), reason(), text(), any::<i64>()).prop_map(
                |(order_id, status, cancel_reason, detail, total_cents)| OrderEvent {
                    order_id,
                    status,
                    cancel_reason,
                    cancel_detail: Some(detail),
                    total_cents,
                },
            )
        };
        prop_oneof![
            (uuid(), proptest::collection::vec(line, 0..5)).prop_map(|(order_id, lines)| {
                Body::ReserveInventory(ReserveInventory { order_id, lines })
            }),
            uuid().prop_map(|order_id| Body::ReleaseInventory(OrderRef { order_id })),
            (uuid(), text(), any::<i64>()).prop_map(|(order_id, customer_id, amount_cents)| {
                Body::ChargePayment(ChargePayment {
                    order_id,
                    customer_id,
                    amount_cents,
                })
            }),
            uuid().prop_map(|order_id| Body::RefundPayment(OrderRef { order_id })),
            (uuid(), text()).prop_map(|(order_id, customer_id)| Body::ShipOrder(ShipOrder {
                order_id,
                customer_id
            })),
            uuid().prop_map(|order_id| Body::CancelShipment(OrderRef { order_id })),
            uuid().prop_map(|order_id| Body::InventoryReserved(OrderRef { order_id })),
            (uuid(), text()).prop_map(|(order_id, reason)| Body::InventoryRejected(Refusal {
                order_id,
                reason
            })),
            uuid().prop_map(|order_id| Body::InventoryReleased(OrderRef { order_id })),
            (uuid(), any::<i64>()).prop_map(|(order_id, amount_cents)| Body::PaymentCharged(
                Charged {
                    order_id,
                    amount_cents
                }
            )),
            (uuid(), text())
                .prop_map(|(order_id, reason)| Body::PaymentDeclined(Refusal { order_id, reason })),
            uuid().prop_map(|order_id| Body::PaymentRefunded(OrderRef { order_id })),
            uuid().prop_map(|order_id| Body::Shipped(OrderRef { order_id })),
            (uuid(), text())
                .prop_map(|(order_id, reason)| Body::ShippingFailed(Refusal { order_id, reason })),
            event().prop_map(Body::OrderCreated),
            event().prop_map(Body::OrderCompleted),
            event().prop_map(Body::OrderCancelled),
            event().prop_map(Body::OrderFailed),
        ]
    }

    proptest! {
        #[test]
        fn every_message_type_round_trips(saga in uuid(), cause in proptest::option::of(uuid()), body in body()) {
            let env = Envelope::new(saga, cause, body);
            prop_assert_eq!(Envelope::decode(&env.encode()).unwrap(), env);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Envelope::decode(&bytes);
        }

        /// Valid messages with one byte changed, cut short, or with a field replaced by another
        /// JSON value: decoding returns an error or a message, never panics.
        #[test]
        fn damaged_messages_never_panic(
            body in body(),
            pos in any::<prop::sample::Index>(),
            byte in any::<u8>(),
            cut in any::<prop::sample::Index>(),
            field in prop::sample::select(vec!["message_id", "saga_id", "version", "type", "payload", "occurred_at"]),
            value in prop_oneof![Just(serde_json::Value::Null), any::<i64>().prop_map(serde_json::Value::from), ".{0,10}".prop_map(serde_json::Value::from)],
        ) {
            let bytes = Envelope::new(Uuid::nil(), None, body).encode();
            let mut flipped = bytes.clone();
            let i = pos.index(flipped.len());
            flipped[i] = byte;
            let _ = Envelope::decode(&flipped);
            let _ = Envelope::decode(&bytes[..cut.index(bytes.len())]);
            let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            v[field] = value;
            let _ = Envelope::decode(&serde_json::to_vec(&v).unwrap());
        }
    }
}
