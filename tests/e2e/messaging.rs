//! Messaging guarantees: duplicates have one effect, poison messages are dead-lettered.

use std::time::Duration;

use async_nats::HeaderMap;
use futures_util::StreamExt;
use uuid::Uuid;

use saga_e2e_tests::{Stack, product, wait_until};
use saga_shared_events::contract::{
    Body, ChargePayment, Charged, Envelope, Line, OrderRef, ReserveInventory, header,
};

async fn publish(js: &async_nats::jetstream::Context, env: &Envelope, msg_id: Uuid) {
    let mut headers = HeaderMap::new();
    headers.insert(header::MSG_ID, msg_id.to_string().as_str());
    headers.insert(header::SAGA_ID, env.saga_id.to_string().as_str());
    js.publish_with_headers(env.body.subject(), headers, env.encode().into())
        .await
        .unwrap()
        .await
        .unwrap();
}

/// Waits until a session of `service`'s database waits for a row lock (`what` names it).
async fn wait_for_a_row_lock(stack: &Stack, service: &str, what: &str) {
    wait_until(Duration::from_secs(30), what, || async {
        let mut db = stack.db(service).await;
        let waiting: i64 = sqlx::query_scalar(
            "select count(*) from pg_stat_activity \
             where datname = current_database() and wait_event_type = 'Lock'",
        )
        .fetch_one(&mut db)
        .await
        .unwrap();
        waiting > 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_command_delivered_twice_reserves_and_charges_once() {
    let stack = Stack::start().await;
    let yam = product("yam");
    stack.set_stock(&yam, 10).await;
    let id = stack.create_order("hank", &[(&yam, 3, 700)]).await;
    let order = stack.wait_terminal(&id).await;
    assert_eq!(order["status"], "shipped");
    let order_id: Uuid = id.parse().unwrap();
    let js = stack.jetstream().await;

    // A re-sent command (new message id, as after a deadline) and an exact redelivery (same id,
    // published after JetStream's duplicate window would have dropped it: the inbox must).
    let reserve = Envelope::new(
        order_id,
        None,
        Body::ReserveInventory(ReserveInventory {
            order_id,
            lines: vec![Line {
                product_id: yam.clone(),
                quantity: 3,
            }],
        }),
    );
    let charge = Envelope::new(
        order_id,
        None,
        Body::ChargePayment(ChargePayment {
            order_id,
            customer_id: "hank".into(),
            amount_cents: 2100,
        }),
    );
    for env in [&reserve, &charge] {
        publish(&js, env, env.message_id).await;
        publish(&js, env, Uuid::now_v7()).await;
    }
    stack.wait_quiet().await;

    assert_eq!(stack.stock(&yam).await, (7, 3), "reserved once");
    let mut db = stack.db("payment").await;
    let charges: i64 = sqlx::query_scalar("select count(*) from payment where order_id = $1")
        .bind(order_id)
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(charges, 1);
    let (_, pay) = stack.get("payment", &format!("/payments/{id}")).await;
    assert_eq!(
        (&pay["status"], &pay["amount_cents"]),
        (&"charged".into(), &2100.into())
    );
    let order = stack.wait_terminal(&id).await;
    assert_eq!(
        order["history"].as_array().unwrap().len(),
        4,
        "late replies were ignored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_command_is_dead_lettered_and_the_service_keeps_working() {
    let stack = Stack::start().await;
    let js = stack.jetstream().await;
    let dlq = js.get_stream("SAGA_DLQ").await.unwrap();
    let watcher = dlq
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: None,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut dead = watcher.messages().await.unwrap();

    let mut headers = HeaderMap::new();
    headers.insert("X-Test", "poison");
    js.publish_with_headers("saga.cmd.payment.charge.v1", headers, "{not json".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let mut v = serde_json::to_value(Envelope::new(
        Uuid::nil(),
        None,
        Body::ChargePayment(ChargePayment {
            order_id: Uuid::nil(),
            customer_id: "x".into(),
            amount_cents: 1,
        }),
    ))
    .unwrap();
    v["version"] = 9.into();
    js.publish(
        "saga.cmd.inventory.reserve.v1",
        serde_json::to_vec(&v).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();

    let huge = vec![b' '; 300 * 1024];
    js.publish("saga.cmd.shipping.ship.v1", huge.into())
        .await
        .unwrap()
        .await
        .unwrap();

    let mut seen = Vec::new();
    for _ in 0..3 {
        let msg = tokio::time::timeout(Duration::from_secs(15), dead.next())
            .await
            .expect("a dead letter within 15 s")
            .unwrap()
            .unwrap();
        let h = msg.headers.clone().unwrap();
        seen.push((
            msg.subject.to_string(),
            h.get(header::DLQ_ERROR).unwrap().as_str().to_owned(),
            h.get(header::DLQ_DELIVERIES).unwrap().as_str().to_owned(),
            h.get("X-Test").map(|v| v.as_str().to_owned()),
            msg.payload.clone(),
        ));
        msg.ack().await.unwrap();
    }
    seen.sort();
    assert_eq!(seen[2].0, "saga.dlq.saga.cmd.shipping.ship.v1");
    assert!(seen[2].1.contains("exceeds the limit"), "{}", seen[2].1);
    assert_eq!(seen[0].0, "saga.dlq.saga.cmd.inventory.reserve.v1");
    assert!(seen[0].1.contains("unsupported version 9"), "{}", seen[0].1);
    assert_eq!(seen[1].0, "saga.dlq.saga.cmd.payment.charge.v1");
    assert!(seen[1].1.contains("malformed"), "{}", seen[1].1);
    assert_eq!(seen[1].2, "1", "poison is dead-lettered on first delivery");
    assert_eq!(
        seen[1].3.as_deref(),
        Some("poison"),
        "original headers are kept"
    );
    assert_eq!(&seen[1].4[..], b"{not json", "original payload is kept");

    // Still working: an order completes.
    let rye = product("rye");
    stack.set_stock(&rye, 1).await;
    let id = stack.create_order("ivy", &[(&rye, 1, 1)]).await;
    assert_eq!(stack.wait_terminal(&id).await["status"], "shipped");
    wait_until(
        Duration::from_secs(5),
        "the poison left the command stream",
        || async { stack.outbox_len("payment").await == 0 },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_keeps_failing_is_dead_lettered_after_max_deliver() {
    let opts = saga_e2e_tests::StackOptions::default()
        .with("shipping", "CHAOS_ERROR_RATE", "1.0")
        .with("shipping", "CONSUMER_MAX_DELIVER", "3");
    let stack = Stack::start_with(opts).await;
    let js = stack.jetstream().await;
    let dlq = js.get_stream("SAGA_DLQ").await.unwrap();
    let watcher = dlq
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            filter_subject: "saga.dlq.saga.cmd.shipping.>".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut dead = watcher.messages().await.unwrap();
    let fig = product("fig");
    stack.set_stock(&fig, 2).await;
    let id = stack.create_order("olga", &[(&fig, 1, 10)]).await;

    let msg = tokio::time::timeout(Duration::from_secs(20), dead.next())
        .await
        .expect("the failing command dead-lettered within 20 s")
        .unwrap()
        .unwrap();
    let h = msg.headers.clone().unwrap();
    assert_eq!(
        h.get(header::DLQ_SUBJECT).unwrap().as_str(),
        "saga.cmd.shipping.ship.v1"
    );
    assert_eq!(h.get(header::DLQ_DELIVERIES).unwrap().as_str(), "3");
    assert!(
        h.get(header::DLQ_ERROR)
            .unwrap()
            .as_str()
            .contains("gave up after 3 deliveries")
    );
    let env = Envelope::decode(&msg.payload).unwrap();
    assert_eq!(env.saga_id.to_string(), id, "the original payload is kept");
    // The saga is not lost: it waits in `paid` for its deadline to re-send the command.
    let (_, order) = stack.get("orchestrator", &format!("/orders/{id}")).await;
    assert_eq!(order["status"], "paid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_changed_while_its_reply_is_applied_is_retried_not_overwritten() {
    use sqlx::Connection;
    // No deadline fires meanwhile: the only other change is the one made below.
    let opts =
        saga_e2e_tests::StackOptions::default().with("orchestrator", "STEP_TIMEOUT_MS", "120000");
    let mut stack = Stack::start_with(opts).await;
    let fig = product("fig");
    stack.set_stock(&fig, 10).await;
    // With inventory down the order waits for its reservation.
    stack.kill("inventory").await;
    let id = stack.create_order("ivy", &[(&fig, 2, 500)]).await;
    // Another writer (a second replica, an operator) changes the saga and holds its row.
    let mut other = stack.db("orchestrator").await;
    let mut tx = other.begin().await.unwrap();
    sqlx::query(
        "update saga_order set version = version + 1, cancel_detail = 'kept' \
         where order_id = $1::uuid",
    )
    .bind(&id)
    .execute(&mut *tx)
    .await
    .unwrap();
    stack.restart("inventory").await;
    // The reservation's reply arrives and its write waits for that row; it read the old version.
    wait_for_a_row_lock(
        &stack,
        "orchestrator",
        "the reply's write to wait for the row",
    )
    .await;
    tx.commit().await.unwrap();
    // The stale write is refused, the reply is applied again on the new version, once.
    let order = stack.wait_terminal(&id).await;
    assert_eq!(order["status"], "shipped");
    assert_eq!(
        saga_e2e_tests::history_statuses(&order),
        ["created", "inventory_reserved", "paid", "shipped"]
    );
    let mut db = stack.db("orchestrator").await;
    let (version, detail): (i64, Option<String>) =
        sqlx::query_as("select version, cancel_detail from saga_order where order_id = $1::uuid")
            .bind(&id)
            .fetch_one(&mut db)
            .await
            .unwrap();
    // The other writer's change survived (a blind write would have cleared it), and the saga
    // moved three times after it.
    assert_eq!(detail.as_deref(), Some("kept"));
    assert_eq!(version, 4);
    // The refused write was the one made from the orchestrator's cache (version 0, as it wrote
    // the order), without a read.
    let metrics = stack.metrics("orchestrator").await;
    assert_eq!(
        metrics.get("saga_cache_conflicts_total"),
        Some(&1.0),
        "{metrics:?}"
    );
    assert_eq!(stack.stock(&fig).await, (8, 2));
    stack.assert_audit_clean(&[id], &[fig], 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_delivered_again_is_applied_once_and_one_for_no_saga_is_dead_lettered_each_time() {
    let mut stack = Stack::start().await;
    let js = stack.jetstream().await;
    let watcher = js
        .get_stream("SAGA_DLQ")
        .await
        .unwrap()
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: None,
            filter_subject: "saga.dlq.saga.reply.>".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut dead = watcher.messages().await.unwrap();
    let fig = product("fig");
    stack.set_stock(&fig, 10).await;
    // With inventory down, the only reservation reply is the hand-made one below.
    stack.kill("inventory").await;
    let id = stack.create_order("ivy", &[(&fig, 2, 500)]).await;
    let order_id: Uuid = id.parse().unwrap();
    let reserved = Envelope::new(
        order_id,
        None,
        Body::InventoryReserved(OrderRef { order_id }),
    );
    // Three copies of one reply, each under a new Nats-Msg-Id (as after JetStream's duplicate
    // window): two at once, which may share a batch, and one after the saga ended.
    publish(&js, &reserved, Uuid::now_v7()).await;
    publish(&js, &reserved, Uuid::now_v7()).await;
    assert_eq!(stack.wait_terminal(&id).await["status"], "shipped");
    publish(&js, &reserved, Uuid::now_v7()).await;

    // A reply for no saga is dead-lettered, and so is its replay: it left no inbox entry.
    let stray = Uuid::now_v7();
    let orphan = Envelope::new(
        stray,
        None,
        Body::PaymentCharged(Charged {
            order_id: stray,
            amount_cents: 100,
        }),
    );
    for _ in 0..2 {
        publish(&js, &orphan, Uuid::now_v7()).await;
        let msg = tokio::time::timeout(Duration::from_secs(15), dead.next())
            .await
            .expect("a dead letter within 15 s")
            .unwrap()
            .unwrap();
        let letter = Envelope::decode(&msg.payload).unwrap();
        assert_eq!(letter.message_id, orphan.message_id);
        let error = msg
            .headers
            .as_ref()
            .unwrap()
            .get(header::DLQ_ERROR)
            .unwrap();
        assert!(error.as_str().contains("not found"), "{}", error.as_str());
        msg.ack().await.unwrap();
    }

    stack.restart("inventory").await;
    stack.wait_quiet().await;
    let order = stack.wait_terminal(&id).await;
    assert_eq!(
        saga_e2e_tests::history_statuses(&order),
        ["created", "inventory_reserved", "paid", "shipped"]
    );
    let mut db = stack.db("orchestrator").await;
    let version: i64 = sqlx::query_scalar("select version from saga_order where order_id = $1")
        .bind(order_id)
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(version, 3, "three transitions after creation, none twice");
    let recorded: i64 =
        sqlx::query_scalar("select count(*) from processed_message where message_id = any($1)")
            .bind([reserved.message_id, orphan.message_id])
            .fetch_one(&mut db)
            .await
            .unwrap();
    assert_eq!(recorded, 1, "the reply once, the orphan never");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_changed_while_a_reservation_is_written_is_not_overwritten() {
    use sqlx::Connection;
    let stack = Stack::start().await;
    let fig = product("fig");
    stack.set_stock(&fig, 10).await;
    // Another writer (a second inventory, an operator) lowers the stock and holds the row.
    let mut other = stack.db("inventory").await;
    let mut tx = other.begin().await.unwrap();
    sqlx::query("update product set available = 4 where product_id = $1")
        .bind(&fig)
        .execute(&mut *tx)
        .await
        .unwrap();
    // The reservation read 10 units; its write waits for the row.
    let id = stack.create_order("ivy", &[(&fig, 2, 500)]).await;
    wait_for_a_row_lock(
        &stack,
        "inventory",
        "the reservation's write to wait for the product row",
    )
    .await;
    tx.commit().await.unwrap();
    // The write made for 10 units is refused whole; the reservation is decided again on 4.
    let order = stack.wait_terminal(&id).await;
    assert_eq!(order["status"], "shipped");
    assert_eq!(
        stack.stock(&fig).await,
        (2, 2),
        "4 - 2 available, 2 reserved"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_set_after_a_reservation_is_seen_by_the_next_one_whichever_way_it_moved() {
    let stack = Stack::start().await;
    let fig = product("fig");
    stack.set_stock(&fig, 2).await;
    // Inventory remembers the 0 units its write left.
    let first = stack.create_order("ivy", &[(&fig, 2, 500)]).await;
    assert_eq!(stack.wait_terminal(&first).await["status"], "shipped");
    // An operator raises the stock behind it: 3 wanted of 5 must be reserved, not refused for
    // the 0 remembered.
    stack.set_stock(&fig, 5).await;
    let enough = stack.create_order("ivy", &[(&fig, 3, 500)]).await;
    assert_eq!(stack.wait_terminal(&enough).await["status"], "shipped");
    assert_eq!(stack.stock(&fig).await, (2, 5));
    // And lowers it: 2 wanted of 1 must be refused, not taken from the 2 remembered.
    stack.set_stock(&fig, 1).await;
    let short = stack.create_order("ivy", &[(&fig, 2, 500)]).await;
    let order = stack.wait_terminal(&short).await;
    assert_eq!(order["status"], "cancelled", "{order}");
    assert!(
        order["cancel_detail"]
            .as_str()
            .unwrap_or_default()
            .contains("insufficient stock"),
        "{order}"
    );
    assert_eq!(stack.stock(&fig).await, (1, 5));
}

/// The shared pull counts what it asked for exactly: requests that expire with nothing to
/// deliver neither end it nor leave it waiting for messages it never asked for, and a deleted
/// consumer ends it at once so the service can create the consumer again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_survives_expired_requests_and_ends_when_its_consumer_is_deleted() {
    use async_nats::jetstream::{consumer, stream};
    use saga_shared_events::pull::{Pull, PullError, PullOptions};

    let nats = saga_e2e_tests::Nats::start().await;
    let js = async_nats::jetstream::new(nats.client().await);
    let work = js
        .create_stream(stream::Config {
            name: "PULLTEST".into(),
            subjects: vec!["pulltest.>".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await
        .unwrap();
    work.create_consumer(consumer::pull::Config {
        durable_name: Some("t".into()),
        ack_policy: consumer::AckPolicy::Explicit,
        ..Default::default()
    })
    .await
    .unwrap();
    let options = PullOptions {
        batch: 4,
        expires: Duration::from_millis(300),
        heartbeat: Duration::from_millis(100),
    };
    let mut pull = Pull::start(&js, "PULLTEST", "t", options).await.unwrap();

    let mut next_n = 0;
    for round in 0..2 {
        for n in next_n..next_n + 50 {
            js.publish(format!("pulltest.{n}"), n.to_string().into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
        for n in next_n..next_n + 50 {
            let msg = tokio::time::timeout(Duration::from_secs(5), pull.next())
                .await
                .unwrap_or_else(|_| panic!("round {round}: message {n} never came"))
                .unwrap_or_else(|e| panic!("round {round}: the pull ended at {n}: {e}"));
            assert_eq!(msg.subject.as_str(), format!("pulltest.{n}"));
            msg.ack().await.unwrap();
        }
        next_n += 50;
        // Nothing left: requests expire every 300 ms (the broker says how many each left
        // undelivered) while heartbeats come every 100 ms; the pull must wait on, asking anew.
        let idle = tokio::time::timeout(Duration::from_millis(1500), pull.next()).await;
        assert!(
            idle.is_err(),
            "round {round}: an idle pull must wait: {idle:?}"
        );
    }

    work.delete_consumer("t").await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(2), pull.next())
        .await
        .expect("a pull whose consumer was deleted must end");
    assert!(
        matches!(ended, Err(PullError::Ended(_) | PullError::Silent)),
        "{ended:?}"
    );
}
