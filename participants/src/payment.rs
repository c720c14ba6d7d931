//! Payment: charges with probability `PAYMENT_SUCCESS_RATE`, refunds once. A decision is stored
//! per order and repeated on redelivery: a re-sent charge never flips and never charges twice.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use saga_shared_events::auth::{Authorized, Read};
use saga_shared_events::consumer::HandlerError;
use saga_shared_events::contract::{Body, ChargePayment, Charged, OrderRef, Participant, Refusal};
use saga_shared_events::http::Problem;

use saga_shared_events::outbox::OutgoingMessage;

use crate::common::{
    AtOnce, Chaos, Decide, answers, chance, claim_at_once_sql, internal, with_earlier,
    wrong_command,
};

/// Migrations of the payment database.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/payment");

/// Payment's decisions.
pub struct Payment;

impl Decide for Payment {
    const PARTICIPANT: Participant = Participant::Payment;

    /// Charges first, then refunds (a valid order for commands of different orders): one claim
    /// statement per kind, one read of earlier decisions when there are any.
    async fn decide(
        &self,
        conn: &mut PgConnection,
        commands: &[&Body],
        chaos: &Chaos,
    ) -> Result<Vec<Result<Body, HandlerError>>, HandlerError> {
        let mut out: Vec<Option<Result<Body, HandlerError>>> =
            commands.iter().map(|_| None).collect();
        let mut charges: Vec<(usize, &ChargePayment)> = Vec::new();
        let mut refunds: Vec<(usize, Uuid)> = Vec::new();
        for (i, c) in commands.iter().enumerate() {
            match c {
                Body::ChargePayment(c) if c.amount_cents < 0 => {
                    out[i] = Some(Err(HandlerError::Permanent("negative amount".into())))
                }
                Body::ChargePayment(c) => charges.push((i, c)),
                Body::RefundPayment(r) => refunds.push((i, r.order_id)),
                other => out[i] = Some(Err(wrong_command(Self::PARTICIPANT, other))),
            }
        }
        charge(conn, &charges, chaos.success_rate.unwrap_or(1.0), &mut out).await?;
        refund(conn, &refunds, &mut out).await?;
        Ok(answers(out))
    }

    /// A batch of charges only: each first charge's reply is the decision drawn here. (A
    /// refund's reply depends on what is stored.)
    async fn decide_at_once(
        &self,
        conn: &mut PgConnection,
        commands: &[&Body],
        chaos: &Chaos,
        at_once: &AtOnce<'_>,
    ) -> Option<Result<Vec<OutgoingMessage>, sqlx::Error>> {
        let charges: Vec<&ChargePayment> = commands
            .iter()
            .map(|c| match c {
                Body::ChargePayment(c) if c.amount_cents >= 0 => Some(c),
                _ => None,
            })
            .collect::<Option<_>>()?;
        let plan = ChargePlan::draw(&charges, chaos.success_rate.unwrap_or(1.0));
        let replies = charges
            .iter()
            .zip(&plan.statuses)
            .zip(&plan.reasons)
            .map(|((c, status), reason)| {
                charge_reply(
                    c.order_id,
                    status,
                    c.amount_cents,
                    reason.map(str::to_owned),
                )
            })
            .collect();
        let query = sqlx::query_as(sqlx::AssertSqlSafe(CHARGE_AT_ONCE_SQL.as_str()));
        let (query, statuses) = (plan.bind(query), &plan.statuses);
        Some(
            at_once
                .write(conn, query, replies, "payments_total", statuses)
                .await,
        )
    }
}

/// The decisions drawn for a batch of charges, as the columns of their rows.
struct ChargePlan<'a> {
    ids: Vec<Uuid>,
    statuses: Vec<&'static str>,
    amounts: Vec<i64>,
    customers: Vec<&'a str>,
    reasons: Vec<Option<&'static str>>,
}

impl<'a> ChargePlan<'a> {
    /// Approves each charge with probability `success_rate`.
    fn draw(charges: &[&'a ChargePayment], success_rate: f64) -> Self {
        let mut plan = ChargePlan {
            ids: Vec::with_capacity(charges.len()),
            statuses: Vec::with_capacity(charges.len()),
            amounts: Vec::with_capacity(charges.len()),
            customers: Vec::with_capacity(charges.len()),
            reasons: Vec::with_capacity(charges.len()),
        };
        for c in charges {
            let approve = chance(success_rate);
            plan.ids.push(c.order_id);
            plan.statuses
                .push(if approve { "charged" } else { "declined" });
            plan.amounts.push(c.amount_cents);
            plan.customers.push(c.customer_id.as_str());
            plan.reasons
                .push((!approve).then_some("card declined by issuer"));
        }
        plan
    }

    /// Binds the five columns of [`CLAIM_SQL`], as `$1` to `$5`.
    fn bind<'q, O>(
        &'q self,
        query: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
        query
            .bind(&self.ids)
            .bind(&self.statuses)
            .bind(&self.amounts)
            .bind(&self.customers)
            .bind(&self.reasons)
    }
}

/// Claims the decision of every order not decided before.
const CLAIM_SQL: &str = "insert into payment (order_id, status, amount_cents, customer_id, reason) \
     select * from unnest($1::uuid[], $2::text[], $3::int8[], $4::text[], $5::text[]) \
     on conflict do nothing returning order_id, status, amount_cents, reason";

/// The claims, inbox entries and outbox row of a batch of first charges, in one statement.
static CHARGE_AT_ONCE_SQL: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| claim_at_once_sql(CLAIM_SQL, 5));

type Decision = (Uuid, String, i64, Option<String>);

async fn charge(
    conn: &mut PgConnection,
    charges: &[(usize, &ChargePayment)],
    success_rate: f64,
    out: &mut [Option<Result<Body, HandlerError>>],
) -> Result<(), HandlerError> {
    if charges.is_empty() {
        return Ok(());
    }
    let commands: Vec<&ChargePayment> = charges.iter().map(|(_, c)| *c).collect();
    let plan = ChargePlan::draw(&commands, success_rate);
    // Orders decided before answer what is stored.
    let claimed: Vec<Decision> = plan
        .bind(sqlx::query_as(CLAIM_SQL))
        .fetch_all(&mut *conn)
        .await?;
    for (_, status, _, _) in &claimed {
        metrics::counter!("payments_total", "result" => status.clone()).increment(1);
    }
    let decided = with_earlier(
        conn,
        &plan.ids,
        claimed,
        |d| d.0,
        "select order_id, status, amount_cents, reason from payment where order_id = any($1)",
    )
    .await?;
    for (i, c) in charges {
        out[*i] = Some(match decided.get(&c.order_id) {
            Some((id, status, amount, reason)) => {
                Ok(charge_reply(*id, status, *amount, reason.clone()))
            }
            None => Err(HandlerError::Transient("payment decision vanished".into())),
        });
    }
    Ok(())
}

/// The reply a stored charge decision gives, every time it is asked.
fn charge_reply(order_id: Uuid, status: &str, amount_cents: i64, reason: Option<String>) -> Body {
    match status {
        "charged" | "refunded" => Body::PaymentCharged(Charged {
            order_id,
            amount_cents,
        }),
        _ => Body::PaymentDeclined(Refusal {
            order_id,
            reason: reason.unwrap_or_else(|| "declined".into()),
        }),
    }
}

async fn refund(
    conn: &mut PgConnection,
    refunds: &[(usize, Uuid)],
    out: &mut [Option<Result<Body, HandlerError>>],
) -> Result<(), HandlerError> {
    if refunds.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = refunds.iter().map(|(_, id)| *id).collect();
    // A refund before any charge voids the order's payment, so the late charge is declined.
    let voided: Vec<Uuid> = sqlx::query_scalar(
        "insert into payment (order_id, status, amount_cents, customer_id, reason) \
         select id, 'voided', 0, '', 'order was cancelled before the charge' \
         from unnest($1::uuid[]) as id on conflict do nothing returning order_id",
    )
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    // A separate statement: its snapshot sees a charge committed while the insert waited on it.
    let mut refunded = 0;
    if voided.len() < ids.len() {
        refunded = sqlx::query(
            "update payment set status = 'refunded', updated_at = now() \
             where order_id = any($1) and status = 'charged'",
        )
        .bind(&ids)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    }
    if refunded > 0 {
        metrics::counter!("payments_total", "result" => "refunded").increment(refunded);
    }
    for (i, order_id) in refunds {
        out[*i] = Some(Ok(Body::PaymentRefunded(OrderRef {
            order_id: *order_id,
        })));
    }
    Ok(())
}

/// A payment as the API shows it.
#[derive(Debug, Serialize)]
pub struct PaymentView {
    order_id: Uuid,
    /// `charged`, `declined` or `refunded` (a voided payment shows as `declined`).
    status: String,
    amount_cents: i64,
}

/// `GET /payments/{order_id}`.
pub fn router(pool: PgPool) -> Router {
    Router::new()
        .route("/payments/{order_id}", get(get_payment))
        .with_state(pool)
}

async fn get_payment(
    _auth: Authorized<Read>,
    State(pool): State<PgPool>,
    Path(id): Path<String>,
) -> Result<Json<PaymentView>, Problem> {
    let not_found = || Problem::not_found(format!("no payment for order {id:?}"));
    let order_id = Uuid::parse_str(&id).map_err(|_| not_found())?;
    let row: Option<(String, i64)> =
        sqlx::query_as("select status, amount_cents from payment where order_id = $1")
            .bind(order_id)
            .fetch_optional(&pool)
            .await
            .map_err(internal)?;
    let (status, amount_cents) = row.ok_or_else(not_found)?;
    let status = if status == "voided" {
        "declined".into()
    } else {
        status
    };
    Ok(Json(PaymentView {
        order_id,
        status,
        amount_cents,
    }))
}
