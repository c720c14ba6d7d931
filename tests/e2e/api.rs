//! The REST contract: idempotency, listing, and problem+json for every kind of bad input.

use serde_json::json;

use saga_e2e_tests::{Stack, order_body, product};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_replays_the_same_order_and_refuses_a_different_body() {
    let stack = Stack::start().await;
    let nut = product("nut");
    stack.set_stock(&nut, 10).await;
    let body = order_body("frank", &[(&nut, 1, 500)]);

    let (s1, h1, first) = stack.post_order(&body, Some("key-1")).await;
    assert_eq!(s1, 202);
    let id = first["id"].as_str().unwrap();
    assert_eq!(h1["location"], format!("/orders/{id}").as_str());

    let (s2, _, again) = stack.post_order(&body, Some("key-1")).await;
    assert_eq!(s2, 200);
    assert_eq!(again["id"], first["id"]);

    let other = order_body("frank", &[(&nut, 2, 500)]);
    let (s3, h3, problem) = stack.post_order(&other, Some("key-1")).await;
    assert_eq!(s3, 422);
    assert_eq!(h3["content-type"], "application/problem+json");
    assert_eq!(problem["errors"][0]["field"], "Idempotency-Key");

    // Concurrent repeats of one key create one order.
    let results =
        futures_util::future::join_all((0..8).map(|_| stack.post_order(&body, Some("key-2"))))
            .await;
    let ids: std::collections::BTreeSet<String> = results
        .iter()
        .map(|(s, _, o)| {
            assert!(*s == 200 || *s == 202, "{s} {o}");
            o["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(results.iter().filter(|(s, _, _)| *s == 202).count(), 1);

    stack.wait_terminal(id).await;
    stack.wait_terminal(ids.iter().next().unwrap()).await;
    assert_eq!(
        stack.stock(&nut).await,
        (8, 2),
        "each key reserved exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_are_listed_newest_first_by_pages_and_by_status() {
    let stack = Stack::start().await;
    let oat = product("oat");
    stack.set_stock(&oat, 100).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(stack.create_order(&format!("g{i}"), &[(&oat, 1, 1)]).await);
    }
    let rejected = stack.create_order("g9", &[("missing-product", 1, 1)]).await;
    for id in ids.iter().chain([&rejected]) {
        stack.wait_terminal(id).await;
    }

    let (s, page1) = stack.get("orchestrator", "/orders?limit=4").await;
    assert_eq!(s, 200);
    let got: Vec<&str> = page1["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, [rejected.as_str(), &ids[4], &ids[3], &ids[2]]);
    let next = page1["next"].as_str().unwrap();
    let (_, page2) = stack
        .get("orchestrator", &format!("/orders?limit=4&after={next}"))
        .await;
    let got: Vec<&str> = page2["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, [&ids[1], &ids[0]]);
    assert!(page2["next"].is_null());

    let (_, cancelled) = stack.get("orchestrator", "/orders?status=cancelled").await;
    let got: Vec<&str> = cancelled["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, [rejected.as_str()]);

    let (s, problem) = stack
        .get("orchestrator", "/orders?status=lost&limit=0&after=x")
        .await;
    assert_eq!(s, 422);
    let fields: Vec<&str> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["status", "limit", "after"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_of_every_kind_gets_a_problem_and_never_a_500() {
    let stack = Stack::start().await;
    let url = stack.url("orchestrator", "/orders");
    let http = &stack.http;
    let send = |body: String, ctype: &'static str| {
        let req = http.post(&url).header("content-type", ctype).body(body);
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            let ctype = r.headers()["content-type"].to_str().unwrap().to_owned();
            let body: serde_json::Value = r.json().await.unwrap();
            (status, ctype, body)
        }
    };

    let (s, ct, p) = send("{not json".into(), "application/json").await;
    assert_eq!(
        (s, ct.as_str(), &p["status"]),
        (400, "application/problem+json", &json!(400))
    );

    let (s, _, _) = send("{}".into(), "text/plain").await;
    assert_eq!(s, 415);

    // The server answers 413 without reading the whole body and closes the connection; the
    // client must not then reuse that connection for the next request.
    let r = http
        .post(&url)
        .header("content-type", "application/json")
        .header("connection", "close")
        .body(format!("{{\"customer_id\":\"{}\"}}", "x".repeat(200_000)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);

    let (s, _, p) = send(
        r#"{"customer_id":"c","items":[{"product_id":"p","quantity":"two","unit_price_cents":1}]}"#
            .into(),
        "application/json",
    )
    .await;
    assert_eq!(s, 422);
    assert_eq!(p["errors"][0]["field"], "items[0].quantity");

    let (s, _, p) = send(
        r#"{"customer_id":"c","items":[{"product_id":"p","quantity":1,"unit_price_cents":1}],"coupon":"x"}"#.into(),
        "application/json",
    )
    .await;
    assert_eq!(s, 422, "unknown fields are refused: {p}");

    let too_many: Vec<_> = (0..101)
        .map(|_| json!({"product_id": "p", "quantity": 1, "unit_price_cents": 1}))
        .collect();
    let (s, _, p) = send(
        json!({"customer_id": "", "items": too_many}).to_string(),
        "application/json",
    )
    .await;
    assert_eq!(s, 422);
    let fields: Vec<&str> = p["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["customer_id", "items"]);

    let (s, _, p) = send(
        json!({"customer_id": "c", "items": [{"product_id": "p", "quantity": 1001, "unit_price_cents": -5}]}).to_string(),
        "application/json",
    )
    .await;
    assert_eq!(s, 422);
    assert_eq!(p["errors"].as_array().unwrap().len(), 2);

    for path in [
        "/orders/00000000-0000-0000-0000-000000000000",
        "/orders/not-a-uuid",
        "/nothing-here",
    ] {
        let (s, p) = stack.get("orchestrator", path).await;
        assert_eq!((s, &p["status"]), (404, &json!(404)), "{path}");
    }
    let (s, _) = stack
        .post_empty(
            "orchestrator",
            "/orders/00000000-0000-0000-0000-000000000000/cancel",
        )
        .await;
    assert_eq!(s, 404);

    // Participants validate too.
    let r = http
        .put(stack.url("inventory", "/products/x"))
        .json(&json!({"available": -1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 422);
    let (s, _) = stack.get("payment", "/payments/not-an-order").await;
    assert_eq!(s, 404);
    for svc in saga_e2e_tests::SERVICES {
        let (s, _) = stack.get(svc, "/healthz").await;
        assert_eq!(s, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_service_sheds_load_and_times_out_with_503_and_retry_after() {
    let mut opts = saga_e2e_tests::StackOptions::default()
        .with("orchestrator", "HTTP_MAX_IN_FLIGHT", "1")
        .with("orchestrator", "HTTP_REQUEST_TIMEOUT_MS", "3000");
    opts.private_postgres = true;
    let stack = Stack::start_with(opts).await;
    let body = order_body("nia", &[("p", 1, 1)]);
    // With the database gone, a request waits for a connection until the timeout. (The first
    // one may instead fail at once on a kept connection that broke: 503 all the same.)
    stack.postgres.as_ref().unwrap().stop();
    let url = stack.url("orchestrator", "/orders");
    let first = stack.http.post(&url).json(&body).send().await.unwrap();
    assert_eq!(first.status().as_u16(), 503);
    // Two at once: one takes the only slot and waits until the timeout, the other is shed.
    let send = || {
        let req = stack.http.post(&url).json(&body);
        async move {
            let r = req.send().await.unwrap();
            let retry_after = r.headers().get("retry-after").cloned();
            let status = r.status().as_u16();
            let problem: serde_json::Value = r.json().await.unwrap();
            (
                status,
                retry_after,
                problem["detail"].as_str().unwrap_or_default().to_owned(),
            )
        }
    };
    let (a, b) = tokio::join!(send(), send());
    let mut details = Vec::new();
    for (status, retry_after, detail) in [a, b] {
        assert_eq!(status, 503, "{detail}");
        assert!(retry_after.is_some(), "503 carries Retry-After");
        details.push(detail);
    }
    assert!(
        details.iter().any(|d| d.contains("saturated")),
        "{details:?}"
    );
    assert!(
        details.iter().any(|d| d.contains("too long")),
        "{details:?}"
    );
    stack.postgres.as_ref().unwrap().start_again().await;
}
