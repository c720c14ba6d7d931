//! The order saga as a pure statig state machine: events in, state change and effects out.
//!
//! No I/O, no clock, no randomness here. The driver (`saga::store`) loads the stored state,
//! feeds one event, and persists the new state together with the effects as outbox rows in one
//! transaction. Effects are pushed from event handlers at the moment of a transition, never from
//! entry actions: statig re-runs entry actions when a stored machine is initialised.

use serde::{Deserialize, Serialize};
use statig::prelude::*;

use saga_shared_events::CancelReason;

/// Retry budgets the machine enforces. Timing lives in the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Sends of one forward command before the saga compensates with `timed_out`.
    pub step_max_attempts: u32,
    /// Sends of one compensation command before the saga lands in `failed`.
    pub compensation_max_attempts: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            step_max_attempts: 5,
            compensation_max_attempts: 20,
        }
    }
}

/// A command the saga sends to a participant. The driver fills in the payload from the order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// `inventory.reserve`.
    Reserve,
    /// `payment.charge`.
    Charge,
    /// `shipping.ship`.
    Ship,
    /// `shipping.cancel` (stop a shipment in flight).
    CancelShipment,
    /// `payment.refund`.
    Refund,
    /// `inventory.release`.
    Release,
}

/// A terminal outcome, published as an order event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SagaEnd {
    /// `orders.completed.v1`.
    Completed,
    /// `orders.cancelled.v1`.
    Cancelled,
    /// `orders.failed.v1`.
    Failed,
}

/// What the driver must do after an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Send (or re-send) a command.
    Send(Step),
    /// Publish the terminal order event.
    Finish(SagaEnd),
    /// Record why the saga is being cancelled (shown as `cancel_reason`/`cancel_detail`).
    SetReason(CancelReason, String),
    /// Await an answer: deadline after the `attempt`-th send (0-based); compensations use the
    /// capped schedule.
    ArmDeadline {
        /// 0 for the first send.
        attempt: u32,
        /// Whether this is a compensation step.
        compensating: bool,
    },
    /// Nothing is awaited any more.
    ClearDeadline,
}

/// The machine's context: the policy to enforce and the effects collected during one event.
#[derive(Debug, Default)]
pub struct SagaContext {
    /// Budgets.
    pub policy: Policy,
    /// Effects of the last event, in order.
    pub effects: Vec<Effect>,
}

impl SagaContext {
    /// A context with the given policy and no effects.
    pub fn new(policy: Policy) -> Self {
        SagaContext {
            policy,
            effects: Vec::new(),
        }
    }

    fn send(&mut self, step: Step, attempt: u32, compensating: bool) {
        self.effects.push(Effect::Send(step));
        self.effects.push(Effect::ArmDeadline {
            attempt,
            compensating,
        });
    }

    fn reason(&mut self, reason: CancelReason, detail: impl Into<String>) {
        self.effects.push(Effect::SetReason(reason, detail.into()));
    }

    fn finish(&mut self, outcome: SagaEnd) {
        self.effects.push(Effect::ClearDeadline);
        self.effects.push(Effect::Finish(outcome));
    }
}

/// Everything that can happen to a saga.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The order was accepted: start the first step.
    Start,
    /// Inventory held the stock.
    InventoryReserved,
    /// Inventory refused.
    InventoryRejected {
        /// Why, in words.
        detail: String,
    },
    /// Inventory gave the stock back.
    InventoryReleased,
    /// The payment went through.
    PaymentCharged,
    /// The payment was declined.
    PaymentDeclined {
        /// Why, in words.
        detail: String,
    },
    /// The payment was refunded (or voided before it happened).
    PaymentRefunded,
    /// The order shipped.
    Shipped,
    /// The shipment failed or was cancelled before it went out.
    ShippingFailed {
        /// Why, in words.
        detail: String,
    },
    /// A user asked to cancel.
    CancelRequested,
    /// The current step's deadline passed with no answer.
    StepTimedOut,
    /// An operator asked to resume a failed saga.
    RetryRequested,
}

impl Event {
    /// The name recorded in the transition history.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Start => "start",
            Event::InventoryReserved => "inventory_reserved",
            Event::InventoryRejected { .. } => "inventory_rejected",
            Event::InventoryReleased => "inventory_released",
            Event::PaymentCharged => "payment_charged",
            Event::PaymentDeclined { .. } => "payment_declined",
            Event::PaymentRefunded => "payment_refunded",
            Event::Shipped => "shipped",
            Event::ShippingFailed { .. } => "shipping_failed",
            Event::CancelRequested => "cancel_requested",
            Event::StepTimedOut => "step_timed_out",
            Event::RetryRequested => "retry_requested",
        }
    }
}

/// The order saga. All data lives in the states; this type carries no storage.
#[derive(Debug, Default)]
pub struct OrderSaga;

#[state_machine(
    initial = "State::created(0)",
    state(derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize))
)]
impl OrderSaga {
    /// Waiting for inventory to answer `reserve`.
    #[state(superstate = "forward")]
    fn created(attempt: &mut u32, context: &mut SagaContext, event: &Event) -> Outcome<State> {
        match event {
            Event::Start => {
                context.send(Step::Reserve, 0, false);
                Handled
            }
            Event::InventoryReserved => {
                context.send(Step::Charge, 0, false);
                Transition(State::inventory_reserved(0))
            }
            Event::InventoryRejected { detail } => {
                context.reason(CancelReason::InventoryRejected, detail.clone());
                context.finish(SagaEnd::Cancelled);
                Transition(State::cancelled(CancelReason::InventoryRejected))
            }
            // The reservation may be in flight: release it (or tombstone it so it never happens).
            Event::CancelRequested => {
                context.reason(CancelReason::CancelRequested, "cancelled by request");
                context.send(Step::Release, 0, true);
                Transition(State::releasing_inventory(CancelReason::CancelRequested, 0))
            }
            Event::StepTimedOut => {
                if let Some(next) = retry(attempt, context.policy.step_max_attempts) {
                    context.send(Step::Reserve, next, false);
                    Handled
                } else {
                    context.reason(CancelReason::TimedOut, "inventory did not answer");
                    context.send(Step::Release, 0, true);
                    Transition(State::releasing_inventory(CancelReason::TimedOut, 0))
                }
            }
            _ => Super,
        }
    }

    /// Stock held; waiting for payment to answer `charge`.
    #[state(superstate = "forward")]
    fn inventory_reserved(
        attempt: &mut u32,
        context: &mut SagaContext,
        event: &Event,
    ) -> Outcome<State> {
        match event {
            Event::PaymentCharged => {
                context.send(Step::Ship, 0, false);
                Transition(State::paid(0, None))
            }
            Event::PaymentDeclined { detail } => {
                context.reason(CancelReason::PaymentDeclined, detail.clone());
                context.send(Step::Release, 0, true);
                Transition(State::releasing_inventory(CancelReason::PaymentDeclined, 0))
            }
            // The charge may be in flight: refund it (or void it so it never happens).
            Event::CancelRequested => {
                context.reason(CancelReason::CancelRequested, "cancelled by request");
                context.send(Step::Refund, 0, true);
                Transition(State::refunding_payment(CancelReason::CancelRequested, 0))
            }
            Event::StepTimedOut => {
                if let Some(next) = retry(attempt, context.policy.step_max_attempts) {
                    context.send(Step::Charge, next, false);
                    Handled
                } else {
                    context.reason(CancelReason::TimedOut, "payment did not answer");
                    context.send(Step::Refund, 0, true);
                    Transition(State::refunding_payment(CancelReason::TimedOut, 0))
                }
            }
            _ => Super,
        }
    }

    /// Charged; waiting for shipping. `cancelling` is set once a cancel of the shipment was sent:
    /// shipping then answers `failed` (stopped in time) or `shipped` (too late).
    #[state(superstate = "forward")]
    fn paid(
        attempt: &mut u32,
        cancelling: &mut Option<CancelReason>,
        context: &mut SagaContext,
        event: &Event,
    ) -> Outcome<State> {
        match event {
            Event::Shipped => {
                context.finish(SagaEnd::Completed);
                Transition(State::shipped())
            }
            Event::ShippingFailed { detail } => {
                match *cancelling {
                    Some(reason) => {
                        context.reason(reason, format!("{}; {detail}", describe(reason)))
                    }
                    None => context.reason(CancelReason::ShippingFailed, detail.clone()),
                }
                let reason = cancelling.unwrap_or(CancelReason::ShippingFailed);
                context.send(Step::Refund, 0, true);
                Transition(State::refunding_payment(reason, 0))
            }
            Event::CancelRequested if cancelling.is_none() => {
                *cancelling = Some(CancelReason::CancelRequested);
                *attempt = 0;
                context.send(Step::CancelShipment, 0, true);
                Handled
            }
            Event::StepTimedOut => match *cancelling {
                None => {
                    if let Some(next) = retry(attempt, context.policy.step_max_attempts) {
                        context.send(Step::Ship, next, false);
                    } else {
                        *cancelling = Some(CancelReason::TimedOut);
                        *attempt = 0;
                        context.send(Step::CancelShipment, 0, true);
                    }
                    Handled
                }
                Some(reason) => {
                    if let Some(next) = retry(attempt, context.policy.compensation_max_attempts) {
                        context.send(Step::CancelShipment, next, true);
                        Handled
                    } else {
                        context.reason(reason, "shipping did not answer the cancellation");
                        context.finish(SagaEnd::Failed);
                        Transition(State::failed(reason, Step::CancelShipment))
                    }
                }
            },
            _ => Super,
        }
    }

    /// Forward steps ignore everything else: late and duplicate replies, repeated cancels.
    #[superstate]
    fn forward(event: &Event) -> Outcome<State> {
        let _ = event;
        Handled
    }

    /// Terminal: the order shipped.
    #[state]
    fn shipped(event: &Event) -> Outcome<State> {
        let _ = event;
        Handled
    }

    /// Compensating: waiting for payment to answer `refund`.
    #[state(superstate = "compensating")]
    fn refunding_payment(
        reason: &mut CancelReason,
        attempt: &mut u32,
        context: &mut SagaContext,
        event: &Event,
    ) -> Outcome<State> {
        match event {
            Event::PaymentRefunded => {
                context.send(Step::Release, 0, true);
                Transition(State::releasing_inventory(*reason, 0))
            }
            Event::StepTimedOut => {
                if let Some(next) = retry(attempt, context.policy.compensation_max_attempts) {
                    context.send(Step::Refund, next, true);
                    Handled
                } else {
                    context.reason(
                        *reason,
                        format!("{}; refund did not complete", describe(*reason)),
                    );
                    context.finish(SagaEnd::Failed);
                    Transition(State::failed(*reason, Step::Refund))
                }
            }
            _ => Super,
        }
    }

    /// Compensating: waiting for inventory to answer `release`.
    #[state(superstate = "compensating")]
    fn releasing_inventory(
        reason: &mut CancelReason,
        attempt: &mut u32,
        context: &mut SagaContext,
        event: &Event,
    ) -> Outcome<State> {
        match event {
            Event::InventoryReleased => {
                context.finish(SagaEnd::Cancelled);
                Transition(State::cancelled(*reason))
            }
            Event::StepTimedOut => {
                if let Some(next) = retry(attempt, context.policy.compensation_max_attempts) {
                    context.send(Step::Release, next, true);
                    Handled
                } else {
                    context.reason(
                        *reason,
                        format!("{}; release did not complete", describe(*reason)),
                    );
                    context.finish(SagaEnd::Failed);
                    Transition(State::failed(*reason, Step::Release))
                }
            }
            _ => Super,
        }
    }

    /// Compensations ignore everything else: forward replies are late, cancels are repeats.
    #[superstate]
    fn compensating(event: &Event) -> Outcome<State> {
        let _ = event;
        Handled
    }

    /// Terminal: compensated.
    #[state]
    fn cancelled(reason: &mut CancelReason, event: &Event) -> Outcome<State> {
        let _ = (reason, event);
        Handled
    }

    /// Compensation gave up at `stuck_at`; an operator may retry. A late success of the stuck
    /// step still moves the saga on.
    #[state]
    fn failed(
        reason: &mut CancelReason,
        stuck_at: &mut Step,
        context: &mut SagaContext,
        event: &Event,
    ) -> Outcome<State> {
        match (event, *stuck_at) {
            (Event::RetryRequested, Step::CancelShipment) => {
                context.send(Step::CancelShipment, 0, true);
                Transition(State::paid(0, Some(*reason)))
            }
            (Event::RetryRequested, Step::Refund) => {
                context.send(Step::Refund, 0, true);
                Transition(State::refunding_payment(*reason, 0))
            }
            (Event::RetryRequested, _) => {
                context.send(Step::Release, 0, true);
                Transition(State::releasing_inventory(*reason, 0))
            }
            (Event::Shipped, Step::CancelShipment) => {
                context.finish(SagaEnd::Completed);
                Transition(State::shipped())
            }
            (Event::ShippingFailed { .. }, Step::CancelShipment)
            | (Event::PaymentRefunded, Step::Refund) => {
                let next = if *stuck_at == Step::CancelShipment {
                    Step::Refund
                } else {
                    Step::Release
                };
                context.send(next, 0, true);
                if next == Step::Refund {
                    Transition(State::refunding_payment(*reason, 0))
                } else {
                    Transition(State::releasing_inventory(*reason, 0))
                }
            }
            (Event::InventoryReleased, Step::Release) => {
                context.finish(SagaEnd::Cancelled);
                Transition(State::cancelled(*reason))
            }
            _ => Handled,
        }
    }
}

/// Counts one more send if the budget allows; returns its 0-based attempt number.
fn retry(attempt: &mut u32, max_attempts: u32) -> Option<u32> {
    if *attempt + 1 < max_attempts {
        *attempt += 1;
        Some(*attempt)
    } else {
        None
    }
}

fn describe(reason: CancelReason) -> &'static str {
    match reason {
        CancelReason::InventoryRejected => "inventory rejected the order",
        CancelReason::PaymentDeclined => "payment declined",
        CancelReason::ShippingFailed => "shipping failed",
        CancelReason::CancelRequested => "cancelled by request",
        CancelReason::TimedOut => "a step timed out",
    }
}

impl State {
    /// The API status.
    pub fn status(&self) -> &'static str {
        match self {
            State::Created { .. } => "created",
            State::InventoryReserved { .. } => "inventory_reserved",
            State::Paid { .. } => "paid",
            State::Shipped {} => "shipped",
            State::RefundingPayment { .. } => "refunding_payment",
            State::ReleasingInventory { .. } => "releasing_inventory",
            State::Cancelled { .. } => "cancelled",
            State::Failed { .. } => "failed",
        }
    }

    /// Whether nothing more will happen without an operator.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            State::Shipped {} | State::Cancelled { .. } | State::Failed { .. }
        )
    }

    /// Whether a cancel request would start compensation (202) rather than conflict (409).
    pub fn accepts_cancel(&self) -> bool {
        match self {
            State::Created { .. } | State::InventoryReserved { .. } => true,
            State::Paid { cancelling, .. } => cancelling.is_none(),
            _ => false,
        }
    }
}

/// Feeds one event to a saga in `state`; returns the new state and the effects.
pub fn apply(state: State, event: &Event, policy: Policy) -> (State, Vec<Effect>) {
    use statig::blocking::IntoStateMachineExt;
    let mut context = SagaContext::new(policy);
    let mut sm = OrderSaga.uninitialized_state_machine();
    *sm.state_mut() = state;
    let mut sm = sm.init_with_context(&mut context);
    sm.handle_with_context(event, &mut context);
    (sm.state().clone(), context.effects)
}

#[cfg(test)]
mod tests;
