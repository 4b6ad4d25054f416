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
use infraflux_handlers::secret::Redactor;

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
/// Every log line and every exported span passes through `redactor`, so a secret (or one of its
/// encodings) that reached a message, a field or an attribute leaves the process scrubbed.
pub fn init(
    section: &TelemetrySection,
    headers: &HashMap<String, String>,
    format: Option<LogFormat>,
    env: &HashMap<String, String>,
    redactor: Redactor,
) -> Result<Telemetry, String> {
    let filter = match env.get("RUST_LOG") {
        Some(f) => EnvFilter::try_new(f).map_err(|e| format!("RUST_LOG: {e}"))?,
        None => EnvFilter::try_new(section.log_filter.as_deref().unwrap_or("info"))
            .map_err(|e| format!("telemetry.log_filter: {e}"))?,
    };
    let provider = provider(section, headers, env, &redactor)?;
    let stderr = RedactingStderr { redactor };
    let tracer = provider.tracer("infraflux-agent");
    let format = format.or(section.log_format).unwrap_or_default();
    let journald = env.contains_key("JOURNAL_STREAM");
    let fmt_layer = match (format, journald) {
        (LogFormat::Json, _) => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(stderr)
            .boxed(),
        (LogFormat::Text, true) => tracing_subscriber::fmt::layer()
            .without_time()
            .with_ansi(false)
            .with_writer(stderr)
            .boxed(),
        (LogFormat::Text, false) => tracing_subscriber::fmt::layer().with_writer(stderr).boxed(),
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
    redactor: &Redactor,
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
        builder = builder.with_batch_exporter(RedactingExporter {
            inner: exporter,
            redactor: redactor.clone(),
        });
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

/// Written by hand, not with `format!`: it runs for every webhook and every job, and hex
/// through `fmt` costs several times more.
fn format_traceparent(sc: &SpanContext) -> String {
    let mut out = *b"00-________________________________-________________-__";
    let _ = hex::encode_to_slice(sc.trace_id().to_bytes(), &mut out[3..35]);
    let _ = hex::encode_to_slice(sc.span_id().to_bytes(), &mut out[36..52]);
    let _ = hex::encode_to_slice([sc.trace_flags().to_u8()], &mut out[53..55]);
    String::from_utf8_lossy(&out).into_owned()
}

/// The trace id field of a `traceparent`.
pub fn trace_id_of(traceparent: &str) -> Option<String> {
    let mut parts = traceparent.split('-');
    let (_version, trace) = (parts.next()?, parts.next()?);
    (trace.len() == 32 && trace.chars().all(|c| c.is_ascii_hexdigit())).then(|| trace.to_string())
}

/// Makes `span` a child of the remote span in `traceparent`: one trace from ingress to handler.
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    let context = TraceContextPropagator::new().extract(&TraceparentOnly(traceparent));
    // Without a tracing subscriber that records OTel data there is nothing to parent.
    let _ = span.set_parent(context);
}

/// A carrier of one `traceparent` and nothing else, read where it is (a map of it was two
/// allocations for every job).
struct TraceparentOnly<'a>(&'a str);

impl opentelemetry::propagation::Extractor for TraceparentOnly<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
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
    use base64::Engine;
    use infraflux_handlers::secret::Secret;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    const SECRET: &str = "p@ss w/rd+Z?9&x";

    fn redactor() -> Redactor {
        let r = Redactor::default();
        r.register(&Secret::new(SECRET));
        r
    }

    /// The ways a secret shows up encoded in tool output.
    fn encodings() -> Vec<String> {
        vec![
            SECRET.to_string(),
            base64::engine::general_purpose::STANDARD.encode(SECRET),
            base64::engine::general_purpose::URL_SAFE.encode(SECRET),
            hex::encode(SECRET),
            "p%40ss%20w%2Frd%2BZ%3F9%26x".to_string(),
        ]
    }

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn log_lines_leave_scrubbed_of_secrets_in_any_encoding() {
        let out = Shared::default();
        for (i, form) in encodings().iter().enumerate() {
            let mut line = RedactingLine {
                redactor: redactor(),
                buffer: Vec::new(),
                out: Box::new(out.clone()),
            };
            // The formatter may write one event in pieces: the secret may straddle them.
            let text = format!("WARN step {i} failed: output {form} end\n");
            let (a, b) = text.split_at(text.len() / 2);
            line.write_all(a.as_bytes()).expect("write");
            line.write_all(b.as_bytes()).expect("write");
        }
        let written = String::from_utf8(out.0.lock().expect("lock").clone()).expect("utf-8");
        assert_eq!(written.lines().count(), encodings().len(), "{written}");
        for form in encodings() {
            assert!(!written.contains(&form), "{form} leaked: {written}");
        }
        assert!(
            written.contains("step 3 failed: output [REDACTED] end"),
            "{written}"
        );
    }

    #[test]
    fn exported_spans_are_scrubbed_of_secrets_in_any_encoding() {
        use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status};
        use opentelemetry::{Array, KeyValue, StringValue, Value};
        let forms = encodings();
        let mut events = opentelemetry_sdk::trace::SpanEvents::default();
        events.events.push(opentelemetry::trace::Event::new(
            format!("terraform said {}", forms[1]),
            std::time::SystemTime::now(),
            vec![KeyValue::new("output", forms[2].clone())],
            0,
        ));
        let mut span = opentelemetry_sdk::trace::SpanData {
            span_context: SpanContext::empty_context(),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: format!("step {}", forms[0]).into(),
            start_time: std::time::SystemTime::now(),
            end_time: std::time::SystemTime::now(),
            attributes: vec![
                KeyValue::new("error", format!("failed: {}", forms[3])),
                KeyValue::new(
                    "lines",
                    Value::Array(Array::String(vec![StringValue::from(forms[4].clone())])),
                ),
                KeyValue::new("count", 3_i64),
            ],
            dropped_attributes_count: 0,
            events,
            links: opentelemetry_sdk::trace::SpanLinks::default(),
            status: Status::error(format!("apply failed: {}", forms[1])),
            instrumentation_scope: opentelemetry::InstrumentationScope::builder("test").build(),
        };
        redact_span(&redactor(), &mut span);
        let printed = format!("{span:?}");
        for form in &forms {
            assert!(!printed.contains(form.as_str()), "{form} leaked: {printed}");
        }
        assert!(printed.contains("[REDACTED]"), "{printed}");
        assert_eq!(span.attributes[2], KeyValue::new("count", 3_i64));
    }

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

    #[test]
    fn a_traceparent_is_written_as_the_w3c_format_has_it_and_read_back() {
        use opentelemetry::trace::{SpanId, TraceFlags, TraceId, TraceState};
        for (trace, span, flags) in [
            (
                0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736,
                0x00f0_67aa_0ba9_02b7,
                1,
            ),
            (1, 1, 0),
            (u128::MAX, u64::MAX, 0xff),
        ] {
            let sc = SpanContext::new(
                TraceId::from(trace),
                SpanId::from(span),
                TraceFlags::new(flags),
                true,
                TraceState::default(),
            );
            let written = format_traceparent(&sc);
            assert_eq!(
                written,
                format!("00-{trace:032x}-{span:016x}-{flags:02x}"),
                "{trace:x}"
            );
            // What `set_parent` reads is the context written.
            let read = TraceContextPropagator::new().extract(&TraceparentOnly(&written));
            let read = read.span().span_context().clone();
            assert_eq!(
                (read.trace_id(), read.span_id(), read.trace_flags()),
                (
                    sc.trace_id(),
                    sc.span_id(),
                    sc.trace_flags() & TraceFlags::SAMPLED
                ),
                "{written}"
            );
        }
    }
}

/// Stderr, one log line at a time, scrubbed: the formatter writes a whole event into one
/// writer, which redacts it when dropped.
#[derive(Clone)]
struct RedactingStderr {
    redactor: Redactor,
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for RedactingStderr {
    type Writer = RedactingLine;

    fn make_writer(&'a self) -> Self::Writer {
        RedactingLine {
            redactor: self.redactor.clone(),
            buffer: Vec::new(),
            out: Box::new(std::io::stderr()),
        }
    }
}

pub(crate) struct RedactingLine {
    redactor: Redactor,
    buffer: Vec<u8>,
    out: Box<dyn std::io::Write + Send>,
}

impl std::io::Write for RedactingLine {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for RedactingLine {
    fn drop(&mut self) {
        if self.buffer.is_empty() {
            return;
        }
        let line = self.redactor.redact(&String::from_utf8_lossy(&self.buffer));
        let _ = self.out.write_all(line.as_bytes());
        let _ = self.out.flush();
    }
}

/// The OTLP exporter, behind a redactor: span names, attributes, events and status messages
/// are scrubbed before they leave.
#[derive(Debug)]
struct RedactingExporter<E> {
    inner: E,
    redactor: Redactor,
}

impl<E: opentelemetry_sdk::trace::SpanExporter> opentelemetry_sdk::trace::SpanExporter
    for RedactingExporter<E>
{
    fn export(
        &self,
        mut batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> impl std::future::Future<Output = opentelemetry_sdk::error::OTelSdkResult> + Send {
        for span in &mut batch {
            redact_span(&self.redactor, span);
        }
        self.inner.export(batch)
    }

    fn shutdown_with_timeout(
        &self,
        timeout: std::time::Duration,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

fn redact_span(redactor: &Redactor, span: &mut opentelemetry_sdk::trace::SpanData) {
    use std::borrow::Cow;
    let scrub = |text: &str| -> Option<String> {
        let clean = redactor.redact(text);
        (clean != text).then_some(clean)
    };
    if let Some(clean) = scrub(&span.name) {
        span.name = Cow::Owned(clean);
    }
    redact_attributes(redactor, &mut span.attributes);
    for event in &mut span.events.events {
        if let Some(clean) = scrub(&event.name) {
            event.name = Cow::Owned(clean);
        }
        redact_attributes(redactor, &mut event.attributes);
    }
    if let opentelemetry::trace::Status::Error { description } = &mut span.status
        && let Some(clean) = scrub(description)
    {
        *description = Cow::Owned(clean);
    }
}

fn redact_attributes(redactor: &Redactor, attributes: &mut [opentelemetry::KeyValue]) {
    use opentelemetry::{Array, StringValue, Value};
    for attribute in attributes {
        match &mut attribute.value {
            Value::String(s) => {
                let clean = redactor.redact(s.as_str());
                if clean != s.as_str() {
                    *s = StringValue::from(clean);
                }
            }
            Value::Array(Array::String(values)) => {
                for s in values {
                    let clean = redactor.redact(s.as_str());
                    if clean != s.as_str() {
                        *s = StringValue::from(clean);
                    }
                }
            }
            _ => {}
        }
    }
}
