//! Tracing set-up shared by every service: `RUST_LOG` filtering, `LOG_FORMAT=json|pretty`, W3C
//! propagation, and OTLP trace export when `OTEL_EXPORTER_OTLP_ENDPOINT` is set
//! (`OTEL_EXPORTER_OTLP_PROTOCOL` `grpc` or `http/protobuf`).
//!
//! Spans always get trace ids (so ids propagate and appear in logs and the API); they are only
//! exported when an endpoint is configured. Export is batched on a background thread: a collector
//! that is down or slow drops spans (counted in `otel_spans_dropped_total`), never blocks a saga.
//! Without an endpoint no OpenTelemetry span is built at all: each span keeps only its trace id
//! and span id ([`IdLayer`]), which is all propagation needs; with one, neither is the part of a
//! trace the sampler would drop, which a consumer starts under the [`UNTRACED`] target. Use
//! [`context`] and [`set_parent`] rather than `OpenTelemetrySpanExt`, so that both ways work.

use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::global;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    IdGenerator, RandomIdGenerator, SdkTracerProvider, SpanData, SpanExporter,
};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Whether OpenTelemetry spans are built (an exporter is configured); set once by [`init`].
static EXPORTING: OnceLock<bool> = OnceLock::new();

/// Whether the configured sampler drops a trace whose caller did not sample it (the parent-based
/// samplers, the default) or drops every trace (`always_off`); set once by [`init`].
static SAMPLER: OnceLock<Following> = OnceLock::new();

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Following {
    /// The SDK decides on each span (`always_on`, `traceidratio`).
    Own,
    /// A span is sampled if its parent is (`parentbased_*`, the default).
    Parent,
    /// Nothing is sampled.
    Nothing,
}

/// The target of a span that starts a part of a trace its caller did not sample: with an
/// exporter, such a span and everything under it get only ids ([`IdLayer`]), like every span
/// without an exporter, instead of OpenTelemetry spans that the sampler would drop at their end.
pub const UNTRACED: &str = "saga::untraced";

/// Whether a span whose remote parent is `parent` would be dropped by the sampler, so that it is
/// better started under the [`UNTRACED`] target (only ever true with an exporter).
pub fn untraced(parent: &opentelemetry::Context) -> bool {
    if !exporting() {
        return false;
    }
    match SAMPLER.get().copied().unwrap_or(Following::Own) {
        Following::Own => false,
        Following::Nothing => true,
        Following::Parent => {
            let span = parent.span();
            let sc = span.span_context();
            sc.is_valid() && !sc.is_sampled()
        }
    }
}

fn exporting() -> bool {
    EXPORTING.get().copied().unwrap_or(true)
}

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line, with the fields of every enclosing span (`saga_id`, `trace_id`).
    Json,
    /// Human-readable.
    Pretty,
}

/// Telemetry set-up failures.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built.
    #[error("OTEL_EXPORTER_OTLP_ENDPOINT: cannot build the OTLP exporter: {0}")]
    Exporter(String),
    /// `OTEL_EXPORTER_OTLP_PROTOCOL` names a protocol this build does not speak.
    #[error("OTEL_EXPORTER_OTLP_PROTOCOL must be grpc or http/protobuf, got {0:?}")]
    Protocol(String),
    /// A global subscriber was already installed.
    #[error("tracing subscriber already installed: {0}")]
    Subscriber(String),
    /// `OTEL_TRACES_SAMPLER` or its `OTEL_TRACES_SAMPLER_ARG` is not one this build applies.
    #[error("{variable}: {reason}")]
    Sampler {
        /// The variable at fault.
        variable: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// The samplers `OTEL_TRACES_SAMPLER` may name (those the OpenTelemetry SDK applies; it reads
/// the variables itself).
const SAMPLERS: [&str; 6] = [
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
];

/// Checks the standard sampler variables, which the SDK reads on its own and, when they are
/// wrong, replaces with sampling every trace after a warning nobody sees; returns whom the
/// sampler follows.
fn check_sampler(var: impl Fn(&str) -> Option<String>) -> Result<Following, TelemetryError> {
    let Some(sampler) = var("OTEL_TRACES_SAMPLER") else {
        return Ok(Following::Parent);
    };
    if !SAMPLERS.contains(&sampler.as_str()) {
        return Err(TelemetryError::Sampler {
            variable: "OTEL_TRACES_SAMPLER",
            reason: format!("{sampler:?} is not one of {}", SAMPLERS.join(", ")),
        });
    }
    if sampler.ends_with("traceidratio") {
        let arg = var("OTEL_TRACES_SAMPLER_ARG").unwrap_or_default();
        crate::config::parse_rate(&arg).map_err(|reason| TelemetryError::Sampler {
            variable: "OTEL_TRACES_SAMPLER_ARG",
            reason: format!("the share of new traces {sampler} samples: {reason}"),
        })?;
    }
    Ok(match sampler.as_str() {
        "always_off" => Following::Nothing,
        s if s.starts_with("parentbased_") => Following::Parent,
        _ => Following::Own,
    })
}

/// Flushes buffered spans when shut down.
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl TelemetryGuard {
    /// Flushes and stops the exporter (blocking work kept off the async workers).
    pub async fn shutdown(self) {
        let p = self.provider;
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::task::spawn_blocking(move || p.shutdown()),
        )
        .await;
    }
}

/// Counts exported and dropped spans around a real exporter.
#[derive(Debug)]
struct Counting<E>(E);

impl<E: SpanExporter> SpanExporter for Counting<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len() as u64;
        let result = self.0.export(batch).await;
        match &result {
            Ok(()) => metrics::counter!("otel_spans_exported_total").increment(n),
            Err(_) => metrics::counter!("otel_spans_dropped_total").increment(n),
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.0.set_resource(resource)
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|s| !s.trim().is_empty())
}

/// Installs the global subscriber and propagator. Call once, inside the Tokio runtime.
pub fn init(default_service: &str, format: LogFormat) -> Result<TelemetryGuard, TelemetryError> {
    let _ = SAMPLER.set(check_sampler(env)?);
    global::set_text_map_propagator(TraceContextPropagator::new());
    let service = env("OTEL_SERVICE_NAME").unwrap_or_else(|| default_service.to_owned());
    let resource = Resource::builder()
        .with_service_name(service.clone())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    let exporting = env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
        || env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some();
    if exporting {
        let protocol = env("OTEL_EXPORTER_OTLP_PROTOCOL").unwrap_or_else(|| "grpc".into());
        builder = match protocol.as_str() {
            // The endpoint and timeout come from the standard OTEL_EXPORTER_OTLP_* variables.
            "grpc" => builder.with_batch_exporter(Counting(
                opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .build()
                    .map_err(|e| TelemetryError::Exporter(e.to_string()))?,
            )),
            "http/protobuf" => {
                // The blocking HTTP client owns a runtime of its own: build it off Tokio's workers.
                let exporter = std::thread::spawn(|| {
                    opentelemetry_otlp::SpanExporter::builder()
                        .with_http()
                        .build()
                        .map_err(|e| e.to_string())
                })
                .join()
                .map_err(|_| TelemetryError::Exporter("exporter thread panicked".into()))?
                .map_err(TelemetryError::Exporter)?;
                builder.with_batch_exporter(Counting(exporter))
            }
            other => return Err(TelemetryError::Protocol(other.to_owned())),
        };
    }
    let provider = builder.build();
    global::set_tracer_provider(provider.clone());

    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Export every info span of our own, whatever RUST_LOG says, but never the exporter's
    // own transport (which would feed on itself).
    let otel_filter = || {
        EnvFilter::new(
            "info,h2=off,hyper=off,hyper_util=off,tonic=off,tower=off,reqwest=off,opentelemetry=off,opentelemetry_sdk=off",
        )
    };
    // The layer's defaults cost every message: code location and thread attributes on each span
    // (the thread name allocated each time), busy/idle timings read on every poll of an
    // instrumented future, and the span's context attached to the thread on every poll, which
    // starts the OpenTelemetry span early. Nothing here reads `Context::current()`: propagation
    // takes a span's context explicitly.
    let otel_layer = exporting.then(|| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(service))
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_context_activation(false)
            .with_filter(otel_filter().and(Route { untraced: false }))
    });
    // With an exporter, the id layer takes the spans of traces the sampler drops (see `Route`).
    let id_layer = if exporting {
        IdLayer::default()
            .with_filter(otel_filter().and(Route { untraced: true }))
            .boxed()
    } else {
        IdLayer::default().with_filter(otel_filter()).boxed()
    };
    let fmt_layer = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(false)
            .with_span_list(true)
            .with_filter(filter())
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_filter(filter())
            .boxed(),
    };
    let _ = EXPORTING.set(exporting);
    tracing_subscriber::registry()
        .with(fmt_layer)
        .with(otel_layer)
        .with(id_layer)
        .try_init()
        .map_err(|e| TelemetryError::Subscriber(e.to_string()))?;
    Ok(TelemetryGuard { provider })
}

/// A span's place in its trace, when spans are not exported.
#[derive(Debug, Clone, Copy)]
struct SpanIds {
    trace_id: TraceId,
    span_id: SpanId,
    /// The parent's sampling decision, passed on (sampled for a new trace).
    flags: TraceFlags,
}

/// Gives every span a span id, and the trace id and flags of its parent (or a new trace): what
/// an OpenTelemetry span would carry downstream, without the span.
#[derive(Debug, Default)]
struct IdLayer {
    ids: RandomIdGenerator,
}

impl<S> Layer<S> for IdLayer
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let parent = match attrs.parent() {
            Some(p) => ctx.span(p),
            None if attrs.is_contextual() => ctx.lookup_current(),
            None => None,
        };
        let (trace_id, flags) = parent
            .and_then(|p| {
                p.extensions()
                    .get::<SpanIds>()
                    .map(|i| (i.trace_id, i.flags))
            })
            .unwrap_or_else(|| {
                // A new trace is sampled, unless its root is one the sampler drops.
                let flags = if attrs.metadata().target() == UNTRACED {
                    TraceFlags::default()
                } else {
                    TraceFlags::SAMPLED
                };
                (self.ids.new_trace_id(), flags)
            });
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanIds {
                trace_id,
                span_id: self.ids.new_span_id(),
                flags,
            });
        }
    }
}

/// With an exporter, sends each span to the OpenTelemetry layer or to the id layer: a span whose
/// target is [`UNTRACED`] to the id layer, any other span to the layer its current span went to,
/// and a span without a current one to OpenTelemetry. Spans under an untraced one must therefore
/// be created in its scope (contextually), which is how every span here is made.
struct Route {
    /// This filter is the id layer's.
    untraced: bool,
}

impl<S> tracing_subscriber::layer::Filter<S> for Route
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn enabled(
        &self,
        meta: &tracing::Metadata<'_>,
        cx: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        if !meta.is_span() {
            return !self.untraced;
        }
        if meta.target() == UNTRACED {
            return self.untraced;
        }
        match cx.current_span().id() {
            // `cx` sees only the spans this filter let through.
            Some(current) => cx.span(current).is_some(),
            None => !self.untraced,
        }
    }

    fn callsite_enabled(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }

    // No level of its own: combined with the layer's level filter, that one's hint stands
    // (without a hint the combination would have none, and every callsite would be asked).
    fn max_level_hint(&self) -> Option<tracing_subscriber::filter::LevelFilter> {
        Some(tracing_subscriber::filter::LevelFilter::TRACE)
    }
}

/// Runs `f` on the ids [`IdLayer`] gave `span`.
fn with_ids<R>(span: &tracing::Span, f: impl FnOnce(&mut SpanIds) -> R) -> Option<R> {
    span.with_subscriber(|(id, dispatch)| {
        let registry = dispatch.downcast_ref::<tracing_subscriber::Registry>()?;
        let data = registry.span(id)?;
        let mut extensions = data.extensions_mut();
        extensions.get_mut::<SpanIds>().map(f)
    })
    .flatten()
}

/// The trace context of `span`, as propagated to the messages it sends.
pub fn context(span: &tracing::Span) -> opentelemetry::Context {
    match with_ids(span, |i| *i) {
        Some(i) => opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
            i.trace_id,
            i.span_id,
            i.flags,
            false,
            TraceState::default(),
        )),
        None if exporting() => OpenTelemetrySpanExt::context(span),
        None => opentelemetry::Context::new(),
    }
}

/// Makes the (remote) context `parent` the parent of `span`, before it has children.
pub fn set_parent(span: &tracing::Span, parent: opentelemetry::Context) {
    let remote = parent.span().span_context().clone();
    let has_ids = with_ids(span, |i| {
        if remote.is_valid() {
            i.trace_id = remote.trace_id();
            i.flags = remote.trace_flags();
        }
    });
    if has_ids.is_none() && exporting() {
        let _ = OpenTelemetrySpanExt::set_parent(span, parent);
    }
}

/// Names the exported span `span` (its `otel.name` field, declared `Empty`): names are built per
/// message, and without an exporter nothing reads them.
pub fn name_span(span: &tracing::Span, name: impl FnOnce() -> String) {
    if exporting() {
        span.record("otel.name", name().as_str());
    }
}

/// Records the span's trace id in its `trace_id` field, so log lines carry it.
pub fn record_trace_id(span: &tracing::Span) {
    let sc = context(span).span().span_context().clone();
    if sc.is_valid() {
        span.record("trace_id", tracing::field::display(sc.trace_id()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn a_sampler_the_sdk_would_replace_stops_the_service_naming_the_variable() {
        let with = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        assert_eq!(check_sampler(with(&[])).ok(), Some(Following::Parent));
        assert_eq!(
            check_sampler(with(&[("OTEL_TRACES_SAMPLER", "parentbased_always_off")])).ok(),
            Some(Following::Parent)
        );
        assert_eq!(
            check_sampler(with(&[
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.1"),
            ]))
            .ok(),
            Some(Following::Parent)
        );
        assert_eq!(
            check_sampler(with(&[("OTEL_TRACES_SAMPLER", "always_off")])).ok(),
            Some(Following::Nothing)
        );
        assert_eq!(
            check_sampler(with(&[
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.5"),
            ]))
            .ok(),
            Some(Following::Own)
        );
        let unknown = check_sampler(with(&[("OTEL_TRACES_SAMPLER", "parentbased_ratio")]))
            .unwrap_err()
            .to_string();
        assert!(unknown.starts_with("OTEL_TRACES_SAMPLER: "), "{unknown}");
        for arg in [None, Some("ten percent"), Some("1.5")] {
            let mut vars = vec![("OTEL_TRACES_SAMPLER", "traceidratio")];
            vars.extend(arg.map(|a| ("OTEL_TRACES_SAMPLER_ARG", a)));
            let vars: &'static [(&'static str, &'static str)] = vars.leak();
            let e = check_sampler(with(vars)).unwrap_err().to_string();
            assert!(e.starts_with("OTEL_TRACES_SAMPLER_ARG: "), "{arg:?}: {e}");
        }
    }

    #[test]
    fn without_an_exporter_ids_and_the_sampling_decision_pass_from_parent_to_child() {
        global::set_text_map_propagator(TraceContextPropagator::new());
        let _ = EXPORTING.set(false);
        let subscriber = tracing_subscriber::registry().with(IdLayer::default());
        tracing::subscriber::with_default(subscriber, || {
            let incoming = BTreeMap::from([(
                "traceparent".to_owned(),
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00".to_owned(),
            )]);
            let root = tracing::info_span!("root");
            set_parent(&root, crate::propagation::context_from_fields(&incoming));
            let child = root.in_scope(|| tracing::info_span!("child"));
            let explicit = tracing::info_span!(parent: &child, "explicit");
            for span in [&root, &child, &explicit] {
                let fields = crate::propagation::context_fields(&context(span));
                let parts: Vec<String> = fields["traceparent"]
                    .split('-')
                    .map(str::to_owned)
                    .collect();
                assert_eq!(parts[1], "4bf92f3577b34da6a3ce929d0e0e4736");
                assert_ne!(parts[2], "00f067aa0ba902b7", "a span id of its own");
                assert_eq!(parts[3], "00", "not sampled, as the caller decided");
            }
            let fresh = tracing::info_span!(parent: None, "fresh");
            let fields = crate::propagation::context_fields(&context(&fresh));
            assert!(fields["traceparent"].ends_with("-01"), "{fields:?}");
            assert!(!fields["traceparent"].contains("4bf92f3577b34da6a3ce929d0e0e4736"));
        });
    }
}
