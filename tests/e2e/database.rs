//! What a service checks in its database at start-up.

use sqlx::{Connection, Executor};
use uuid::Uuid;

use saga_e2e_tests::{admin_db_url, db_url_on};
use saga_shared_events::db::vacuum_gaps;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_where_autovacuum_cannot_reach_the_outbox_or_the_inbox_is_reported() {
    let admin_url = admin_db_url();
    let mut admin = sqlx::PgConnection::connect(&admin_url)
        .await
        .unwrap_or_else(|e| panic!("Postgres is required at {admin_url}: {e}"));
    let name = format!("vacuum_{}", Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("create database \"{name}\"")))
        .execute(&mut admin)
        .await
        .unwrap();
    let mut db = sqlx::PgConnection::connect(&db_url_on(&admin_url, &name))
        .await
        .unwrap();
    db.execute(
        "create table outbox (outbox_id uuid primary key); \
         create table processed_message (message_id uuid primary key) \
           with (autovacuum_enabled = off)",
    )
    .await
    .unwrap();
    let server_on: String = sqlx::query_scalar("show autovacuum")
        .fetch_one(&mut db)
        .await
        .unwrap();

    let gaps = vacuum_gaps(&mut db).await.unwrap();
    let server_gap = gaps
        .iter()
        .any(|g| g.contains("off on this Postgres server"));
    assert_eq!(
        server_gap,
        server_on == "off",
        "{gaps:?} with autovacuum {server_on}"
    );
    assert!(
        gaps.iter().any(|g| g.ends_with("table processed_message")),
        "{gaps:?}"
    );
    assert!(
        !gaps.iter().any(|g| g.ends_with("table outbox")),
        "{gaps:?}"
    );

    db.execute("alter table processed_message reset (autovacuum_enabled); alter table outbox set (autovacuum_enabled = false)")
        .await
        .unwrap();
    let gaps = vacuum_gaps(&mut db).await.unwrap();
    assert!(gaps.iter().any(|g| g.ends_with("table outbox")), "{gaps:?}");
    assert!(
        !gaps.iter().any(|g| g.ends_with("table processed_message")),
        "{gaps:?}"
    );

    db.close().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "drop database \"{name}\" with (force)"
    )))
    .execute(&mut admin)
    .await
    .unwrap();
}
