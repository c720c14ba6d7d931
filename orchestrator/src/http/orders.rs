//! `/orders`: create, read, list, cancel and retry orders.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use saga_shared_events::auth::{Admin, Authorized, Read, Write};
use saga_shared_events::http::{ApiJson, FieldError, Problem};

use super::AppState;
use super::error::ApiError;
use crate::saga::store::{Created, Item, NewOrder, OrderView};

/// A saga status (documentation of the `status` filter).
#[derive(utoipa::ToSchema)]
#[allow(dead_code, non_camel_case_types)]
pub enum OrderStatus {
    /// Waiting for inventory.
    created,
    /// Waiting for payment.
    inventory_reserved,
    /// Waiting for shipping.
    paid,
    /// Done.
    shipped,
    /// Compensating: refund.
    refunding_payment,
    /// Compensating: release.
    releasing_inventory,
    /// Compensated.
    cancelled,
    /// Compensation gave up; see `POST /orders/{id}/retry`.
    failed,
}

/// Statuses a list may filter on.
pub const STATUSES: [&str; 8] = [
    "created",
    "inventory_reserved",
    "paid",
    "shipped",
    "refunding_payment",
    "releasing_inventory",
    "cancelled",
    "failed",
];

/// The OpenAPI document of the orchestrator.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "Order saga orchestrator", description = "Create orders and follow their sagas."),
    paths(create_order, get_order, list_orders, cancel_order, retry_order),
    components(schemas(CreateOrderRequest, ItemRequest, OrderView, OrderPage, Item, crate::saga::store::Transition, Problem, FieldError, OrderStatus)),
    modifiers(&BearerAuth),
    tags((name = "orders", description = "Orders and their sagas"))
)]
pub struct ApiDoc;

/// The problem responses every endpoint documents: no or a bad token, a missing scope, overload.
struct EveryEndpoint;

impl utoipa::IntoResponses for EveryEndpoint {
    fn responses() -> ResponseMap {
        problems(&[
            (401, "Missing or invalid bearer token"),
            (403, "The token lacks the scope"),
            (
                503,
                "Saturated, timed out or database unavailable; see Retry-After",
            ),
        ])
    }
}

/// The problem responses of an action on an order (cancel, retry).
struct OrderAction;

impl utoipa::IntoResponses for OrderAction {
    fn responses() -> ResponseMap {
        problems(&[
            (404, "No such order"),
            (409, "Not possible in the order's state"),
        ])
    }
}

type ResponseMap =
    std::collections::BTreeMap<String, utoipa::openapi::RefOr<utoipa::openapi::response::Response>>;

/// `application/problem+json` responses with a [`Problem`] body.
fn problems(list: &[(u16, &str)]) -> ResponseMap {
    use utoipa::openapi::{Content, Ref, response::ResponseBuilder};
    list.iter()
        .map(|(status, description)| {
            let response = ResponseBuilder::new()
                .description(*description)
                .content(
                    "application/problem+json",
                    Content::new(Some(Ref::from_schema_name("Problem"))),
                )
                .build();
            (status.to_string(), response.into())
        })
        .collect()
}

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        if let Some(c) = openapi.components.as_mut() {
            c.add_security_scheme(
                "bearer",
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .bearer_format("JWT")
                        .build(),
                ),
            );
        }
    }
}

/// Routes under `/orders`.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/orders", post(create_order).get(list_orders))
        .route("/orders/{id}", get(get_order))
        .route("/orders/{id}/cancel", post(cancel_order))
        .route("/orders/{id}/retry", post(retry_order))
}

/// The body of `POST /orders`. Unknown fields are refused.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOrderRequest {
    /// 1 to 64 characters.
    #[schema(min_length = 1, max_length = 64)]
    customer_id: String,
    /// 1 to 100 lines.
    #[schema(min_items = 1, max_items = 100)]
    items: Vec<ItemRequest>,
}

/// One line of a new order.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ItemRequest {
    /// 1 to 64 characters.
    #[schema(min_length = 1, max_length = 64)]
    product_id: String,
    /// 1 to 1000.
    #[schema(minimum = 1, maximum = 1000)]
    quantity: i64,
    /// Price per unit in minor units, 0 to 1,000,000,000.
    #[schema(minimum = 0, maximum = 1_000_000_000)]
    unit_price_cents: i64,
}

impl CreateOrderRequest {
    /// Checks every field and reports every violation at once.
    pub fn validate(self) -> Result<NewOrder, Problem> {
        let mut errors = Vec::new();
        check_id(&mut errors, "customer_id", &self.customer_id);
        if self.items.is_empty() || self.items.len() > 100 {
            errors.push(FieldError::new("items", "must hold 1 to 100 items"));
        }
        for (i, item) in self.items.iter().enumerate() {
            check_id(
                &mut errors,
                &format!("items[{i}].product_id"),
                &item.product_id,
            );
            if !(1..=1000).contains(&item.quantity) {
                errors.push(FieldError::new(
                    format!("items[{i}].quantity"),
                    "must be 1 to 1000",
                ));
            }
            if !(0..=1_000_000_000).contains(&item.unit_price_cents) {
                errors.push(FieldError::new(
                    format!("items[{i}].unit_price_cents"),
                    "must be 0 to 1000000000",
                ));
            }
        }
        if !errors.is_empty() {
            return Err(Problem::invalid(errors));
        }
        Ok(NewOrder {
            customer_id: self.customer_id,
            items: self
                .items
                .into_iter()
                .map(|i| Item {
                    product_id: i.product_id,
                    quantity: i.quantity,
                    unit_price_cents: i.unit_price_cents,
                })
                .collect(),
        })
    }
}

fn check_id(errors: &mut Vec<FieldError>, field: &str, value: &str) {
    let len = value.chars().count();
    if !(1..=64).contains(&len) {
        errors.push(FieldError::new(field, "must be 1 to 64 characters"));
    } else if value.chars().any(char::is_control) {
        errors.push(FieldError::new(
            field,
            "must not contain control characters",
        ));
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match v.to_str() {
        Ok(s) if (1..=255).contains(&s.len()) => Ok(Some(s.to_owned())),
        _ => Err(Problem::invalid(vec![FieldError::new(
            "Idempotency-Key",
            "must be 1 to 255 visible ASCII characters",
        )])),
    }
}

/// Accepts an order and starts its saga.
#[utoipa::path(post, path = "/orders", tag = "orders",
    request_body(content = CreateOrderRequest, content_type = "application/json"),
    params(("Idempotency-Key" = Option<String>, Header, description = "Repeat-safe key: the same key and body return the same order")),
    responses(
        (status = 202, description = "Accepted; the saga runs", body = OrderView, headers(("Location" = String, description = "/orders/{id}"))),
        (status = 200, description = "The order created earlier with this Idempotency-Key", body = OrderView),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over 64 KiB", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields, each named", body = Problem, content_type = "application/problem+json"),
        EveryEndpoint,
    ),
    security(("bearer" = ["orders:write"])))]
#[tracing::instrument(name = "create order", skip_all, fields(saga_id = tracing::field::Empty))]
async fn create_order(
    _auth: Authorized<Write>,
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CreateOrderRequest>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let order = body.validate()?;
    let created = state.store.create(&order, key.as_deref()).await?;
    let (status, view) = match created {
        Created::New(v) => (StatusCode::ACCEPTED, v),
        Created::Replayed(v) => (StatusCode::OK, v),
    };
    tracing::Span::current().record("saga_id", tracing::field::display(view.id));
    let location = format!("/orders/{}", view.id);
    let mut res = (status, Json(view)).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        res.headers_mut().insert(header::LOCATION, v);
    }
    Ok(res)
}

fn parse_id(id: &str) -> Result<Uuid, Problem> {
    Uuid::parse_str(id).map_err(|_| Problem::not_found(format!("order {id:?} not found")))
}

/// One order with its history.
#[utoipa::path(get, path = "/orders/{id}", tag = "orders",
    params(("id" = String, Path, description = "Order id")),
    responses(
        (status = 200, description = "The order", body = OrderView),
        (status = 404, description = "No such order", body = Problem, content_type = "application/problem+json"),
        EveryEndpoint,
    ),
    security(("bearer" = ["orders:read"])))]
async fn get_order(
    _auth: Authorized<Read>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<OrderView>, ApiError> {
    let id = parse_id(&id)?;
    Ok(Json(state.store.get(id).await?))
}

/// Query of `GET /orders`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    status: Option<String>,
    limit: Option<String>,
    after: Option<String>,
}

/// A page of orders.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct OrderPage {
    /// Newest first.
    orders: Vec<OrderView>,
    /// Cursor for the next page (`after=`), absent on the last page.
    next: Option<String>,
}

/// A page of orders, newest first.
#[utoipa::path(get, path = "/orders", tag = "orders",
    params(
        ("status" = Option<OrderStatus>, Query, description = "Only orders in this status"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 500, description = "1 to 500, default 50"),
        ("after" = Option<uuid::Uuid>, Query, description = "Cursor: `next` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page", body = OrderPage),
        (status = 422, description = "Invalid query parameters, each named", body = Problem, content_type = "application/problem+json"),
        EveryEndpoint,
    ),
    security(("bearer" = ["orders:read"])))]
async fn list_orders(
    _auth: Authorized<Read>,
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<OrderPage>, ApiError> {
    let Query(q) =
        query.map_err(|e| Problem::invalid(vec![FieldError::new("query", e.body_text())]))?;
    let mut errors = Vec::new();
    if let Some(s) = &q.status
        && !STATUSES.contains(&s.as_str())
    {
        errors.push(FieldError::new(
            "status",
            format!("must be one of {}", STATUSES.join(", ")),
        ));
    }
    let limit = match q.limit.as_deref().map(str::parse::<i64>) {
        None => 50,
        Some(Ok(n)) if (1..=500).contains(&n) => n,
        Some(_) => {
            errors.push(FieldError::new("limit", "must be 1 to 500"));
            50
        }
    };
    let after = match q.after.as_deref().map(Uuid::parse_str) {
        None => None,
        Some(Ok(id)) => Some(id),
        Some(Err(_)) => {
            errors.push(FieldError::new(
                "after",
                "must be a cursor from a previous page",
            ));
            None
        }
    };
    if !errors.is_empty() {
        return Err(Problem::invalid(errors).into());
    }
    let orders = state.store.list(q.status.as_deref(), limit, after).await?;
    let next = (orders.len() as i64 == limit)
        .then(|| orders.last().map(|o| o.id.to_string()))
        .flatten();
    Ok(Json(OrderPage { orders, next }))
}

/// Starts compensation of an order not yet shipped.
#[utoipa::path(post, path = "/orders/{id}/cancel", tag = "orders",
    params(("id" = String, Path, description = "Order id")),
    responses(
        (status = 202, description = "Accepted", body = OrderView),
        OrderAction,
        EveryEndpoint,
    ),
    security(("bearer" = ["orders:admin"])))]
async fn cancel_order(
    _auth: Authorized<Admin>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    state.store.cancel(id).await?;
    Ok((StatusCode::ACCEPTED, Json(state.store.get(id).await?)).into_response())
}

/// Resumes a failed saga where it stopped.
#[utoipa::path(post, path = "/orders/{id}/retry", tag = "orders",
    params(("id" = String, Path, description = "Order id")),
    responses(
        (status = 202, description = "Accepted", body = OrderView),
        OrderAction,
        EveryEndpoint,
    ),
    security(("bearer" = ["orders:admin"])))]
async fn retry_order(
    _auth: Authorized<Admin>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    state.store.retry(id).await?;
    Ok((StatusCode::ACCEPTED, Json(state.store.get(id).await?)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_every_offending_field() {
        let req: CreateOrderRequest = serde_json::from_value(serde_json::json!({
            "customer_id": "",
            "items": [
                {"product_id": "ok", "quantity": 0, "unit_price_cents": -1},
                {"product_id": "x".repeat(65), "quantity": 1001, "unit_price_cents": 1_000_000_001i64}
            ]
        }))
        .unwrap();
        let p = req.validate().unwrap_err();
        let fields: Vec<&str> = p.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "customer_id",
                "items[0].quantity",
                "items[0].unit_price_cents",
                "items[1].product_id",
                "items[1].quantity",
                "items[1].unit_price_cents"
            ]
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        let r = serde_json::from_value::<CreateOrderRequest>(serde_json::json!({
            "customer_id": "c", "items": [], "coupon": "FREE"
        }));
        assert!(r.is_err());
    }
}
