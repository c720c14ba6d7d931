//! Fault tests: crashes, broker and database restarts, outages, chaos and replicas. Each is
//! bounded in time and ends with the audit at zero violations.

use std::time::Duration;

use sqlx::Connection;

use saga_e2e_tests::pgcut::CommitCutter;
use saga_e2e_tests::{Stack, StackOptions, binary, order_body, product};

const FINISH: Duration = Duration::from_secs(180);

async fn stocked(stack: &Stack, n: usize, initial: i64) -> Vec<String> {
    let products: Vec<String> = (0..n).map(|i| product(&format!("f{i}"))).collect();
    for p in &products {
        stack.set_stock(p, initial).await;
    }
    products
}

/// Sagas not yet terminal, straight from the orchestrator's table.
async fn in_flight(stack: &Stack) -> i64 {
    let mut db = stack.db("orchestrator").await;
    sqlx::query_scalar(
        "select count(*) from saga_order where status not in ('shipped', 'cancelled', 'failed')",
    )
    .fetch_one(&mut db)
    .await
    .unwrap()
}

async fn wait_progress(stack: &Stack, status_at_least: &[&str], count: i64) {
    let statuses: Vec<String> = status_at_least.iter().map(|s| s.to_string()).collect();
    let deadline = tokio::time::Instant::now() + FINISH;
    loop {
        let mut db = stack.db("orchestrator").await;
        let n: i64 = sqlx::query_scalar("select count(*) from saga_order where status = any($1)")
            .bind(&statuses)
            .fetch_one(&mut db)
            .await
            .unwrap();
        if n >= count {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no progress to {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `n` new orders, each of which must be accepted at the first attempt (no idempotency key, so
/// none can be a replay of an earlier order); their ids.
async fn new_orders(stack: &Stack, n: usize, products: &[String]) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let product = products[i % products.len()].as_str();
        let r = stack
            .http
            .post(stack.url("orchestrator", "/orders"))
            .json(&order_body(&format!("new-{i}"), &[(product, 1, 100)]))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 202, "new order {i}");
        let v: serde_json::Value = r.json().await.unwrap();
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    ids
}

fn slow_participants() -> StackOptions {
    StackOptions::default()
        .with("inventory", "CHAOS_LATENCY_MS", "10")
        .with("payment", "CHAOS_LATENCY_MS", "10")
        .with("shipping", "CHAOS_LATENCY_MS", "10")
        .with("payment", "PAYMENT_SUCCESS_RATE", "0.8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_orchestrator_with_200_sagas_in_flight_loses_none() {
    let mut stack = Stack::start_with(slow_participants()).await;
    let products = stocked(&stack, 5, 1000).await;
    let ids = stack.create_orders(200, &products, 50).await;
    let flying = in_flight(&stack).await;
    stack.kill("orchestrator").await;
    assert!(flying > 0, "the kill must hit sagas in flight");

    stack.restart("orchestrator").await;
    let outcomes = stack.wait_all_terminal(&ids, FINISH).await;
    assert_eq!(outcomes.values().sum::<usize>(), 200);
    assert!(!outcomes.contains_key("failed"), "{outcomes:?}");
    stack.assert_audit_clean(&ids, &products, 1000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_each_participant_in_turn_loses_nothing() {
    let mut stack = Stack::start_with(slow_participants()).await;
    let products = stocked(&stack, 5, 1000).await;
    let ids = stack.create_orders(150, &products, 50).await;

    stack.kill("inventory").await;
    stack.restart("inventory").await;
    wait_progress(
        &stack,
        &[
            "inventory_reserved",
            "paid",
            "shipped",
            "releasing_inventory",
            "cancelled",
        ],
        30,
    )
    .await;
    stack.kill("payment").await;
    stack.restart("payment").await;
    wait_progress(&stack, &["paid", "shipped", "cancelled"], 30).await;
    stack.kill("shipping").await;
    stack.restart("shipping").await;

    let outcomes = stack.wait_all_terminal(&ids, FINISH).await;
    assert!(!outcomes.contains_key("failed"), "{outcomes:?}");
    stack.assert_audit_clean(&ids, &products, 1000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_nats_mid_run_loses_nothing() {
    let mut stack = Stack::start_with(slow_participants()).await;
    let products = stocked(&stack, 5, 1000).await;
    let ids = stack.create_orders(150, &products, 50).await;
    assert!(in_flight(&stack).await > 0);
    stack.nats[0].restart().await;

    let outcomes = stack.wait_all_terminal(&ids, FINISH).await;
    assert!(!outcomes.contains_key("failed"), "{outcomes:?}");
    stack.assert_audit_clean(&ids, &products, 1000).await;
    // Orders keep working after the restart.
    let more = new_orders(&stack, 10, &products).await;
    stack.wait_all_terminal(&more, FINISH).await;
}

/// Each consumer asks the restarted broker again as soon as its client reconnects, instead of
/// waiting two heartbeats for a pull the broker forgot: no service logs a pull that ended, and an
/// order placed afterwards ships.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_broker_restart_every_consumer_pulls_again_at_the_reconnection() {
    const PULLING_AGAIN: &str = "NATS reconnected; pulling again";
    let mut stack = Stack::start().await;
    let fig = product("fig");
    stack.set_stock(&fig, 5).await;
    let first = stack.create_order("una", &[(&fig, 1, 100)]).await;
    assert_eq!(stack.wait_terminal(&first).await["status"], "shipped");
    for svc in saga_e2e_tests::SERVICES {
        assert!(
            !stack.log(svc).contains(PULLING_AGAIN),
            "{svc} before any restart"
        );
    }

    stack.nats[0].restart().await;
    let second = stack.create_order("una", &[(&fig, 1, 100)]).await;
    assert_eq!(stack.wait_terminal(&second).await["status"], "shipped");
    for svc in saga_e2e_tests::SERVICES {
        let log = stack.log(svc);
        assert!(
            !log.contains("pull ended"),
            "{svc} waited for its pull's silence:\n{}",
            stack.log_tail(svc)
        );
        assert!(
            log.contains(PULLING_AGAIN),
            "{svc}:\n{}",
            stack.log_tail(svc)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_postgres_mid_run_loses_nothing() {
    let mut opts = slow_participants();
    opts.private_postgres = true;
    let stack = Stack::start_with(opts).await;
    let products = stocked(&stack, 5, 1000).await;
    let ids = stack.create_orders(150, &products, 50).await;
    assert!(in_flight(&stack).await > 0);
    let pg = stack.postgres.as_ref().unwrap();
    pg.stop();
    pg.start_again().await;

    let outcomes = stack.wait_all_terminal(&ids, FINISH).await;
    assert!(!outcomes.contains_key("failed"), "{outcomes:?}");
    stack.assert_audit_clean(&ids, &products, 1000).await;
    for svc in saga_e2e_tests::SERVICES {
        let (s, _) = stack.get(svc, "/readyz").await;
        assert_eq!(s, 200, "{svc} ready again");
    }
    // New orders are accepted at the first attempt (none fails on a connection the restart
    // closed) and finish.
    let more = new_orders(&stack, 20, &products).await;
    stack.wait_all_terminal(&more, FINISH).await;
}

/// Batch connections go back to their pool untested while they are busy; one that Postgres
/// closed in the meantime fails its statement, and the order is written again on a tested one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_is_accepted_when_postgres_closed_the_batch_connections() {
    let stack = Stack::start().await;
    let products = stocked(&stack, 1, 1000).await;
    let post = |i: usize| {
        let body = order_body(&format!("closed-{i}"), &[(products[0].as_str(), 1, 100)]);
        stack
            .http
            .post(stack.url("orchestrator", "/orders"))
            .json(&body)
            .send()
    };
    let mut admin = stack.db("orchestrator").await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let r = post(i).await.unwrap();
        assert_eq!(r.status().as_u16(), 202);
        ids.push(
            r.json::<serde_json::Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
        // Right after its use: within the time a kept connection goes back untested.
        let closed: i64 = sqlx::query_scalar(
            "select count(*) from (select pg_terminate_backend(pid) from pg_stat_activity \
             where datname = current_database() and pid <> pg_backend_pid() \
             and application_name = 'orchestrator') t",
        )
        .fetch_one(&mut admin)
        .await
        .unwrap();
        assert!(closed > 0);
        let r = post(100 + i).await.unwrap();
        assert_eq!(
            r.status().as_u16(),
            202,
            "order after closing the connections"
        );
        ids.push(
            r.json::<serde_json::Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let outcomes = stack.wait_all_terminal(&ids, FINISH).await;
    assert_eq!(outcomes.values().sum::<usize>(), ids.len(), "{outcomes:?}");
}

/// Points the orchestrator at Postgres through a proxy that can let an order's insert commit and
/// then close the connection before the answer arrives.
async fn cut_order_inserts(stack: &mut Stack) -> CommitCutter {
    let cutter = CommitCutter::start(stack.admin_url(), "insert into saga_order").await;
    let url = cutter.url(&stack.db_url("orchestrator"));
    stack.set_env("orchestrator", "DATABASE_URL", &url);
    stack.restart("orchestrator").await;
    cutter
}

/// Posts one order of one unit of `product`, with an idempotency key if given: its status and
/// body. The request is built at once, so the future borrows nothing (it can be spawned).
fn post_order(
    stack: &Stack,
    customer: &str,
    product: &str,
    key: Option<&str>,
) -> impl std::future::Future<Output = (u16, serde_json::Value)> + Send + 'static {
    let mut request = stack
        .http
        .post(stack.url("orchestrator", "/orders"))
        .json(&order_body(customer, &[(product, 1, 100)]));
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    async move {
        let r = request.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    }
}

/// A customer's orders in the orchestrator's table, sorted.
async fn orders_of(stack: &Stack, customer: &str) -> Vec<uuid::Uuid> {
    let mut db = stack.db("orchestrator").await;
    sqlx::query_scalar("select order_id from saga_order where customer_id = $1 order by order_id")
        .bind(customer)
        .fetch_all(&mut db)
        .await
        .unwrap()
}

/// Messages the orchestrator's outbox relay published (rather than their writer after commit).
async fn relay_published(stack: &Stack) -> f64 {
    stack
        .metrics("orchestrator")
        .await
        .get(r#"outbox_published_total{path="relay"}"#)
        .copied()
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_whose_commit_lost_its_answer_is_accepted_once() {
    let mut stack = Stack::start().await;
    let products = stocked(&stack, 1, 100).await;
    let cutter = cut_order_inserts(&mut stack).await;
    // Without and with an idempotency key (a keyed batch runs in a transaction).
    for (round, key) in [None, Some(uuid::Uuid::new_v4().to_string())]
        .into_iter()
        .enumerate()
    {
        let customer = format!("cut-{}", uuid::Uuid::new_v4().simple());
        cutter.arm();
        let (status, answer) = post_order(&stack, &customer, &products[0], key.as_deref()).await;
        assert_eq!(cutter.cuts(), round + 1, "the insert's answer was cut");
        assert_eq!(status, 202, "key {key:?}: {answer}");
        let id = answer["id"].as_str().unwrap().to_owned();
        let outcomes = stack
            .wait_all_terminal(std::slice::from_ref(&id), FINISH)
            .await;
        assert_eq!(outcomes.values().sum::<usize>(), 1, "{outcomes:?}");
        assert_eq!(
            orders_of(&stack, &customer).await,
            [id.parse::<uuid::Uuid>().unwrap()],
            "one order, the answered one"
        );
        // Its messages left with the retry, not after the relay's grace period.
        assert_eq!(
            relay_published(&stack).await,
            0.0,
            "key {key:?}: the relay published"
        );
    }
}

/// One intake batch of two orders with the same idempotency key and one without, whose commit
/// loses its answer: the retry finds the two orders written, answers the keyed pair with one
/// order (`202` for the one written, `200` replaying it for the other) and the keyless one with
/// its own, and their messages leave with the retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_order_batch_whose_commit_lost_its_answer_answers_each_order() {
    let mut stack = Stack::start().await;
    let products = stocked(&stack, 1, 100).await;
    let cutter = cut_order_inserts(&mut stack).await;

    // The intake writes one batch at a time: hold a first order's insert on the idempotency key
    // of a row not yet committed, so the three orders queue behind it and go together in the
    // next batch. (A table lock would hold the statement's preparation too, before the cutter
    // is armed, on a connection that has not prepared it yet.)
    let held_key = uuid::Uuid::new_v4().to_string();
    let mut lock = stack.db("orchestrator").await;
    sqlx::query("begin").execute(&mut lock).await.unwrap();
    sqlx::query(
        "insert into saga_order (order_id, customer_id, items, total_cents, state, status, \
         idempotency_key) values (gen_random_uuid(), 'held', '[]', 0, '{}', 'created', $1)",
    )
    .bind(&held_key)
    .execute(&mut lock)
    .await
    .unwrap();
    let first = tokio::spawn(post_order(&stack, "held", &products[0], Some(&held_key)));
    saga_e2e_tests::wait_until(
        FINISH,
        "the first order's insert waiting for the held key",
        || async {
            let mut db = stack.db("orchestrator").await;
            let waiting: i64 = sqlx::query_scalar(
                "select count(*) from pg_stat_activity where wait_event_type = 'Lock' \
                 and query like '%insert into saga_order%'",
            )
            .fetch_one(&mut db)
            .await
            .unwrap();
            waiting == 1
        },
    )
    .await;
    cutter.arm();
    let customer = format!("mixed-{}", uuid::Uuid::new_v4().simple());
    let key = uuid::Uuid::new_v4().to_string();
    let batch = futures_util::future::join4(
        post_order(&stack, &customer, &products[0], Some(&key)),
        post_order(&stack, &customer, &products[0], Some(&key)),
        post_order(&stack, &customer, &products[0], None),
        async {
            saga_e2e_tests::wait_until(FINISH, "three orders waiting for the intake", || async {
                stack
                    .metrics("orchestrator")
                    .await
                    .get("orders_waiting_for_intake")
                    == Some(&3.0)
            })
            .await;
            sqlx::query("rollback").execute(&mut lock).await.unwrap();
        },
    );
    let ((s1, a1), (s2, a2), (s3, a3), ()) = batch.await;
    assert_eq!(cutter.cuts(), 1, "the batch's answer was cut");
    let (s0, _) = first.await.unwrap();
    assert_eq!(s0, 202);

    let mut keyed = [(s1, a1["id"].clone()), (s2, a2["id"].clone())];
    keyed.sort_by_key(|k| k.0);
    assert_eq!(
        [keyed[0].0, keyed[1].0],
        [200, 202],
        "the keyed pair: {a1} {a2}"
    );
    assert_eq!(keyed[0].1, keyed[1].1, "one order for one key");
    assert_eq!(s3, 202, "the keyless order: {a3}");
    let ids = [
        keyed[1].1.as_str().unwrap().to_owned(),
        a3["id"].as_str().unwrap().to_owned(),
    ];
    assert_ne!(ids[0], ids[1]);
    let mut expected: Vec<uuid::Uuid> = ids.iter().map(|id| id.parse().unwrap()).collect();
    expected.sort();
    assert_eq!(
        orders_of(&stack, &customer).await,
        expected,
        "the two answered orders, no other"
    );
    let outcomes = stack.wait_all_terminal(&ids, FINISH).await;
    assert_eq!(outcomes.values().sum::<usize>(), 2, "{outcomes:?}");
    assert_eq!(relay_published(&stack).await, 0.0, "the relay published");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_down_past_the_deadline_is_retried_until_it_answers() {
    let opts = StackOptions::default().with("orchestrator", "STEP_TIMEOUT_MS", "300");
    let mut stack = Stack::start_with(opts).await;
    let products = stocked(&stack, 2, 100).await;
    stack.kill("payment").await;
    let ids = stack.create_orders(10, &products, 5).await;
    // Every saga has re-sent its charge at least once.
    let deadline = tokio::time::Instant::now() + FINISH;
    loop {
        let mut db = stack.db("orchestrator").await;
        let retried: i64 = sqlx::query_scalar(
            "select count(*) from saga_order where (state->'InventoryReserved'->>'attempt')::int >= 1",
        )
        .fetch_one(&mut db)
        .await
        .unwrap();
        if retried == 10 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "charges were not re-sent"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stack.restart("payment").await;
    let outcomes = stack.wait_all_terminal(&ids, FINISH).await;
    assert_eq!(outcomes.get("shipped"), Some(&10), "{outcomes:?}");
    stack.assert_audit_clean(&ids, &products, 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_down_past_the_budget_compensates_and_a_failed_saga_can_be_retried() {
    let opts = StackOptions::default()
        .with("orchestrator", "STEP_TIMEOUT_MS", "200")
        .with("orchestrator", "STEP_MAX_ATTEMPTS", "2")
        .with("orchestrator", "COMPENSATION_MAX_ATTEMPTS", "2");
    let mut stack = Stack::start_with(opts).await;
    let products = stocked(&stack, 2, 100).await;
    stack.kill("payment").await;
    let ids = stack.create_orders(6, &products, 3).await;
    // Charge unanswered, refund unanswered: the compensation budget runs out.
    let outcomes = stack.wait_all_terminal(&ids, FINISH).await;
    assert_eq!(outcomes.get("failed"), Some(&6), "{outcomes:?}");
    let (_, failed) = stack.get("orchestrator", "/orders?status=failed").await;
    assert_eq!(failed["orders"].as_array().unwrap().len(), 6);
    assert_eq!(failed["orders"][0]["cancel_reason"], "timed_out");

    stack.restart("payment").await;
    for id in &ids {
        let (s, body) = stack
            .post_empty("orchestrator", &format!("/orders/{id}/retry"))
            .await;
        // A late refund reply may already have moved it on.
        assert!(s == 202 || s == 409, "{s} {body}");
    }
    for id in &ids {
        let order = stack
            .wait_order(id, FINISH, "cancelled", |o| o["status"] == "cancelled")
            .await;
        assert_eq!(order["cancel_reason"], "timed_out");
    }
    stack.assert_audit_clean(&ids, &products, 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_chaos_knob_at_once_over_500_sagas_keeps_every_guarantee() {
    let opts = StackOptions::default()
        .with_all("CHAOS_ERROR_RATE", "0.2")
        .with_all("CHAOS_DUPLICATE_RATE", "0.3")
        .with_all("CHAOS_LATENCY_MS", "3")
        .with("payment", "PAYMENT_SUCCESS_RATE", "0.8")
        .with("shipping", "SHIPPING_SUCCESS_RATE", "0.9");
    let stack = Stack::start_with(opts).await;
    let products = stocked(&stack, 10, 1000).await;
    let ids = stack.create_orders(500, &products, 64).await;
    let outcomes = stack.wait_all_terminal(&ids, FINISH).await;
    assert!(!outcomes.contains_key("failed"), "{outcomes:?}");
    assert!(
        outcomes.get("cancelled").copied().unwrap_or(0) > 0,
        "{outcomes:?}"
    );
    assert!(
        outcomes.get("shipped").copied().unwrap_or(0) > 0,
        "{outcomes:?}"
    );
    stack.assert_audit_clean(&ids, &products, 1000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_of_everything_survive_one_of_each_being_killed() {
    let stack_opts = slow_participants().replicas(2);
    let mut stack = Stack::start_with(stack_opts).await;
    let products = stocked(&stack, 5, 1000).await;
    let ids = stack.create_orders(200, &products, 50).await;
    assert!(in_flight(&stack).await > 0);
    for name in ["orchestrator-2", "inventory-2", "payment-2", "shipping-2"] {
        stack.kill(name).await;
    }
    let outcomes = stack.wait_all_terminal(&ids, FINISH).await;
    assert!(!outcomes.contains_key("failed"), "{outcomes:?}");
    stack.assert_audit_clean(&ids, &products, 1000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_nats_cluster_loses_nothing_when_a_node_dies() {
    let mut opts = slow_participants();
    opts.nats_cluster = true;
    let mut stack = Stack::start_with(opts).await;
    let products = stocked(&stack, 5, 1000).await;
    let js = stack.jetstream().await;
    for name in ["SAGA_CMD", "SAGA_REPLY", "ORDERS", "SAGA_DLQ"] {
        let mut s = js.get_stream(name).await.unwrap();
        assert_eq!(
            s.info().await.unwrap().config.num_replicas,
            3,
            "{name} at R3"
        );
    }
    let ids = stack.create_orders(150, &products, 50).await;
    assert!(in_flight(&stack).await > 0);
    stack.nats[1].kill().await;

    let outcomes = stack.wait_all_terminal(&ids, FINISH).await;
    assert!(!outcomes.contains_key("failed"), "{outcomes:?}");
    stack.assert_audit_clean(&ids, &products, 1000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_at_one_replica_on_a_cluster_are_warned_about_at_start_and_still_work() {
    let mut opts = StackOptions::default().with_all("STREAM_REPLICAS", "1");
    opts.nats_cluster = true;
    let stack = Stack::start_with(opts).await;
    let js = stack.jetstream().await;
    let mut cmd = js.get_stream("SAGA_CMD").await.unwrap();
    assert_eq!(cmd.info().await.unwrap().config.num_replicas, 1);
    for svc in ["orchestrator", "inventory", "payment", "shipping"] {
        let log = stack.log(svc);
        for stream in ["SAGA_CMD", "SAGA_REPLY", "ORDERS", "SAGA_DLQ"] {
            assert!(
                log.lines().any(|l| l.contains("WARN")
                    && l.contains(&format!("stream={stream}"))
                    && l.contains("1 replica(s) on a NATS cluster")
                    && l.contains("STREAM_REPLICAS=3")),
                "{svc} did not warn about {stream} at R1:\n{log}"
            );
        }
    }
    // A warning, not a refusal: the saga runs.
    let fig = product("fig");
    stack.set_stock(&fig, 5).await;
    let id = stack.create_order("ivy", &[(&fig, 1, 100)]).await;
    assert_eq!(stack.wait_terminal(&id).await["status"], "shipped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_service_cleanly_within_ten_seconds_mid_run() {
    let mut stack = Stack::start_with(slow_participants()).await;
    let products = stocked(&stack, 3, 1000).await;
    let ids = stack.create_orders(100, &products, 50).await;
    for name in ["payment", "orchestrator"] {
        let code = stack.terminate(name, Duration::from_secs(10)).await;
        assert_eq!(code, Some(0), "{name} exits 0 within 10 s");
        stack.restart(name).await;
    }
    let outcomes = stack.wait_all_terminal(&ids, FINISH).await;
    assert!(!outcomes.contains_key("failed"), "{outcomes:?}");
    stack.assert_audit_clean(&ids, &products, 1000).await;
}

/// `sagactl chaos` against a stack: every order ends and is counted once, the observed payment
/// rate follows the configured one, the audit passes, the participants' chaos settings are
/// restored, and the Postgres and NATS figures per saga are read live and add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagactl_chaos_accounts_for_every_order_and_restores_the_settings() {
    // A server of its own: the transaction and WAL counters are the server's, and other tests
    // write to the shared one meanwhile.
    let stack = Stack::start_with(StackOptions {
        private_postgres: true,
        ..StackOptions::default()
    })
    .await;
    let (status, before) = stack.get("payment", "/chaos").await;
    assert_eq!(status, 200, "{before}");
    let mut cmd = tokio::process::Command::new(binary("sagactl"));
    cmd.args(["chaos", "--orders", "120", "--concurrency", "8"])
        .args(["--payment-success-rate", "0.5", "--seed", "7", "--json"])
        .env("SAGACTL_ORCHESTRATOR_URL", stack.url("orchestrator", ""))
        .env("SAGACTL_INVENTORY_URL", stack.url("inventory", ""))
        .env("SAGACTL_PAYMENT_URL", stack.url("payment", ""))
        .env("SAGACTL_SHIPPING_URL", stack.url("shipping", ""))
        .env("NATS_URL", stack.nats_url());
    for svc in ["orchestrator", "inventory", "payment", "shipping"] {
        cmd.env(
            format!("{}_DATABASE_URL", svc.to_uppercase()),
            stack.db_url(svc),
        );
    }
    let out = tokio::time::timeout(FINISH, cmd.output())
        .await
        .expect("sagactl chaos finished in time")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "sagactl chaos failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();

    let outcomes = r["outcomes"].as_object().unwrap();
    let ended: u64 = outcomes.values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(ended, 120, "{outcomes:?}");
    let shipped = outcomes
        .get("shipped")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    let declined = r["cancel_reasons"]["payment_declined"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(shipped + declined, 120, "{r}");
    // 120 draws at 0.5: outside 0.3..0.7 is about one run in 10^5.
    let observed = r["payment_success_rate_observed"].as_f64().unwrap();
    assert!((0.3..=0.7).contains(&observed), "{observed}");
    assert_eq!(r["audit"]["sagas"], 120, "{r}");
    assert!(r["violations"].as_array().unwrap().is_empty(), "{r}");

    // Created, three commands, three replies, the end: eight messages whichever way it ends.
    assert_eq!(r["nats_messages_per_saga"].as_f64(), Some(8.0), "{r}");
    // Seven durable steps (the order, three participants, three transitions), partly shared
    // between sagas by group commit, plus the outbox clean-ups.
    let writes = r["postgres_write_transactions_per_saga"].as_f64().unwrap();
    assert!((1.0..=12.0).contains(&writes), "{writes}");
    let wal = r["postgres_wal_bytes_per_saga"].as_f64().unwrap();
    assert!(wal > 1_000.0, "{wal}");

    let (status, after) = stack.get("payment", "/chaos").await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(after, before, "the previous chaos settings are back");
}

/// With the broker down, orders are still accepted at once, each committed with its messages in
/// the outbox, and they finish once it is back: no request waits for NATS, not even once the
/// client's buffer of unsent messages (2,048) has filled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_are_accepted_at_once_while_nats_is_down_and_finish_once_it_is_back() {
    use futures_util::StreamExt;
    let mut stack = Stack::start().await;
    let products = stocked(&stack, 5, 10_000).await;
    stack.nats[0].kill().await;
    // Two messages per order leave the orchestrator: 1,200 orders are more than the buffer.
    let stack_ref = &stack;
    let products_ref = &products;
    let results: Vec<(String, Duration)> = futures_util::stream::iter(0..1_200usize)
        .map(|i| async move {
            let p = products_ref[i % products_ref.len()].as_str();
            let body = order_body(&format!("down{i}"), &[(p, 1, 100)]);
            let started = tokio::time::Instant::now();
            let r = stack_ref
                .http
                .post(stack_ref.url("orchestrator", "/orders"))
                .json(&body)
                .send()
                .await
                .unwrap_or_else(|e| panic!("order {i} got no answer while NATS was down: {e}"));
            let took = started.elapsed();
            assert_eq!(r.status(), 202, "order {i} not accepted while NATS is down");
            let v: serde_json::Value = r.json().await.unwrap();
            (v["id"].as_str().unwrap().to_owned(), took)
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let slowest = results.iter().map(|r| r.1).max().unwrap();
    // A request that waited for the broker would take the client's publish timeout (5 s).
    assert!(
        slowest < Duration::from_secs(2),
        "the slowest order took {slowest:?} while NATS was down"
    );
    stack.nats[0].restart().await;
    let ids: Vec<String> = results.into_iter().map(|r| r.0).collect();
    let outcomes = stack.wait_all_terminal(&ids, FINISH).await;
    assert_eq!(
        outcomes.get("shipped").copied(),
        Some(1_200),
        "{outcomes:?}"
    );
    stack.assert_audit_clean(&ids, &products, 10_000).await;
}

/// A service still waiting for Postgres or NATS at start-up (up to a minute each) stops at
/// SIGTERM at once and exits 0, as it does later: an orchestrator that cannot reach Postgres,
/// and a payment service that has its database but no broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_service_still_waiting_for_postgres_or_nats() {
    let logs = tempfile::tempdir().unwrap();
    let unreachable_nats = format!("nats://127.0.0.1:{}", saga_e2e_tests::free_port());
    let db = format!(
        "e2e_{}_payment",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let cases = [
        (
            "orchestrator",
            format!(
                "postgres://postgres@127.0.0.1:{}/nowhere",
                saga_e2e_tests::free_port()
            ),
            "Postgres not reachable yet",
        ),
        (
            "payment",
            saga_e2e_tests::db_url_on(&saga_e2e_tests::admin_db_url(), &db),
            "NATS not reachable yet",
        ),
    ];
    for (name, database_url, waiting) in cases {
        let log = logs.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let mut child = tokio::process::Command::new(binary(name))
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env("DATABASE_URL", &database_url)
            .env("NATS_URL", &unreachable_nats)
            .env(
                "HTTP_ADDR",
                format!("127.0.0.1:{}", saga_e2e_tests::free_port()),
            )
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let read = || std::fs::read_to_string(&log).unwrap_or_default();
        saga_e2e_tests::wait_until(Duration::from_secs(30), waiting, || {
            let seen = read().contains(waiting);
            async move { seen }
        })
        .await;
        let pid = child.id().unwrap().to_string();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -TERM {pid}");
        let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .unwrap_or_else(|_| panic!("{name} still waiting 5 s after SIGTERM:\n{}", read()))
            .unwrap();
        assert_eq!(status.code(), Some(0), "{name}:\n{}", read());
        assert!(
            read().contains(&format!("{name} stopped before start-up finished")),
            "{name}:\n{}",
            read()
        );
    }
    let mut admin = sqlx::PgConnection::connect(&saga_e2e_tests::admin_db_url())
        .await
        .unwrap();
    // `db` is ours: a fixed prefix and hex digits.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "drop database if exists {db} with (force)"
    )))
    .execute(&mut admin)
    .await
    .unwrap();
}

/// A durable consumer that disappears under a running service (deleted by hand, or lost by the
/// broker) stops the server's heartbeats: the service notices within seconds, creates the
/// consumer again and takes up the commands that waited in the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_deleted_under_a_service_is_created_again_and_the_saga_finishes() {
    let stack = Stack::start().await;
    let js = stack.jetstream().await;
    let commands = js.get_stream("SAGA_CMD").await.unwrap();
    commands.delete_consumer("payment").await.unwrap();
    let fig = product("fig");
    stack.set_stock(&fig, 5).await;
    let id = stack.create_order("ivy", &[(&fig, 1, 100)]).await;
    let order = stack.wait_terminal(&id).await;
    assert_eq!(order["status"], "shipped", "{order}");
    let renewed = stack.metrics("payment").await;
    let renewed = renewed
        .get(r#"consumer_pulls_renewed_total{consumer="payment"}"#)
        .copied()
        .unwrap_or_default();
    assert!(renewed >= 1.0, "payment pulled anew {renewed} times");
}
