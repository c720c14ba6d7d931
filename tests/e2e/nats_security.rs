//! NATS least privilege: the services run a saga logged in as their own users with the
//! deployment's permissions (deploy/nats/accounts.conf), and a participant cannot speak for
//! another or read another's commands.

use std::time::Duration;

use saga_e2e_tests::{Stack, StackOptions, product};

/// Connects as `user`, collecting the server's error messages.
async fn login(
    stack: &Stack,
    user: &str,
) -> (
    async_nats::Client,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::new()
        .user_and_password(user.into(), stack.nats_passwords[user].clone())
        .custom_inbox_prefix(format!("_INBOX_{user}"))
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    let _ = tx.send(e.to_string());
                }
            }
        })
        .connect(stack.nats[0].url())
        .await
        .unwrap();
    (client, rx)
}

async fn expect_violation(
    errors: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    subject: &str,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let e = tokio::time::timeout(left, errors.recv())
            .await
            .unwrap_or_else(|_| panic!("no permissions violation for {subject}"))
            .unwrap();
        if e.to_lowercase().contains("permissions violation") && e.contains(subject) {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_runs_with_least_privilege_and_cannot_speak_for_another() {
    let opts = StackOptions {
        nats_secured: true,
        ..Default::default()
    };
    let stack = Stack::start_with(opts).await;
    let pen = product("pen");
    stack.set_stock(&pen, 3).await;
    let id = stack.create_order("max", &[(&pen, 1, 150)]).await;
    assert_eq!(stack.wait_terminal(&id).await["status"], "shipped");

    let (payment, mut errors) = login(&stack, "payment").await;
    let js = async_nats::jetstream::new(payment.clone());

    // Its own replies: allowed.
    let ack = js
        .publish("saga.reply.payment.refunded.v1", "{}".into())
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(5), ack)
            .await
            .unwrap()
            .is_ok()
    );

    // Another participant's reply: refused, never stored.
    let forged = "saga.reply.inventory.reserved.v1";
    let ack = js.publish(forged, "{}".into()).await.unwrap();
    let acked = tokio::time::timeout(Duration::from_secs(3), ack).await;
    assert!(
        !matches!(acked, Ok(Ok(_))),
        "payment published an inventory reply"
    );
    expect_violation(&mut errors, forged).await;

    // Another participant's commands: neither subscribed to nor pulled from its consumer.
    let _sub = payment.subscribe("saga.cmd.inventory.>").await.unwrap();
    expect_violation(&mut errors, "saga.cmd.inventory.>").await;
    let _spy = payment.subscribe("_INBOX_inventory.>").await.unwrap();
    expect_violation(&mut errors, "_INBOX_inventory.>").await;
    let pull = "$JS.API.CONSUMER.MSG.NEXT.SAGA_CMD.inventory";
    let _ = payment.publish(pull, "1".into()).await;
    expect_violation(&mut errors, pull).await;

    // Its own consumer is reachable; the inventory one is not.
    let cmd = js.get_stream("SAGA_CMD").await.unwrap();
    let own: Result<async_nats::jetstream::consumer::PullConsumer, _> =
        cmd.get_consumer("payment").await;
    assert!(own.is_ok());
    // A denied request gets no answer: it fails or times out, it never succeeds.
    let other: Result<Result<async_nats::jetstream::consumer::PullConsumer, _>, _> =
        tokio::time::timeout(Duration::from_secs(8), cmd.get_consumer("inventory")).await;
    assert!(
        !matches!(other, Ok(Ok(_))),
        "payment read inventory's consumer"
    );
    expect_violation(&mut errors, "$JS.API.CONSUMER.INFO.SAGA_CMD.inventory").await;
}
