use super::*;

const POLICY: Policy = Policy {
    step_max_attempts: 3,
    compensation_max_attempts: 2,
};

fn all_states() -> Vec<State> {
    use CancelReason::*;
    let mut states = vec![
        State::created(0),
        State::created(2),
        State::inventory_reserved(0),
        State::inventory_reserved(2),
        State::paid(0, None),
        State::paid(2, None),
        State::paid(0, Some(CancelRequested)),
        State::paid(1, Some(TimedOut)),
        State::shipped(),
    ];
    for r in [
        InventoryRejected,
        PaymentDeclined,
        ShippingFailed,
        CancelRequested,
        TimedOut,
    ] {
        states.push(State::refunding_payment(r, 0));
        states.push(State::refunding_payment(r, 1));
        states.push(State::releasing_inventory(r, 0));
        states.push(State::releasing_inventory(r, 1));
        states.push(State::cancelled(r));
        for s in [Step::CancelShipment, Step::Refund, Step::Release] {
            states.push(State::failed(r, s));
        }
    }
    states
}

fn all_events() -> Vec<Event> {
    vec![
        Event::Start,
        Event::InventoryReserved,
        Event::InventoryRejected {
            detail: "out of stock".into(),
        },
        Event::InventoryReleased,
        Event::PaymentCharged,
        Event::PaymentDeclined {
            detail: "card declined".into(),
        },
        Event::PaymentRefunded,
        Event::Shipped,
        Event::ShippingFailed {
            detail: "lost".into(),
        },
        Event::CancelRequested,
        Event::StepTimedOut,
        Event::RetryRequested,
    ]
}

/// Progress order: forward steps, then compensation, then the ends. A saga never moves to a
/// lower rank. A failed saga ranks with the step it is stuck at, since a retry resumes there.
fn rank(s: &State) -> u8 {
    match s {
        State::Created { .. } => 0,
        State::InventoryReserved { .. } => 1,
        State::Paid {
            cancelling: None, ..
        } => 2,
        State::Paid {
            cancelling: Some(_),
            ..
        } => 3,
        State::RefundingPayment { .. } => 4,
        State::ReleasingInventory { .. } => 5,
        State::Failed {
            stuck_at: Step::CancelShipment,
            ..
        } => 3,
        State::Failed {
            stuck_at: Step::Refund,
            ..
        } => 4,
        State::Failed { .. } => 5,
        State::Shipped {} | State::Cancelled { .. } => 9,
    }
}

fn step(state: State, event: Event) -> (State, Vec<Effect>) {
    apply(state, &event, POLICY)
}

#[test]
fn every_state_handles_every_event_without_moving_backwards() {
    for state in all_states() {
        for event in all_events() {
            let (next, effects) = step(state.clone(), event.clone());
            assert!(
                rank(&next) >= rank(&state),
                "{state:?} + {event:?} moved backwards to {next:?}"
            );
            if matches!(state, State::Shipped {} | State::Cancelled { .. }) {
                assert_eq!(next, state, "terminal {state:?} changed on {event:?}");
                assert!(effects.is_empty(), "terminal {state:?} emitted {effects:?}");
            }
            // Every send arms a deadline right after it, and a finish clears it.
            for (i, e) in effects.iter().enumerate() {
                if let Effect::Send(_) = e {
                    assert!(matches!(
                        effects.get(i + 1),
                        Some(Effect::ArmDeadline { .. })
                    ));
                }
            }
            let finished = effects.iter().any(|e| matches!(e, Effect::Finish(_)));
            assert_eq!(
                finished,
                next.is_terminal() && next != state,
                "{state:?} + {event:?} -> {next:?}: {effects:?}"
            );
        }
    }
}

#[test]
fn a_reply_delivered_twice_has_effects_only_once() {
    for state in all_states() {
        for event in all_events() {
            if matches!(
                event,
                Event::StepTimedOut | Event::Start | Event::RetryRequested
            ) {
                continue;
            }
            let (once, _) = step(state.clone(), event.clone());
            let (twice, effects) = step(once.clone(), event.clone());
            if once != state {
                assert!(
                    effects.is_empty() || twice != once,
                    "{state:?} + {event:?} twice repeated effects {effects:?}"
                );
                assert!(rank(&twice) >= rank(&once));
            }
        }
    }
}

#[test]
fn the_happy_path_sends_each_command_once_and_ends_shipped() {
    let (s, e) = step(State::created(0), Event::Start);
    assert_eq!(s, State::created(0));
    assert_eq!(e[0], Effect::Send(Step::Reserve));
    let (s, e) = step(s, Event::InventoryReserved);
    assert_eq!(
        (s.status(), &e[0]),
        ("inventory_reserved", &Effect::Send(Step::Charge))
    );
    let (s, e) = step(s, Event::PaymentCharged);
    assert_eq!((s.status(), &e[0]), ("paid", &Effect::Send(Step::Ship)));
    let (s, e) = step(s, Event::Shipped);
    assert_eq!(s, State::shipped());
    assert_eq!(
        e,
        vec![Effect::ClearDeadline, Effect::Finish(SagaEnd::Completed)]
    );
}

#[test]
fn a_declined_payment_releases_inventory_then_cancels() {
    let (s, e) = step(
        State::inventory_reserved(0),
        Event::PaymentDeclined {
            detail: "card declined".into(),
        },
    );
    assert_eq!(
        s,
        State::releasing_inventory(CancelReason::PaymentDeclined, 0)
    );
    assert_eq!(
        e[0],
        Effect::SetReason(CancelReason::PaymentDeclined, "card declined".into())
    );
    assert_eq!(e[1], Effect::Send(Step::Release));
    let (s, e) = step(s, Event::InventoryReleased);
    assert_eq!(s, State::cancelled(CancelReason::PaymentDeclined));
    assert!(e.contains(&Effect::Finish(SagaEnd::Cancelled)));
}

#[test]
fn a_failed_shipment_refunds_then_releases_then_cancels() {
    let (s, _) = step(
        State::paid(0, None),
        Event::ShippingFailed {
            detail: "lost".into(),
        },
    );
    assert_eq!(s, State::refunding_payment(CancelReason::ShippingFailed, 0));
    let (s, e) = step(s, Event::PaymentRefunded);
    assert_eq!(
        s,
        State::releasing_inventory(CancelReason::ShippingFailed, 0)
    );
    assert_eq!(e[0], Effect::Send(Step::Release));
    let (s, _) = step(s, Event::InventoryReleased);
    assert_eq!(s, State::cancelled(CancelReason::ShippingFailed));
}

#[test]
fn rejected_inventory_cancels_without_any_compensation() {
    let (s, e) = step(
        State::created(0),
        Event::InventoryRejected {
            detail: "no".into(),
        },
    );
    assert_eq!(s, State::cancelled(CancelReason::InventoryRejected));
    assert!(!e.iter().any(|e| matches!(e, Effect::Send(_))));
}

#[test]
fn cancel_compensates_whatever_may_be_in_flight() {
    let (s, e) = step(State::created(0), Event::CancelRequested);
    assert_eq!(
        s,
        State::releasing_inventory(CancelReason::CancelRequested, 0)
    );
    assert!(e.contains(&Effect::Send(Step::Release)));
    let (s, e) = step(State::inventory_reserved(0), Event::CancelRequested);
    assert_eq!(
        s,
        State::refunding_payment(CancelReason::CancelRequested, 0)
    );
    assert!(e.contains(&Effect::Send(Step::Refund)));
    let (s, e) = step(State::paid(0, None), Event::CancelRequested);
    assert_eq!(s, State::paid(0, Some(CancelReason::CancelRequested)));
    assert!(e.contains(&Effect::Send(Step::CancelShipment)));
    // Stopped in time: refund and release, reason cancel_requested.
    let (s2, _) = step(
        s.clone(),
        Event::ShippingFailed {
            detail: "cancelled".into(),
        },
    );
    assert_eq!(
        s2,
        State::refunding_payment(CancelReason::CancelRequested, 0)
    );
    // Too late: it shipped.
    let (s3, _) = step(s, Event::Shipped);
    assert_eq!(s3, State::shipped());
    for st in [
        State::shipped(),
        State::cancelled(CancelReason::CancelRequested),
    ] {
        assert!(!st.accepts_cancel());
    }
}

#[test]
fn timeouts_resend_the_same_step_until_the_budget_then_compensate() {
    let (s, e) = step(State::created(0), Event::StepTimedOut);
    assert_eq!(s, State::created(1));
    assert_eq!(
        e,
        vec![
            Effect::Send(Step::Reserve),
            Effect::ArmDeadline {
                attempt: 1,
                compensating: false
            }
        ]
    );
    let (s, _) = step(s, Event::StepTimedOut);
    assert_eq!(s, State::created(2));
    let (s, e) = step(s, Event::StepTimedOut);
    assert_eq!(s, State::releasing_inventory(CancelReason::TimedOut, 0));
    assert!(e.contains(&Effect::Send(Step::Release)));
    // Compensation budget spent: failed, resumable.
    let (s, _) = step(s, Event::StepTimedOut);
    let (s, e) = step(s, Event::StepTimedOut);
    assert_eq!(s, State::failed(CancelReason::TimedOut, Step::Release));
    assert!(e.contains(&Effect::Finish(SagaEnd::Failed)));
    let (s, e) = step(s, Event::RetryRequested);
    assert_eq!(s, State::releasing_inventory(CancelReason::TimedOut, 0));
    assert!(e.contains(&Effect::Send(Step::Release)));
}

#[test]
fn a_late_success_moves_a_failed_saga_on() {
    let (s, _) = step(
        State::failed(CancelReason::ShippingFailed, Step::Refund),
        Event::PaymentRefunded,
    );
    assert_eq!(
        s,
        State::releasing_inventory(CancelReason::ShippingFailed, 0)
    );
}

/// The stored JSON of each state is a contract with every saga row already in a database.
#[test]
fn persisted_state_names_are_stable() {
    let golden = [
        (State::created(1), r#"{"Created":{"attempt":1}}"#),
        (
            State::inventory_reserved(0),
            r#"{"InventoryReserved":{"attempt":0}}"#,
        ),
        (
            State::paid(0, Some(CancelReason::TimedOut)),
            r#"{"Paid":{"attempt":0,"cancelling":"timed_out"}}"#,
        ),
        (State::shipped(), r#"{"Shipped":{}}"#),
        (
            State::refunding_payment(CancelReason::ShippingFailed, 2),
            r#"{"RefundingPayment":{"reason":"shipping_failed","attempt":2}}"#,
        ),
        (
            State::releasing_inventory(CancelReason::PaymentDeclined, 0),
            r#"{"ReleasingInventory":{"reason":"payment_declined","attempt":0}}"#,
        ),
        (
            State::cancelled(CancelReason::InventoryRejected),
            r#"{"Cancelled":{"reason":"inventory_rejected"}}"#,
        ),
        (
            State::failed(CancelReason::TimedOut, Step::CancelShipment),
            r#"{"Failed":{"reason":"timed_out","stuck_at":"cancel_shipment"}}"#,
        ),
    ];
    for (state, json) in golden {
        assert_eq!(serde_json::to_string(&state).unwrap(), json);
        assert_eq!(serde_json::from_str::<State>(json).unwrap(), state);
    }
}
