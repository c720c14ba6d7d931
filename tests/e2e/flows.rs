//! Saga flows from REST to a terminal status, checked in every participant.

use std::time::Duration;

use saga_e2e_tests::{Stack, StackOptions, history_statuses, product};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_runs_to_shipped_and_every_participant_agrees() {
    let stack = Stack::start().await;
    let apple = product("apple");
    stack.set_stock(&apple, 10).await;

    let id = stack
        .create_order("alice", &[(&apple, 3, 250), (&apple, 1, 250)])
        .await;
    let order = stack.wait_terminal(&id).await;

    assert_eq!(order["status"], "shipped");
    assert_eq!(order["total_cents"], 1000);
    assert!(order["cancel_reason"].is_null());
    assert_eq!(
        history_statuses(&order),
        ["created", "inventory_reserved", "paid", "shipped"]
    );
    assert_eq!(order["history"][1]["from"], "created");
    assert_eq!(order["history"][1]["event"], "inventory_reserved");
    assert_eq!(stack.stock(&apple).await, (6, 4));
    let (s, pay) = stack.get("payment", &format!("/payments/{id}")).await;
    assert_eq!(
        (s, &pay["status"], &pay["amount_cents"]),
        (200, &"charged".into(), &1000.into())
    );
    let (s, ship) = stack.get("shipping", &format!("/shipments/{id}")).await;
    assert_eq!((s, &ship["status"]), (200, &"shipped".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_payment_releases_the_inventory_and_cancels() {
    let stack =
        Stack::start_with(StackOptions::default().with("payment", "PAYMENT_SUCCESS_RATE", "0"))
            .await;
    let pear = product("pear");
    stack.set_stock(&pear, 5).await;

    let id = stack.create_order("bob", &[(&pear, 2, 100)]).await;
    let order = stack.wait_terminal(&id).await;

    assert_eq!(order["status"], "cancelled");
    assert_eq!(order["cancel_reason"], "payment_declined");
    assert!(
        order["cancel_detail"]
            .as_str()
            .unwrap()
            .contains("declined")
    );
    assert_eq!(
        history_statuses(&order),
        [
            "created",
            "inventory_reserved",
            "releasing_inventory",
            "cancelled"
        ]
    );
    assert_eq!(stack.stock(&pear).await, (5, 0));
    let (_, pay) = stack.get("payment", &format!("/payments/{id}")).await;
    assert_eq!(pay["status"], "declined");
    let (s, _) = stack.get("shipping", &format!("/shipments/{id}")).await;
    assert_eq!(s, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_shipment_refunds_then_releases_then_cancels() {
    let stack =
        Stack::start_with(StackOptions::default().with("shipping", "SHIPPING_SUCCESS_RATE", "0"))
            .await;
    let plum = product("plum");
    stack.set_stock(&plum, 5).await;

    let id = stack.create_order("carol", &[(&plum, 5, 300)]).await;
    let order = stack.wait_terminal(&id).await;

    assert_eq!(order["status"], "cancelled");
    assert_eq!(order["cancel_reason"], "shipping_failed");
    assert_eq!(
        history_statuses(&order),
        [
            "created",
            "inventory_reserved",
            "paid",
            "refunding_payment",
            "releasing_inventory",
            "cancelled"
        ]
    );
    let (_, pay) = stack.get("payment", &format!("/payments/{id}")).await;
    assert_eq!(
        (&pay["status"], &pay["amount_cents"]),
        (&"refunded".into(), &1500.into())
    );
    assert_eq!(stack.stock(&plum).await, (5, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_products_and_short_stock_cancel_without_any_charge() {
    let stack = Stack::start().await;
    let fig = product("fig");
    stack.set_stock(&fig, 1).await;

    let unknown = stack
        .create_order("dave", &[(&fig, 1, 10), ("no-such-product", 1, 10)])
        .await;
    let short = stack.create_order("dave", &[(&fig, 2, 10)]).await;
    for (id, words) in [
        (&unknown, "unknown product"),
        (&short, "insufficient stock"),
    ] {
        let order = stack.wait_terminal(id).await;
        assert_eq!(order["status"], "cancelled");
        assert_eq!(order["cancel_reason"], "inventory_rejected");
        assert!(
            order["cancel_detail"].as_str().unwrap().contains(words),
            "{order}"
        );
        assert_eq!(history_statuses(&order), ["created", "cancelled"]);
        let (s, _) = stack.get("payment", &format!("/payments/{id}")).await;
        assert_eq!(s, 404, "no payment may exist for a rejected order");
    }
    // All or nothing: the known line of the first order was not held either.
    assert_eq!(stack.stock(&fig).await, (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_before_shipping_compensates_and_a_second_cancel_conflicts() {
    // Payment answers slowly, so the saga is still waiting for it when the cancel arrives.
    let stack =
        Stack::start_with(StackOptions::default().with("payment", "CHAOS_LATENCY_MS", "1500"))
            .await;
    let kiwi = product("kiwi");
    stack.set_stock(&kiwi, 4).await;

    let id = stack.create_order("erin", &[(&kiwi, 4, 99)]).await;
    stack
        .wait_order(&id, Duration::from_secs(10), "inventory_reserved", |o| {
            o["status"] == "inventory_reserved"
        })
        .await;
    let (status, body) = stack
        .post_empty("orchestrator", &format!("/orders/{id}/cancel"))
        .await;
    assert_eq!(status, 202, "{body}");

    let order = stack.wait_terminal(&id).await;
    assert_eq!(order["status"], "cancelled");
    assert_eq!(order["cancel_reason"], "cancel_requested");
    assert_eq!(stack.stock(&kiwi).await, (4, 0));
    // The charge that was in flight was voided or refunded: never left charged.
    stack.wait_quiet().await;
    let (_, pay) = stack.get("payment", &format!("/payments/{id}")).await;
    assert_ne!(pay["status"], "charged", "{pay}");
    let (s, _) = stack.get("shipping", &format!("/shipments/{id}")).await;
    assert_eq!(s, 404);

    let (status, problem) = stack
        .post_empty("orchestrator", &format!("/orders/{id}/cancel"))
        .await;
    assert_eq!(status, 409);
    assert_eq!(problem["status"], 409);

    // A shipped order cannot be cancelled.
    let shipped = stack.create_order("erin", &[(&kiwi, 1, 99)]).await;
    stack.wait_terminal(&shipped).await;
    let (status, _) = stack
        .post_empty("orchestrator", &format!("/orders/{shipped}/cancel"))
        .await;
    assert_eq!(status, 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_orders_all_end_terminal_with_stock_conserved() {
    let stack =
        Stack::start_with(StackOptions::default().with("payment", "PAYMENT_SUCCESS_RATE", "0.7"))
            .await;
    let products: Vec<String> = (0..3).map(|i| product(&format!("p{i}"))).collect();
    let initial = 120;
    for p in &products {
        stack.set_stock(p, initial).await;
    }
    let mut tasks = Vec::new();
    for i in 0..100usize {
        let items: Vec<(String, i64, i64)> = (0..1 + i % 3)
            .map(|j| {
                (
                    products[(i + j) % 3].clone(),
                    1 + ((i * 7 + j) % 4) as i64,
                    100,
                )
            })
            .collect();
        let body = saga_e2e_tests::order_body(
            &format!("c{i}"),
            &items
                .iter()
                .map(|(p, q, c)| (p.as_str(), *q, *c))
                .collect::<Vec<_>>(),
        );
        let stack = &stack;
        tasks.push(async move {
            let (status, _, order) = stack.post_order(&body, None).await;
            assert_eq!(status, 202, "{order}");
            order["id"].as_str().unwrap().to_owned()
        });
    }
    let ids = futures_util::future::join_all(tasks).await;
    let mut held = std::collections::BTreeMap::<String, i64>::new();
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    for id in &ids {
        let order = stack.wait_terminal(id).await;
        let status = order["status"].as_str().unwrap().to_owned();
        if status == "shipped" {
            for item in order["items"].as_array().unwrap() {
                *held
                    .entry(item["product_id"].as_str().unwrap().into())
                    .or_default() += item["quantity"].as_i64().unwrap();
            }
        }
        *outcomes.entry(status).or_default() += 1;
    }
    assert_eq!(outcomes.values().sum::<usize>(), 100);
    assert!(!outcomes.contains_key("failed"), "{outcomes:?}");
    assert!(
        outcomes.get("shipped").copied().unwrap_or(0) > 0,
        "{outcomes:?}"
    );
    stack.wait_quiet().await;
    for p in &products {
        let (available, reserved) = stack.stock(p).await;
        assert_eq!(available + reserved, initial, "stock of {p} not conserved");
        assert_eq!(
            reserved,
            held.get(p).copied().unwrap_or(0),
            "held stock of {p}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_fast_path_off_the_relay_alone_delivers_every_message() {
    // Every message then waits for the relay, woken by LISTEN/NOTIFY (the poll is the safety net).
    let stack =
        Stack::start_with(StackOptions::default().with_all("OUTBOX_FAST_PATH", "false")).await;
    let oat = product("oat");
    stack.set_stock(&oat, 10).await;
    let ids: Vec<String> = futures_util::future::join_all((0..5).map(|i| {
        let oat = oat.clone();
        let stack = &stack;
        async move { stack.create_order(&format!("r{i}"), &[(&oat, 1, 10)]).await }
    }))
    .await;
    for id in &ids {
        let order = stack.wait_terminal(id).await;
        assert_eq!(order["status"], "shipped");
    }
    stack.wait_quiet().await;
    for svc in saga_e2e_tests::SERVICES {
        assert_eq!(stack.outbox_len(svc).await, 0, "{svc} outbox drained");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scarce_stock_is_never_oversold_when_reservations_share_a_batch() {
    // 60 one-unit orders race for 25 units of one product: inventory decides them in batches
    // that share the product's row, so each batch must count stock as it goes.
    let stack = Stack::start().await;
    let scarce = product("scarce");
    stack.set_stock(&scarce, 25).await;
    let ids = stack
        .create_orders(60, std::slice::from_ref(&scarce), 60)
        .await;
    let outcomes = stack.wait_all_terminal(&ids, Duration::from_secs(60)).await;
    let reserved_orders = ids.len() - outcomes.get("cancelled").copied().unwrap_or(0);
    assert_eq!(outcomes.values().sum::<usize>(), 60, "{outcomes:?}");
    stack.wait_quiet().await;
    let (available, reserved) = stack.stock(&scarce).await;
    assert_eq!(available + reserved, 25, "stock not conserved");
    assert!(available >= 0 && reserved >= 0);
    // Orders ask for 1 or 2 units (see create_orders): the 25 units hold at most 25 orders, and
    // whatever is held belongs to a shipped order.
    assert!(reserved_orders <= 25, "{outcomes:?}");
    assert!(reserved_orders > 0, "{outcomes:?}");
    let mut held = 0;
    for id in &ids {
        let (_, order) = stack.get("orchestrator", &format!("/orders/{id}")).await;
        if order["status"] == "shipped" {
            for item in order["items"].as_array().unwrap() {
                held += item["quantity"].as_i64().unwrap();
            }
        }
    }
    assert_eq!(reserved, held, "held stock differs from shipped orders");
    stack.assert_audit_clean(&ids, &[scarce], 25).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_idempotency_key_sent_many_times_at_once_makes_one_order() {
    // Concurrent requests usually share one insert batch: the key must still win once.
    let stack = Stack::start().await;
    let p = product("idem");
    stack.set_stock(&p, 100).await;
    let body = saga_e2e_tests::order_body("c1", &[(p.as_str(), 1, 500)]);
    let key = format!("key-{}", uuid::Uuid::new_v4());
    let answers = futures_util::future::join_all(
        (0..20).map(|_| stack.post_order(&body, Some(key.as_str()))),
    )
    .await;
    let mut ids = std::collections::BTreeSet::new();
    let mut created = 0;
    for (status, _, order) in &answers {
        assert!(*status == 202 || *status == 200, "{status} {order}");
        if *status == 202 {
            created += 1;
        }
        ids.insert(order["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 1, "one key made several orders: {ids:?}");
    assert_eq!(created, 1, "exactly one request creates the order");
    let id = ids.into_iter().next().unwrap();
    assert_eq!(stack.wait_terminal(&id).await["status"], "shipped");
}
