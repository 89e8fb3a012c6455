//! Structured logs to stdout for every Tessera binary: human-readable text by default,
//! one JSON object per line with `--log-format json`. `RUST_LOG` filters as usual.
//!
//! Events carry the spans they belong to: the proxy opens one per connection (peer,
//! identity, destination) and, at debug level, one per request, so an event names who it
//! concerns without repeating it. The proxy names that span as each event's parent
//! instead of entering it on every poll of the connection's futures (that bookkeeping
//! cost every request instructions). Text prefixes the event with its spans
//! (`inbound{peer=… peer_identity=…}: …`); JSON lists them, outermost first, under
//! `spans`, each with its `name` and fields.

use std::fmt;
use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::{Map, Value};
use tracing::{Dispatch, Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::VisitOutput;
use tracing_subscriber::fmt::format::{JsonFields, JsonVisitor, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown log format {other:?}: use text or json")),
        }
    }
}

/// Installs the global subscriber. Call once, at the top of `main`.
pub fn init(format: LogFormat) {
    init_with_default(format, "info")
}

/// [`init`], filtering by `default_filter` (an `EnvFilter` directive such as `error`)
/// when `RUST_LOG` does not say.
pub fn init_with_default(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    // Also forwards the `log` records of dependencies (rustls) into it.
    subscriber(format, filter, ansi, std::io::stdout).init();
}

/// [`init_with_default`] for a command whose stdout is its output (manifests, a report,
/// JSON): logs go to stderr.
pub fn init_for_command(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    subscriber(format, filter, ansi, std::io::stderr).init();
}

/// The subscriber [`init`] installs, writing to `writer`: tests capture with it what a
/// binary would print.
pub fn subscriber<W>(
    format: LogFormat,
    filter: impl Into<EnvFilter>,
    ansi: bool,
    writer: W,
) -> Dispatch
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter.into())
        .with_writer(writer)
        .with_ansi(ansi)
        .with_target(false);
    match format {
        LogFormat::Text => Dispatch::new(builder.finish()),
        LogFormat::Json => Dispatch::new(
            builder
                .fmt_fields(JsonFields::new())
                .event_format(JsonLines)
                .finish(),
        ),
    }
}

/// One JSON object per event: its timestamp, level and fields, then `spans`. Written
/// here rather than by `tracing_subscriber`'s JSON format, whose span list is the spans
/// entered on the thread, never an event's explicit parent (tokio-rs/tracing#1360,
/// #2973), which is how the proxy places its events.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        write!(
            writer,
            "{{\"timestamp\":{},\"level\":\"{}\"",
            Value::from(timestamp),
            event.metadata().level()
        )?;
        // The event's fields as the JSON span fields are written (the `log.` fields of
        // forwarded `log` records left out): `{"event":…,…}`, whose members follow.
        let mut fields = String::new();
        let mut visitor = JsonVisitor::new(&mut fields);
        event.record(&mut visitor);
        visitor.finish()?;
        let members = fields
            .strip_prefix('{')
            .and_then(|fields| fields.strip_suffix('}'))
            .unwrap_or_default();
        if !members.is_empty() {
            write!(writer, ",{members}")?;
        }
        if let Some(scope) = ctx.event_scope() {
            let spans: Vec<Value> = scope
                .from_root()
                .map(|span| span_object::<S, N>(&span))
                .collect();
            write!(writer, ",\"spans\":{}", Value::Array(spans))?;
        }
        writeln!(writer, "}}")
    }
}

/// A span as `{"name": …, field: value, …}`; its fields were formatted as a JSON object
/// (`JsonFields`) when recorded.
fn span_object<S, N>(span: &tracing_subscriber::registry::SpanRef<'_, S>) -> Value
where
    S: for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
{
    let mut object = span
        .extensions()
        .get::<FormattedFields<N>>()
        .and_then(|fields| serde_json::from_str::<Map<String, Value>>(fields).ok())
        .unwrap_or_default();
    object.insert("name".to_string(), Value::from(span.name()));
    Value::Object(object)
}

/// Log lines kept in memory, for tests that check what is logged: give a clone to
/// [`subscriber`] as its writer.
#[derive(Clone, Default)]
pub struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl CapturedLogs {
    /// Every line written so far.
    pub fn lines(&self) -> Vec<String> {
        let bytes = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        String::from_utf8_lossy(&bytes)
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Write for CapturedLogs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let mut captured = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        captured.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'w> MakeWriter<'w> for CapturedLogs {
    type Writer = CapturedLogs;

    fn make_writer(&'w self) -> Self::Writer {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use tracing::field::{Empty, display};

    use super::*;

    /// What a denial logs in `format` at `level`, placed as the proxy places it: in a
    /// request's span inside its connection's, named as its parent, with neither entered.
    /// The identity is recorded after the connection's span opened, as after a handshake.
    fn log_a_denial(format: LogFormat, level: &str) -> String {
        let logs = CapturedLogs::default();
        let dispatch = subscriber(format, level, false, logs.clone());
        tracing::dispatcher::with_default(&dispatch, || {
            let connection = tracing::info_span!(
                "inbound",
                peer = "10.0.0.7:40000",
                peer_identity = Empty,
                port = 8080
            );
            connection.record(
                "peer_identity",
                display("spiffe://cluster.local/ns/shop/sa/client"),
            );
            let request = tracing::debug_span!(
                parent: &connection,
                "request",
                method = "GET",
                path = "/admin"
            );
            let parent = if request.is_disabled() {
                &connection
            } else {
                &request
            };
            tracing::warn!(
                parent: parent,
                event = "request denied",
                reason = "no ALLOW policy matched"
            );
        });
        let lines = logs.lines();
        assert_eq!(lines.len(), 1, "{lines:?}");
        lines[0].clone()
    }

    #[test]
    fn json_events_carry_their_spans_fields() {
        let line = log_a_denial(LogFormat::Json, "debug");
        let entry: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(entry["event"], "request denied", "{line}");
        assert_eq!(entry["reason"], "no ALLOW policy matched", "{line}");
        assert_eq!(entry["level"], "WARN", "{line}");
        assert!(entry["timestamp"].is_string(), "{line}");
        let spans = entry["spans"].as_array().expect("a span list");
        assert_eq!(spans.len(), 2, "{line}");
        assert_eq!(spans[0]["name"], "inbound");
        assert_eq!(spans[0]["peer"], "10.0.0.7:40000");
        assert_eq!(
            spans[0]["peer_identity"],
            "spiffe://cluster.local/ns/shop/sa/client"
        );
        assert_eq!(spans[0]["port"], 8080);
        assert_eq!(spans[1]["name"], "request");
        assert_eq!(spans[1]["method"], "GET");
        assert_eq!(spans[1]["path"], "/admin");
    }

    #[test]
    fn text_events_carry_their_spans_fields() {
        let line = log_a_denial(LogFormat::Text, "debug");
        assert!(
            line.contains("inbound{peer=\"10.0.0.7:40000\" port=8080 peer_identity=spiffe://cluster.local/ns/shop/sa/client}:request{method=\"GET\" path=\"/admin\"}:"),
            "{line}"
        );
        assert!(line.contains("request denied"), "{line}");
    }

    #[test]
    fn a_filtered_out_request_span_leaves_the_connections() {
        let line = log_a_denial(LogFormat::Json, "info");
        let entry: serde_json::Value = serde_json::from_str(&line).unwrap();
        let spans = entry["spans"].as_array().expect("a span list");
        assert_eq!(spans.len(), 1, "{line}");
        assert_eq!(spans[0]["name"], "inbound");
        assert_eq!(
            spans[0]["peer_identity"],
            "spiffe://cluster.local/ns/shop/sa/client"
        );
    }

    #[test]
    fn an_event_outside_any_span_has_no_span_list() {
        let logs = CapturedLogs::default();
        let dispatch = subscriber(LogFormat::Json, "info", false, logs.clone());
        tracing::dispatcher::with_default(&dispatch, || {
            tracing::info!(
                event = "listening on",
                address = "127.0.0.1:4140",
                port = 4140
            );
        });
        let lines = logs.lines();
        assert_eq!(lines.len(), 1, "{lines:?}");
        let entry: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(entry["event"], "listening on", "{}", lines[0]);
        assert_eq!(entry["port"], 4140, "{}", lines[0]);
        assert_eq!(entry["level"], "INFO", "{}", lines[0]);
        assert!(entry.get("spans").is_none(), "{}", lines[0]);
    }
}
