//! The API's error type: every failure is a problem+json response; a 500 never exposes its cause.

use axum::response::{IntoResponse, Response};

use saga_shared_events::http::{FieldError, Problem};

use crate::saga::store::StoreError;

/// Errors of the orchestrator API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A problem to return as is (400, 404, 409, 413, 415, 422).
    #[error("{0:?}")]
    Problem(Problem),
    /// From the saga store.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<Problem> for ApiError {
    fn from(p: Problem) -> Self {
        ApiError::Problem(p)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::Problem(p) => p.into_response(),
            ApiError::Store(StoreError::NotFound(id)) => {
                Problem::not_found(format!("order {id} not found")).into_response()
            }
            ApiError::Store(StoreError::Conflict(why)) => Problem::conflict(why).into_response(),
            ApiError::Store(StoreError::IdempotencyMismatch) => {
                Problem::invalid(vec![FieldError::new(
                    "Idempotency-Key",
                    "this key was already used with a different request body",
                )])
                .into_response()
            }
            // The database is down or saturated: a retry will do.
            ApiError::Store(StoreError::Db(e))
                if matches!(e, sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed)
                    || saga_shared_events::db::is_connection_lost(&e) =>
            {
                tracing::warn!(error = %e, "database unavailable");
                Problem::unavailable("database temporarily unavailable", 1).into_response()
            }
            ApiError::Store(e) => {
                tracing::error!(error.cause_chain = ?e, "request failed");
                Problem::internal().into_response()
            }
        }
    }
}
