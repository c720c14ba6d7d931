//! One trace per saga across the four services, and the Prometheus counters.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::json;

use saga_e2e_tests::otlp::{Receiver, Span};
use saga_e2e_tests::{Stack, StackOptions, product, wait_until};

const ALL: [&str; 4] = ["inventory", "orchestrator", "payment", "shipping"];

fn traced(rx: &Receiver) -> StackOptions {
    let grpc = format!("http://127.0.0.1:{}", rx.grpc_port);
    let http = format!("http://127.0.0.1:{}", rx.http_port);
    StackOptions::default()
        .with_all("OTEL_EXPORTER_OTLP_ENDPOINT", &grpc)
        .with_all("OTEL_BSP_SCHEDULE_DELAY", "100")
        // One participant exports over HTTP/protobuf, the rest over gRPC.
        .with("payment", "OTEL_EXPORTER_OTLP_ENDPOINT", &http)
        .with("payment", "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
}

/// Every span received so far for `trace_id`.
fn trace_spans(rx: &Receiver, trace_id: &str) -> Vec<Span> {
    rx.collected
        .spans()
        .into_iter()
        .filter(|s| s.trace_id == trace_id)
        .collect()
}

/// Whether every span's parent is among the spans (a root has none).
fn parents_known(spans: &[Span]) -> bool {
    parents_known_under(spans, "")
}

/// Whether every span's parent is among the spans or is `outside` (the caller's span id for a
/// trace a caller started; empty for a root).
fn parents_known_under(spans: &[Span], outside: &str) -> bool {
    let ids: BTreeSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    spans
        .iter()
        .all(|s| s.parent_span_id == outside || ids.contains(s.parent_span_id.as_str()))
}

type Messages = futures_util::stream::Select<async_nats::Subscriber, async_nats::Subscriber>;

/// Every command, reply and event from now on.
async fn saga_messages(stack: &Stack) -> Messages {
    let nats = stack.nats_client().await;
    let commands = nats.subscribe("saga.>").await.unwrap();
    let events = nats.subscribe("orders.>").await.unwrap();
    futures_util::stream::select(commands, events)
}

/// The trace id, span id and flags of the `traceparent` of each of the saga's eight messages
/// (three commands, three replies, the created and the completed event), by subject.
async fn traceparents(
    messages: &mut Messages,
    saga_id: &str,
) -> BTreeMap<String, (String, String, String)> {
    use futures_util::StreamExt;
    let mut seen = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.len() < 8 {
        let msg = tokio::time::timeout_at(deadline, messages.next())
            .await
            .unwrap_or_else(|_| panic!("8 messages of the saga expected, saw {seen:#?}"))
            .unwrap();
        let Some(headers) = msg.headers else { continue };
        if headers.get("Saga-Id").map(|v| v.as_str()) != Some(saga_id) {
            continue;
        }
        let parent = headers
            .get("traceparent")
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        let parts: Vec<&str> = parent.split('-').collect();
        assert_eq!(parts.len(), 4, "{} has traceparent {parent:?}", msg.subject);
        seen.insert(
            msg.subject.to_string(),
            (
                parts[1].to_owned(),
                parts[2].to_owned(),
                parts[3].to_owned(),
            ),
        );
    }
    seen
}

/// Every message carries `trace`, unsampled, each under a span id of its own.
fn assert_unsampled(seen: &BTreeMap<String, (String, String, String)>, trace: &str) {
    for (subject, (trace_id, _, flags)) in seen {
        assert_eq!(trace_id, trace, "{subject}");
        assert_eq!(flags, "00", "{subject}: {seen:#?}");
    }
    let span_ids: BTreeSet<&str> = seen.values().map(|(_, s, _)| s.as_str()).collect();
    assert_eq!(
        span_ids.len(),
        seen.len(),
        "one producer span each: {seen:#?}"
    );
    assert!(!span_ids.contains("0000000000000000"));
}

/// Creates an order as a caller whose span is `traceparent`; returns its id.
async fn post_traced_order(stack: &Stack, product: &str, traceparent: &str) -> String {
    let r = stack
        .http
        .post(stack.url("orchestrator", "/orders"))
        .header("traceparent", traceparent)
        .json(&saga_e2e_tests::order_body("jo", &[(product, 1, 10)]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    r.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The spans of one trace, once it is complete: every parent present, the expected number of
/// services seen, and the transition to `final_status` recorded.
async fn complete_trace(
    rx: &Receiver,
    trace_id: &str,
    final_status: &str,
    services_expected: usize,
) -> Vec<Span> {
    let mut spans = Vec::new();
    wait_until(Duration::from_secs(30), "a complete trace", || {
        spans = trace_spans(rx, trace_id);
        let services: BTreeSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
        let parents_known = parents_known(&spans);
        let finished = spans
            .iter()
            .any(|s| s.attributes.get("saga.state.to").map(String::as_str) == Some(final_status));
        let ok = parents_known && services.len() == services_expected && finished;
        async move { ok }
    })
    .await;
    spans
}

fn transitions(spans: &[Span]) -> Vec<(String, String)> {
    let mut t: Vec<&Span> = spans
        .iter()
        .filter(|s| s.attributes.contains_key("saga.state.to"))
        .collect();
    t.sort_by_key(|s| s.start);
    t.iter()
        .map(|s| {
            (
                s.attributes["saga.event"].clone(),
                s.attributes["saga.state.to"].clone(),
            )
        })
        .collect()
}

fn assert_one_tree(spans: &[Span], trace_id: &str, services_expected: &[&str]) {
    let roots: Vec<&Span> = spans
        .iter()
        .filter(|s| s.parent_span_id.is_empty())
        .collect();
    assert_eq!(roots.len(), 1, "one root: {roots:#?}");
    assert_eq!(roots[0].name, "POST /orders");
    assert_eq!(roots[0].service, "orchestrator");
    assert_eq!(roots[0].kind, 2, "the root is the HTTP server span");
    for s in spans {
        assert_eq!(s.trace_id, trace_id);
    }
    let services: BTreeSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(
        services,
        services_expected.iter().copied().collect::<BTreeSet<_>>()
    );
    // Messaging spans follow the semantic conventions.
    let producers: Vec<&Span> = spans.iter().filter(|s| s.kind == 4).collect();
    let consumers: Vec<&Span> = spans.iter().filter(|s| s.kind == 5).collect();
    assert!(
        producers.len() >= 4 && consumers.len() >= 4,
        "{} producers, {} consumers",
        producers.len(),
        consumers.len()
    );
    for s in producers.iter().chain(&consumers) {
        assert_eq!(s.attributes["messaging.system"], "nats");
        assert!(s.attributes["messaging.destination.name"].ends_with(".v1"));
        assert!(s.attributes.contains_key("messaging.message.id"));
        assert!(s.attributes.contains_key("messaging.operation.type"));
    }
    // Every consumer span's parent is a producer span, possibly in another service.
    let by_id: BTreeMap<&str, &Span> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    for c in &consumers {
        assert_eq!(by_id[c.parent_span_id.as_str()].kind, 4, "{c:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_saga_is_one_trace_across_the_four_services() {
    let rx = Receiver::start().await;
    let stack = Stack::start_with(traced(&rx)).await;
    let tea = product("tea");
    stack.set_stock(&tea, 10).await;

    let shipped = stack.create_order("jo", &[(&tea, 1, 10)]).await;
    let order = stack.wait_terminal(&shipped).await;
    assert_eq!(order["status"], "shipped");
    let trace_id = order["trace_id"].as_str().expect("trace_id").to_owned();
    let spans = complete_trace(&rx, &trace_id, "shipped", 4).await;
    assert_one_tree(&spans, &trace_id, &ALL);
    assert_eq!(
        transitions(&spans),
        [
            ("start".into(), "created".into()),
            ("inventory_reserved".into(), "inventory_reserved".into()),
            ("payment_charged".into(), "paid".into()),
            ("shipped".into(), "shipped".into()),
        ]
    );
    for s in spans
        .iter()
        .filter(|s| s.attributes.contains_key("saga.id"))
    {
        assert_eq!(s.attributes["saga.id"], shipped);
        assert_eq!(s.attributes["order.id"], shipped);
    }

    // Compensation: a declined payment, release, cancel; the failed step is an error span.
    let r = stack
        .http
        .put(stack.url("payment", "/chaos"))
        .json(&json!({"error_rate": 0.0, "duplicate_rate": 0.0, "latency_ms": 0, "success_rate": 0.0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let declined = stack.create_order("jo", &[(&tea, 1, 10)]).await;
    let order = stack.wait_terminal(&declined).await;
    assert_eq!(order["status"], "cancelled");
    let trace_id = order["trace_id"].as_str().unwrap().to_owned();
    let spans = complete_trace(&rx, &trace_id, "cancelled", 3).await;
    assert_one_tree(&spans, &trace_id, &["inventory", "orchestrator", "payment"]);
    let t = transitions(&spans);
    let to: Vec<&str> = t.iter().map(|(_, to)| to.as_str()).collect();
    assert_eq!(
        to,
        [
            "created",
            "inventory_reserved",
            "releasing_inventory",
            "cancelled"
        ]
    );
    let failed_step = spans
        .iter()
        .find(|s| s.attributes.get("saga.event").map(String::as_str) == Some("payment_declined"))
        .unwrap();
    assert_eq!(failed_step.status_code, 2, "error status");
    assert!(
        failed_step.status_message.contains("payment_declined"),
        "{failed_step:?}"
    );
    assert!(
        spans
            .iter()
            .any(|s| s.service == "payment" && s.status_code == 2)
    );

    // trace_url appears when JAEGER_UI_URL is set.
    assert!(order.get("trace_url").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_stays_one_trace_when_the_orchestrator_restarts_in_the_middle() {
    let rx = Receiver::start().await;
    let opts = traced(&rx)
        .with("payment", "CHAOS_LATENCY_MS", "1500")
        .with(
            "orchestrator",
            "JAEGER_UI_URL",
            "http://jaeger.example:16686/",
        );
    let mut stack = Stack::start_with(opts).await;
    let cup = product("cup");
    stack.set_stock(&cup, 10).await;
    let id = stack.create_order("kim", &[(&cup, 2, 10)]).await;
    let order = stack
        .wait_order(&id, Duration::from_secs(10), "inventory_reserved", |o| {
            o["status"] == "inventory_reserved"
        })
        .await;
    let trace_id = order["trace_id"].as_str().unwrap().to_owned();
    assert_eq!(
        order["trace_url"],
        format!("http://jaeger.example:16686/trace/{trace_id}").as_str()
    );
    // The orchestrator's spans so far have reached the collector; then it dies mid-saga.
    wait_until(
        Duration::from_secs(10),
        "the first transitions exported",
        || {
            let spans = trace_spans(&rx, &trace_id);
            let charge_sent = spans.iter().any(|s| {
                s.kind == 4
                    && s.attributes
                        .get("messaging.destination.name")
                        .map(String::as_str)
                        == Some("saga.cmd.payment.charge.v1")
            });
            let seen = charge_sent && parents_known(&spans);
            async move { seen }
        },
    )
    .await;
    stack.kill("orchestrator").await;
    stack.restart("orchestrator").await;

    let order = stack.wait_terminal(&id).await;
    assert_eq!(order["status"], "shipped");
    let spans = complete_trace(&rx, &trace_id, "shipped", 4).await;
    assert_one_tree(&spans, &trace_id, &ALL);
    let to: Vec<String> = transitions(&spans).into_iter().map(|(_, to)| to).collect();
    assert_eq!(to, ["created", "inventory_reserved", "paid", "shipped"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_sagas_steps_effects_and_requests() {
    let stack = Stack::start().await;
    let jam = product("jam");
    stack.set_stock(&jam, 10).await;
    let mut before = BTreeMap::new();
    for svc in saga_e2e_tests::SERVICES {
        before.insert(svc, stack.metrics(svc).await);
    }

    let mut ids = Vec::new();
    for _ in 0..2 {
        ids.push(stack.create_order("lu", &[(&jam, 1, 10)]).await);
    }
    for id in &ids {
        stack.wait_terminal(id).await;
    }
    stack
        .http
        .put(stack.url("payment", "/chaos"))
        .json(&json!({"error_rate": 0.0, "duplicate_rate": 0.0, "latency_ms": 0, "success_rate": 0.0}))
        .send()
        .await
        .unwrap();
    let declined = stack.create_order("lu", &[(&jam, 1, 10)]).await;
    stack.wait_terminal(&declined).await;
    let js = stack.jetstream().await;
    js.publish("saga.cmd.shipping.ship.v1", "poison".into())
        .await
        .unwrap()
        .await
        .unwrap();
    stack.wait_quiet().await;

    let delta = |svc: &str, key: &str, after: &BTreeMap<String, f64>| {
        after.get(key).copied().unwrap_or(0.0) - before[svc].get(key).copied().unwrap_or(0.0)
    };
    let expect = [
        ("orchestrator", "sagas_started_total", 3.0),
        (
            "orchestrator",
            r#"sagas_finished_total{outcome="shipped"}"#,
            2.0,
        ),
        (
            "orchestrator",
            r#"sagas_finished_total{outcome="cancelled"}"#,
            1.0,
        ),
        (
            "orchestrator",
            r#"saga_duration_seconds_count{outcome="shipped"}"#,
            2.0,
        ),
        (
            "orchestrator",
            r#"saga_step_duration_seconds_count{step="reserve"}"#,
            3.0,
        ),
        (
            "orchestrator",
            r#"saga_step_duration_seconds_count{step="charge"}"#,
            3.0,
        ),
        (
            "orchestrator",
            r#"saga_step_duration_seconds_count{step="ship"}"#,
            2.0,
        ),
        (
            "orchestrator",
            r#"saga_step_duration_seconds_count{step="release"}"#,
            1.0,
        ),
        (
            "orchestrator",
            r#"http_requests_total{method="POST",route="/orders",status="202"}"#,
            3.0,
        ),
        (
            "inventory",
            r#"inventory_reservations_total{result="reserved"}"#,
            3.0,
        ),
        (
            "inventory",
            r#"inventory_reservations_total{result="released"}"#,
            1.0,
        ),
        ("payment", r#"payments_total{result="charged"}"#, 2.0),
        ("payment", r#"payments_total{result="declined"}"#, 1.0),
        ("shipping", r#"shipments_total{result="shipped"}"#, 2.0),
        (
            "shipping",
            r#"dead_letters_total{consumer="shipping"}"#,
            1.0,
        ),
    ];
    let mut after = BTreeMap::new();
    for svc in saga_e2e_tests::SERVICES {
        after.insert(svc, stack.metrics(svc).await);
    }
    for (svc, key, want) in expect {
        assert_eq!(delta(svc, key, &after[svc]), want, "{svc} {key}");
    }
    for svc in saga_e2e_tests::SERVICES {
        assert!(
            after[svc].contains_key("outbox_pending"),
            "{svc} exposes outbox_pending"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_costs_no_saga() {
    // Nothing listens on this port: every export fails.
    let dead = format!("http://127.0.0.1:{}", saga_e2e_tests::free_port());
    let opts = StackOptions::default()
        .with_all("OTEL_EXPORTER_OTLP_ENDPOINT", &dead)
        .with_all("OTEL_BSP_SCHEDULE_DELAY", "100");
    let mut stack = Stack::start_with(opts).await;
    let ink = product("ink");
    stack.set_stock(&ink, 1000).await;
    let ids = stack.create_orders(20, std::slice::from_ref(&ink), 5).await;
    let outcomes = stack.wait_all_terminal(&ids, Duration::from_secs(60)).await;
    assert_eq!(outcomes.get("shipped"), Some(&20), "{outcomes:?}");
    // The failed exports are counted, and shutdown still ends in time.
    wait_until(Duration::from_secs(30), "dropped spans counted", || {
        let stack = &stack;
        async move {
            stack
                .metrics("orchestrator")
                .await
                .get("otel_spans_dropped_total")
                .copied()
                .unwrap_or(0.0)
                > 0.0
        }
    })
    .await;
    let code = stack
        .terminate("orchestrator", Duration::from_secs(10))
        .await;
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_exporter_every_message_of_a_saga_carries_its_trace() {
    // No OTLP endpoint: spans keep only their ids, and those must still propagate.
    let stack = Stack::start().await;
    let tea = product("tea");
    stack.set_stock(&tea, 10).await;
    let mut messages = saga_messages(&stack).await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    // Not sampled by the caller: the decision travels with the ids.
    let id = post_traced_order(&stack, &tea, &format!("00-{trace}-00f067aa0ba902b7-00")).await;
    assert_unsampled(&traceparents(&mut messages, &id).await, trace);
    let order = stack.wait_terminal(&id).await;
    assert_eq!(order["status"], "shipped");
    assert_eq!(order["trace_id"], trace);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standard_sampler_variables_decide_which_sagas_are_exported() {
    let rx = Receiver::start().await;
    // New traces are never sampled; a caller's decision is kept (parent-based).
    let opts = traced(&rx)
        .with_all("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
        .with_all("OTEL_TRACES_SAMPLER_ARG", "0");
    let stack = Stack::start_with(opts).await;
    let tea = product("tea");
    stack.set_stock(&tea, 10).await;
    let mut messages = saga_messages(&stack).await;

    let unsampled = stack.create_order("jo", &[(&tea, 1, 10)]).await;
    let order = stack.wait_terminal(&unsampled).await;
    assert_eq!(order["status"], "shipped");
    let unsampled_trace = order["trace_id"].as_str().expect("trace_id").to_owned();
    // Not exported, yet every message of the saga carries its trace.
    assert_unsampled(
        &traceparents(&mut messages, &unsampled).await,
        &unsampled_trace,
    );

    let sampled_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let id = post_traced_order(
        &stack,
        &tea,
        &format!("00-{sampled_trace}-00f067aa0ba902b7-01"),
    )
    .await;
    assert_eq!(stack.wait_terminal(&id).await["status"], "shipped");
    // The caller's sampled trace is exported by all four services, under the caller's span.
    let mut spans = Vec::new();
    wait_until(Duration::from_secs(30), "the sampled trace", || {
        spans = trace_spans(&rx, sampled_trace);
        let services: BTreeSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
        let parents_known = parents_known_under(&spans, "00f067aa0ba902b7");
        let shipped = spans
            .iter()
            .any(|s| s.attributes.get("saga.state.to").map(String::as_str) == Some("shipped"));
        let ok = services.len() == 4 && parents_known && shipped;
        async move { ok }
    })
    .await;
    let under_caller: Vec<&Span> = spans
        .iter()
        .filter(|s| s.parent_span_id == "00f067aa0ba902b7")
        .collect();
    assert_eq!(under_caller.len(), 1, "{under_caller:#?}");
    assert_eq!(under_caller[0].name, "POST /orders");
    // Each service exports its spans in the order they end, so the first saga's spans, had any
    // been sampled, would have arrived before the second saga's last ones.
    let leaked = trace_spans(&rx, &unsampled_trace);
    assert!(leaked.is_empty(), "{leaked:#?}");
}
