//! Tracing set-up shared by every service: `RUST_LOG` filtering, `LOG_FORMAT=json|pretty`, W3C
//! propagation, and OTLP trace export when `OTEL_EXPORTER_OTLP_ENDPOINT` is set
//! (`OTEL_EXPORTER_OTLP_PROTOCOL` `grpc` or `http/protobuf`).
//!
//! Spans always get trace ids (so ids propagate and appear in logs and the API); they are only
//! exported when an endpoint is configured. Export is batched on a background thread: a collector
//! that is down or slow drops spans (counted in `otel_spans_dropped_total`), never blocks a saga.

use std::time::Duration;

use opentelemetry::global;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

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
    if env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
        || env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
    {
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
    let otel_filter = EnvFilter::new(
        "info,h2=off,hyper=off,hyper_util=off,tonic=off,tower=off,reqwest=off,opentelemetry=off,opentelemetry_sdk=off",
    );
    // The layer's defaults cost every message: code location and thread attributes on each span
    // (the thread name allocated each time), busy/idle timings read on every poll of an
    // instrumented future, and the span's context attached to the thread on every poll, which
    // starts the OpenTelemetry span early. Nothing here reads `Context::current()`: propagation
    // takes a span's context explicitly.
    let otel_layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(service))
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_context_activation(false)
        .with_filter(otel_filter);
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
    tracing_subscriber::registry()
        .with(fmt_layer)
        .with(otel_layer)
        .try_init()
        .map_err(|e| TelemetryError::Subscriber(e.to_string()))?;
    Ok(TelemetryGuard { provider })
}

/// Records the span's trace id in its `trace_id` field, so log lines carry it.
pub fn record_trace_id(span: &tracing::Span) {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.record("trace_id", tracing::field::display(sc.trace_id()));
    }
}
