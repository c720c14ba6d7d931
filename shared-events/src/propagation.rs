//! W3C trace context over NATS headers and in outbox rows.
//!
//! The context of an outgoing message is captured when its outbox row is written, so a trace
//! survives a crash between commit and publish.

use std::collections::BTreeMap;

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

/// Propagation fields as stored in outbox rows (one message's headers at a time, so written
/// straight into the map, without the `HashMap` the library implements these traits for).
struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Injector for Fields<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct StoredFields<'a>(&'a BTreeMap<String, String>);

impl Extractor for StoredFields<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// The propagation fields of a context.
pub fn context_fields(cx: &Context) -> BTreeMap<String, String> {
    let mut fields = BTreeMap::new();
    global::get_text_map_propagator(|p| p.inject_context(cx, &mut Fields(&mut fields)));
    fields
}

/// Rebuilds a context from stored propagation fields.
pub fn context_from_fields(fields: &BTreeMap<String, String>) -> Context {
    global::get_text_map_propagator(|p| p.extract(&StoredFields(fields)))
}

/// The context carried by a message's headers (empty when none).
pub fn context_from_headers(headers: Option<&HeaderMap>) -> Context {
    match headers {
        Some(h) => global::get_text_map_propagator(|p| p.extract(&NatsExtractor(h))),
        None => Context::new(),
    }
}
