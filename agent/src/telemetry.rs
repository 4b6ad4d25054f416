//! Logs and traces, initialized once.
//!
//! Logs go to stderr: plain lines without timestamps under journald (which stamps them),
//! text with timestamps on a terminal, JSON with `--log-format json`. Spans always get
//! OpenTelemetry ids (so every job has a trace id to show), and are exported over OTLP only
//! when `[telemetry] otlp_endpoint` or `OTEL_EXPORTER_OTLP_ENDPOINT` is set.

use std::collections::HashMap;
use std::sync::OnceLock;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, OtlpProtocol, TelemetrySection};

/// Flushes and stops the exporter on drop of the agent.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("trace exporter shutdown: {e}");
        }
    }
}

/// Installs the global subscriber and tracer provider. `headers` are the resolved values of
/// `telemetry.otlp_headers`.
pub fn init(
    section: &TelemetrySection,
    headers: &HashMap<String, String>,
    format: Option<LogFormat>,
    env: &HashMap<String, String>,
) -> Result<Telemetry, String> {
    let filter = match env.get("RUST_LOG") {
        Some(f) => EnvFilter::try_new(f).map_err(|e| format!("RUST_LOG: {e}"))?,
        None => EnvFilter::try_new(section.log_filter.as_deref().unwrap_or("info"))
            .map_err(|e| format!("telemetry.log_filter: {e}"))?,
    };
    let provider = provider(section, headers, env)?;
    let tracer = provider.tracer("infraflux-agent");
    let format = format.or(section.log_format).unwrap_or_default();
    let journald = env.contains_key("JOURNAL_STREAM");
    let fmt_layer = match (format, journald) {
        (LogFormat::Json, _) => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
        (LogFormat::Text, true) => tracing_subscriber::fmt::layer()
            .without_time()
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .boxed(),
        (LogFormat::Text, false) => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
    };
    // The log filter quiets logs only: spans are traced at `info` whatever it says, so a quiet
    // `warn` log still gives every job its trace, and its child processes their TRACEPARENT.
    tracing_subscriber::registry()
        .with(fmt_layer.with_filter(filter))
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(LevelFilter::INFO),
        )
        .try_init()
        .map_err(|e| format!("logging already initialized: {e}"))?;
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    opentelemetry::global::set_tracer_provider(provider.clone());
    Ok(Telemetry { provider })
}

fn provider(
    section: &TelemetrySection,
    configured_headers: &HashMap<String, String>,
    env: &HashMap<String, String>,
) -> Result<SdkTracerProvider, String> {
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("infraflux-agent")
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    // The config wins; the standard variables work too, as every OTel SDK honours them. The
    // traces-only endpoint is a full URL; the general one gets the signal's path.
    let endpoint = match (
        &section.otlp_endpoint,
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT"),
    ) {
        (Some(e), _, _) => Some((e.clone(), false)),
        (None, Some(e), _) => Some((e.clone(), true)),
        (None, None, Some(e)) => Some((e.clone(), false)),
        (None, None, None) => None,
    };
    let protocol = match section.otlp_protocol {
        Some(p) => p,
        None => match env.get("OTEL_EXPORTER_OTLP_PROTOCOL").map(String::as_str) {
            None | Some("grpc") => OtlpProtocol::Grpc,
            Some("http/protobuf") => OtlpProtocol::HttpProtobuf,
            Some(other) => {
                return Err(format!(
                    "OTEL_EXPORTER_OTLP_PROTOCOL: {other:?} is not supported; use grpc or http/protobuf"
                ));
            }
        },
    };
    let mut headers = otlp_headers(env);
    headers.extend(configured_headers.clone());
    if let Some((endpoint, signal_specific)) = endpoint {
        let exporter = match protocol {
            OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .with_metadata(grpc_metadata(&headers))
                .build(),
            OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(if signal_specific {
                    endpoint
                } else {
                    format!("{}/v1/traces", endpoint.trim_end_matches('/'))
                })
                .with_headers(headers)
                .build(),
        }
        .map_err(|e| format!("telemetry.otlp_endpoint: {e}"))?;
        builder = builder.with_batch_exporter(exporter);
    }
    Ok(builder.build())
}

/// `OTEL_EXPORTER_OTLP_HEADERS=key=value,key2=value2`
fn otlp_headers(env: &HashMap<String, String>) -> HashMap<String, String> {
    env.get("OTEL_EXPORTER_OTLP_HEADERS")
        .map(|h| {
            h.split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// The same headers as gRPC metadata (an auth token for a hosted collector).
fn grpc_metadata(headers: &HashMap<String, String>) -> tonic::metadata::MetadataMap {
    let mut map = tonic::metadata::MetadataMap::new();
    for (k, v) in headers {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(k.to_ascii_lowercase().as_bytes()),
            v.parse(),
        ) {
            map.insert(key, value);
        }
    }
    map
}

/// For test binaries: logs filtered by `RUST_LOG` (default: warnings), spans with real ids.
pub fn init_for_tests() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
        let provider = SdkTracerProvider::builder().build();
        let tracer = provider.tracer("infraflux-agent-test");
        let _ = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_test_writer()
                    .with_filter(filter),
            )
            .with(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_filter(LevelFilter::INFO),
            )
            .try_init();
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    });
}

/// The W3C `traceparent` of the current span, or of a fresh trace when no span is recording
/// (so that every job has a trace id to show even without a tracing subscriber).
pub fn current_traceparent() -> String {
    let context = tracing::Span::current().context();
    let span = context.span();
    let sc = span.span_context();
    if sc.is_valid() {
        format_traceparent(sc)
    } else {
        let trace: u128 = rand::random::<u128>().max(1);
        let span: u64 = rand::random::<u64>().max(1);
        format!("00-{trace:032x}-{span:016x}-01")
    }
}

fn format_traceparent(sc: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    )
}

/// The trace id field of a `traceparent`.
pub fn trace_id_of(traceparent: &str) -> Option<String> {
    let mut parts = traceparent.split('-');
    let (_version, trace) = (parts.next()?, parts.next()?);
    (trace.len() == 32 && trace.chars().all(|c| c.is_ascii_hexdigit())).then(|| trace.to_string())
}

/// Makes `span` a child of the remote span in `traceparent`: one trace from ingress to handler.
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    let carrier: HashMap<String, String> =
        HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let context = TraceContextPropagator::new().extract(&carrier);
    // Without a tracing subscriber that records OTel data there is nothing to parent.
    let _ = span.set_parent(context);
}

/// The traceparent to hand to a child process or a downstream request from inside `span`.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    let s = context.span();
    let sc = s.span_context();
    sc.is_valid().then(|| format_traceparent(sc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_parse_and_fresh_ones_are_valid() {
        let tp = current_traceparent();
        let id = trace_id_of(&tp).expect("trace id");
        assert_eq!(id.len(), 32);
        assert_ne!(id, "0".repeat(32));
        assert_eq!(
            trace_id_of("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_id_of("garbage"), None);
    }
}
