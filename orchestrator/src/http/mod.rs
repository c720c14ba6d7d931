//! The orchestrator's REST API.

pub mod error;
pub mod orders;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::Request;
use tower_http::trace::TraceLayer;

use crate::saga::store::SagaStore;

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    /// The saga store.
    pub store: SagaStore,
}

/// Largest request body accepted (100 items fit in a fraction of this).
pub const BODY_LIMIT: usize = 64 * 1024;

/// The API routes with body limit and request tracing (honouring an incoming `traceparent`).
pub fn api_router(state: AppState) -> Router {
    use utoipa::OpenApi;
    Router::new()
        .merge(orders::router())
        .with_state(state)
        // The document and an interactive page that works offline (assets are vendored).
        .merge(
            utoipa_swagger_ui::SwaggerUi::new("/docs")
                .url("/openapi.json", orders::ApiDoc::openapi()),
        )
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
                let parent = opentelemetry::global::get_text_map_propagator(|p| {
                    p.extract(&opentelemetry_http::HeaderExtractor(req.headers()))
                });
                let route = req
                    .extensions()
                    .get::<axum::extract::MatchedPath>()
                    .map(|p| p.as_str())
                    .unwrap_or_default();
                let span = tracing::info_span!(
                    "http request",
                    otel.name = tracing::field::Empty,
                    otel.kind = "server",
                    http.request.method = %req.method(),
                    http.route = %route,
                    url.path = %req.uri().path(),
                );
                saga_shared_events::telemetry::name_span(&span, || {
                    format!("{} {}", req.method(), route)
                });
                saga_shared_events::telemetry::set_parent(&span, parent);
                span
            }),
        )
}
