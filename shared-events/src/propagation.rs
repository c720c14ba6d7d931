//! W3C trace context over NATS headers and in outbox rows.
//!
//! The context of an outgoing message is captured when its outbox row is written, so a trace
//! survives a crash between commit and publish.

use std::collections::{BTreeMap, HashMap};

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::{Context, global};

/// Writes propagation fields into NATS headers.
pub struct NatsInjector<'a>(pub &'a mut HeaderMap);

impl Injector for NatsInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

/// Reads propagation fields from NATS headers.
pub struct NatsExtractor<'a>(pub &'a HeaderMap);

impl Extractor for NatsExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

/// The trace context of the current span as `traceparent`/`tracestate` pairs.
pub fn current_context_fields() -> BTreeMap<String, String> {
    context_fields(&crate::telemetry::context(&tracing::Span::current()))
}

/// The propagation fields of a context.
pub fn context_fields(cx: &Context) -> BTreeMap<String, String> {
    let mut fields = HashMap::new();
    global::get_text_map_propagator(|p| p.inject_context(cx, &mut fields));
    fields.into_iter().collect()
}

/// Rebuilds a context from stored propagation fields.
pub fn context_from_fields(fields: &BTreeMap<String, String>) -> Context {
    let fields: HashMap<String, String> = fields.clone().into_iter().collect();
    global::get_text_map_propagator(|p| p.extract(&fields))
}

/// The context carried by a message's headers (empty when none).
pub fn context_from_headers(headers: Option<&HeaderMap>) -> Context {
    match headers {
        Some(h) => global::get_text_map_propagator(|p| p.extract(&NatsExtractor(h))),
        None => Context::new(),
    }
}
