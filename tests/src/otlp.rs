//! An OTLP trace receiver inside the test process: gRPC (`TraceService`) and HTTP/protobuf
//! (`POST /v1/traces`), collecting every span it is sent.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;

/// One received span, flattened.
#[derive(Debug, Clone)]
pub struct Span {
    /// `service.name` of its resource.
    pub service: String,
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    /// Span name.
    pub name: String,
    /// OTLP span kind (2 server, 4 producer, 5 consumer).
    pub kind: i32,
    /// Start, in Unix nanoseconds.
    pub start: u64,
    /// String form of every attribute.
    pub attributes: BTreeMap<String, String>,
    /// OTLP status code (2 = error).
    pub status_code: i32,
    /// Status message.
    pub status_message: String,
}

/// The collected spans.
#[derive(Clone, Default)]
pub struct Collected(Arc<Mutex<Vec<Span>>>);

impl Collected {
    /// A copy of everything received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.0.lock().unwrap().clone()
    }

    fn add(&self, req: ExportTraceServiceRequest) {
        let mut out = self.0.lock().unwrap();
        for rs in req.resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| attr(&r.attributes, "service.name"))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    let attributes = s
                        .attributes
                        .iter()
                        .filter_map(|kv| value(kv).map(|v| (kv.key.clone(), v)))
                        .collect();
                    let status = s.status.clone().unwrap_or_default();
                    out.push(Span {
                        service: service.clone(),
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent_span_id: hex(&s.parent_span_id),
                        name: s.name.clone(),
                        kind: s.kind,
                        start: s.start_time_unix_nano,
                        attributes,
                        status_code: status.code,
                        status_message: status.message,
                    });
                }
            }
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn value(kv: &KeyValue) -> Option<String> {
    match kv.value.as_ref()?.value.as_ref()? {
        AnyValue::StringValue(s) => Some(s.clone()),
        AnyValue::IntValue(i) => Some(i.to_string()),
        AnyValue::BoolValue(b) => Some(b.to_string()),
        AnyValue::DoubleValue(d) => Some(d.to_string()),
        _ => None,
    }
}

fn attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    attrs.iter().find(|kv| kv.key == key).and_then(value)
}

struct Grpc(Collected);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.add(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// A running receiver.
pub struct Receiver {
    /// What it received.
    pub collected: Collected,
    /// gRPC port (4317-style).
    pub grpc_port: u16,
    /// HTTP port (4318-style).
    pub http_port: u16,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Receiver {
    /// Starts both endpoints on free ports.
    pub async fn start() -> Self {
        let collected = Collected::default();
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc_port = grpc.local_addr().unwrap().port();
        let incoming = tonic::transport::server::TcpIncoming::from(grpc);
        let svc = TraceServiceServer::new(Grpc(collected.clone()));
        let grpc_task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(incoming)
                .await;
        });
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http_port = http.local_addr().unwrap().port();
        let c = collected.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let c = c.clone();
                async move {
                    match ExportTraceServiceRequest::decode(body) {
                        Ok(req) => {
                            c.add(req);
                            (
                                axum::http::StatusCode::OK,
                                [("content-type", "application/x-protobuf")],
                                ExportTraceServiceResponse::default().encode_to_vec(),
                            )
                        }
                        Err(_) => (
                            axum::http::StatusCode::BAD_REQUEST,
                            [("content-type", "text/plain")],
                            b"bad protobuf".to_vec(),
                        ),
                    }
                }
            }),
        );
        let http_task = tokio::spawn(async move {
            let _ = axum::serve(http, app).await;
        });
        Receiver {
            collected,
            grpc_port,
            http_port,
            tasks: vec![grpc_task, http_task],
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
