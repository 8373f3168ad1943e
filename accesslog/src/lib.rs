//! # accesslog: Istio's default JSON access-log line, written off the request path
//!
//! Contract:
//! - [`AccessLogRecord`] is the one typed record of a request (or of a tunnel that failed
//!   before any request). Its JSON has exactly the 24 keys of Istio's default JSON format
//!   (`EnvoyJSONLogFormatIstio`, protocol.md 3.2): numbers as numbers (`response_code`,
//!   `bytes_received`, `bytes_sent`, `duration`), `upstream_service_time` as a string, absent
//!   values as `null`, `response_flags` `"-"` when none.
//! - [`AccessLogger::log`] never blocks and never does I/O on the caller's thread: records go
//!   through a bounded channel to one writer thread that, every 50 ms or every
//!   [`WAKE_EVERY`] records (whichever comes first), serializes and writes whatever is
//!   queued as whole lines.
//!   If the writer cannot keep up and the queue is full, the record is counted in
//!   [`AccessLogger::dropped`] (and a warning is logged) rather than stalling traffic.
//! - Emitting exactly once per request is the caller's job (the proxy's log guard).

mod flags;
pub mod format;

pub use flags::{ResponseFlag, ResponseFlags};
pub use format::{CapturedHeaders, LogFormat};

use std::borrow::Cow;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use serde::Serialize;
use serde::ser::Serializer;

/// One access-log line. Field names and order follow Istio's JSON format.
#[derive(Debug, Clone, Serialize)]
pub struct AccessLogRecord {
    /// `%START_TIME%`: RFC 3339 UTC with milliseconds, `2026-11-22T02:54:31.277Z`.
    #[serde(serialize_with = "ser_time")]
    pub start_time: SystemTime,
    /// `%ROUTE_NAME%`.
    pub route_name: Option<Arc<str>>,
    /// `%REQ(:METHOD)%`.
    pub method: Option<Cow<'static, str>>,
    /// `%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%` (path with query, as received).
    pub path: Option<String>,
    /// `%PROTOCOL%`: `HTTP/1.1`, `HTTP/2`; null for raw TCP.
    pub protocol: Option<&'static str>,
    /// `%RESPONSE_CODE%`: 0 when no response was sent.
    pub response_code: u16,
    /// `%RESPONSE_FLAGS%`.
    pub response_flags: ResponseFlags,
    /// `%RESPONSE_CODE_DETAILS%` (`via_upstream`, `route_not_found`, ...).
    pub response_code_details: Option<Cow<'static, str>>,
    /// `%CONNECTION_TERMINATION_DETAILS%`.
    pub connection_termination_details: Option<Cow<'static, str>>,
    /// `%UPSTREAM_TRANSPORT_FAILURE_REASON%`.
    pub upstream_transport_failure_reason: Option<String>,
    /// `%BYTES_RECEIVED%`: request body bytes.
    pub bytes_received: u64,
    /// `%BYTES_SENT%`: response body bytes.
    pub bytes_sent: u64,
    /// `%DURATION%` in milliseconds, start of request to end of response.
    pub duration: u64,
    /// `%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%`: milliseconds, as a string (protocol.md 3.2).
    pub upstream_service_time: Option<String>,
    /// `%REQ(X-FORWARDED-FOR)%`.
    pub x_forwarded_for: Option<String>,
    /// `%REQ(USER-AGENT)%`.
    pub user_agent: Option<String>,
    /// `%REQ(X-REQUEST-ID)%`.
    pub request_id: Option<String>,
    /// `%REQ(:AUTHORITY)%` (the inner request's Host / :authority).
    pub authority: Option<String>,
    /// `%UPSTREAM_HOST%`.
    pub upstream_host: Option<String>,
    /// `%UPSTREAM_CLUSTER_RAW%`.
    pub upstream_cluster: Option<Arc<str>>,
    /// `%UPSTREAM_LOCAL_ADDRESS%`.
    pub upstream_local_address: Option<String>,
    /// `%DOWNSTREAM_LOCAL_ADDRESS%`: the Service VIP:port from the CONNECT authority.
    pub downstream_local_address: Option<String>,
    /// `%DOWNSTREAM_REMOTE_ADDRESS%`: the client pod ip:port (HBONE TCP source).
    pub downstream_remote_address: Option<String>,
    /// `%REQUESTED_SERVER_NAME%`: SNI of the inner connection (none for plaintext HTTP).
    pub requested_server_name: Option<String>,
    /// Headers a configured format reads beyond these fields (`%REQ(X-TENANT)%`); not part
    /// of Istio's JSON line. `None` unless a format asks.
    #[serde(skip)]
    pub captured: Option<Box<CapturedHeaders>>,
    /// The response's `grpc-status` (its headers, else its trailers): Istio's
    /// `grpc_response_status` metric label and the span's `grpc.status_code`. Not a field of
    /// Istio's JSON line.
    #[serde(skip)]
    pub grpc_status: Option<u16>,
    /// The response's `grpc-message` (span tag `grpc.message`).
    #[serde(skip)]
    pub grpc_message: Option<String>,
}

impl AccessLogRecord {
    /// An empty record started at `start_time`.
    pub fn new(start_time: SystemTime) -> AccessLogRecord {
        AccessLogRecord {
            start_time,
            route_name: None,
            method: None,
            path: None,
            protocol: None,
            response_code: 0,
            response_flags: ResponseFlags::default(),
            response_code_details: None,
            connection_termination_details: None,
            upstream_transport_failure_reason: None,
            bytes_received: 0,
            bytes_sent: 0,
            duration: 0,
            upstream_service_time: None,
            x_forwarded_for: None,
            user_agent: None,
            request_id: None,
            authority: None,
            upstream_host: None,
            upstream_cluster: None,
            upstream_local_address: None,
            downstream_local_address: None,
            downstream_remote_address: None,
            requested_server_name: None,
            captured: None,
            grpc_status: None,
            grpc_message: None,
        }
    }

    /// The JSON line (without the newline).
    pub fn to_json(&self) -> String {
        // Serialization of this struct cannot fail: every field is a string, number or null.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Append the JSON line plus `\n` to `out`.
    pub fn write_line(&self, out: &mut Vec<u8>) {
        if serde_json::to_writer(&mut *out, self).is_ok() {
            out.push(b'\n');
        }
    }
}

fn ser_time<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

/// Capacity of the queue between request tasks and the writer thread. At ~900 bytes a line
/// this bounds queued logs to ~60 MB in the worst case.
pub const QUEUE_CAPACITY: usize = 65_536;

/// How often the writer thread drains the queue.
pub const FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

/// Also wake the writer every this many records: under load the queue (and the memory of
/// the records in it, ~1 KiB each) stays at a few hundred records instead of 50 ms worth
/// (2,500 at 50k req/s), for one thread wake-up per batch.
pub const WAKE_EVERY: u64 = 256;

/// Where lines go and in which format; swapped whole when the mesh config changes.
pub struct Output {
    format: LogFormat,
    request_headers: Vec<String>,
    response_headers: Vec<String>,
    /// Only the writer thread writes; the lock is never contended. Shared with the output
    /// that replaces this one when only the format changes.
    sink: Arc<std::sync::Mutex<Box<dyn Write + Send>>>,
}

impl Output {
    pub fn new(format: LogFormat, sink: Box<dyn Write + Send>) -> Output {
        Output {
            request_headers: format.request_headers(),
            response_headers: format.response_headers(),
            format,
            sink: Arc::new(std::sync::Mutex::new(sink)),
        }
    }

    /// The same sink with another format.
    fn with_format(&self, format: LogFormat) -> Output {
        Output {
            request_headers: format.request_headers(),
            response_headers: format.response_headers(),
            format,
            sink: self.sink.clone(),
        }
    }
}

/// Handle for emitting records; cheap to clone.
#[derive(Clone)]
pub struct AccessLogger {
    output: Arc<arc_swap::ArcSwap<Output>>,
    tx: tokio::sync::mpsc::Sender<Box<AccessLogRecord>>,
    dropped: Arc<AtomicU64>,
    queued: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
    writer: Option<std::thread::Thread>,
}

impl std::fmt::Debug for AccessLogger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLogger")
            .field("written", &self.written())
            .field("dropped", &self.dropped())
            .finish()
    }
}

fn write_out(sink: &std::sync::Mutex<Box<dyn Write + Send>>, buf: &mut Vec<u8>) {
    if let Ok(mut sink) = sink.lock()
        && let Err(e) = sink.write_all(buf).and_then(|_| sink.flush())
    {
        tracing::warn!(error = %e, "writing access log failed");
    }
    buf.clear();
}

impl AccessLogger {
    /// Start the writer thread writing Istio's JSON lines to `sink` (stdout in production).
    pub fn spawn(sink: Box<dyn Write + Send>) -> AccessLogger {
        AccessLogger::spawn_with(Output::new(LogFormat::IstioJson, sink))
    }

    /// Start the writer thread writing to `output`.
    pub fn spawn_with(output: Output) -> AccessLogger {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Box<AccessLogRecord>>(QUEUE_CAPACITY);
        let output = Arc::new(arc_swap::ArcSwap::from_pointee(output));
        let writer_output = output.clone();
        let written = Arc::new(AtomicU64::new(0));
        let counter = written.clone();
        let spawned = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                // Drain on a short period instead of waking per record: a request only pays
                // for a non-blocking queue push (no thread wake-up, no syscall), and lines go
                // out in batches (Envoy flushes its access log every second; we use 50 ms).
                let mut buf = Vec::with_capacity(64 * 1024);
                loop {
                    let mut n = 0u64;
                    let mut closed = false;
                    // One output per batch: a swap applies from the next batch on.
                    let out = writer_output.load_full();
                    loop {
                        match rx.try_recv() {
                            Ok(rec) => {
                                out.format.render(&rec, &mut buf);
                                n += 1;
                                if buf.len() >= 64 * 1024 {
                                    write_out(&out.sink, &mut buf);
                                }
                            }
                            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                                closed = true;
                                break;
                            }
                        }
                    }
                    if !buf.is_empty() {
                        write_out(&out.sink, &mut buf);
                    }
                    counter.fetch_add(n, Ordering::Relaxed);
                    if closed {
                        break;
                    }
                    std::thread::park_timeout(FLUSH_INTERVAL);
                }
                if let Ok(mut sink) = writer_output.load().sink.lock() {
                    let _ = sink.flush();
                }
            });
        let writer = match spawned {
            Ok(handle) => Some(handle.thread().clone()),
            Err(e) => {
                tracing::error!(error = %e, "could not start the access-log writer thread");
                None
            }
        };
        AccessLogger {
            output,
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
            queued: Arc::new(AtomicU64::new(0)),
            written,
            writer,
        }
    }

    /// Write to the process's stdout.
    pub fn stdout() -> AccessLogger {
        AccessLogger::spawn(Box::new(std::io::stdout()))
    }

    /// Write to `output` from the next batch on (records queued before are written with it).
    pub fn set_output(&self, output: Output) {
        self.output.store(Arc::new(output));
    }

    /// Write in `format` from the next batch on, to the same sink.
    pub fn set_format(&self, format: LogFormat) {
        let next = self.output.load().with_format(format);
        self.output.store(Arc::new(next));
    }

    /// Whether the format is `format` now.
    pub fn format_is(&self, format: &LogFormat) -> bool {
        self.output.load().format == *format
    }

    /// The request headers the format reads beyond the record's fields (`%REQ(X-TENANT)%`),
    /// looked up with `get`; empty (and nothing allocated) when it reads none.
    pub fn capture_request(&self, get: impl Fn(&str) -> Option<String>) -> Vec<(Box<str>, String)> {
        capture(&self.output.load().request_headers, get)
    }

    /// The same for response headers (`%RESP(CONTENT-TYPE)%`).
    pub fn capture_response(
        &self,
        get: impl Fn(&str) -> Option<String>,
    ) -> Vec<(Box<str>, String)> {
        capture(&self.output.load().response_headers, get)
    }

    /// Queue a record; never blocks.
    pub fn log(&self, record: AccessLogRecord) {
        if self.tx.try_send(Box::new(record)).is_ok() {
            let queued = self.queued.fetch_add(1, Ordering::Relaxed) + 1;
            if queued.is_multiple_of(WAKE_EVERY)
                && let Some(w) = &self.writer
            {
                w.unpark();
            }
        } else {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() {
                tracing::warn!(dropped = n + 1, "access-log queue full: records dropped");
            }
        }
    }

    /// Records dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Wait (bounded by `timeout`) until every queued record has been written; used at exit.
    pub async fn flushed(&self, timeout: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.written.load(Ordering::Relaxed) >= self.queued.load(Ordering::Relaxed) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Records written so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
}

fn capture(names: &[String], get: impl Fn(&str) -> Option<String>) -> Vec<(Box<str>, String)> {
    names
        .iter()
        .filter_map(|n| get(n).map(|v| (n.as_str().into(), v)))
        .collect()
}

/// A `Write` sink that forwards each complete line to a channel (for in-process tests and the demo).
pub struct LineSink {
    tx: std::sync::mpsc::Sender<String>,
    partial: Vec<u8>,
}

impl LineSink {
    pub fn new() -> (LineSink, std::sync::mpsc::Receiver<String>) {
        let (tx, rx) = std::sync::mpsc::channel();
        (
            LineSink {
                tx,
                partial: Vec::new(),
            },
            rx,
        )
    }
}

impl Write for LineSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.partial.extend_from_slice(buf);
        while let Some(pos) = self.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=pos).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            let _ = self.tx.send(text);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    const KEYS: [&str; 24] = [
        "start_time",
        "route_name",
        "method",
        "path",
        "protocol",
        "response_code",
        "response_flags",
        "response_code_details",
        "connection_termination_details",
        "bytes_received",
        "bytes_sent",
        "duration",
        "upstream_service_time",
        "x_forwarded_for",
        "user_agent",
        "request_id",
        "authority",
        "upstream_host",
        "upstream_cluster",
        "upstream_local_address",
        "downstream_local_address",
        "downstream_remote_address",
        "requested_server_name",
        "upstream_transport_failure_reason",
    ];

    #[test]
    fn record_has_exactly_istios_24_keys_with_envoy_types() {
        let mut r = AccessLogRecord::new(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123));
        r.method = Some("GET".into());
        r.response_code = 200;
        r.upstream_service_time = Some("3".into());
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        let obj = v.as_object().unwrap();
        assert_eq!(obj.len(), 24);
        for k in KEYS {
            assert!(obj.contains_key(k), "missing {k}");
        }
        assert_eq!(obj["start_time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(obj["response_code"], 200);
        assert_eq!(obj["bytes_sent"], 0);
        assert_eq!(obj["upstream_service_time"], "3");
        assert_eq!(obj["response_flags"], "-");
        assert!(obj["route_name"].is_null());
        assert!(obj["upstream_host"].is_null());
    }

    #[test]
    fn logger_writes_one_line_per_record() {
        let (sink, rx) = LineSink::new();
        let logger = AccessLogger::spawn(Box::new(sink));
        for code in [200u16, 404, 503] {
            let mut r = AccessLogRecord::new(SystemTime::now());
            r.response_code = code;
            logger.log(r);
        }
        let codes: Vec<u64> = (0..3)
            .map(|_| {
                let line = rx.recv_timeout(Duration::from_secs(5)).unwrap();
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                v["response_code"].as_u64().unwrap()
            })
            .collect();
        assert_eq!(codes, vec![200, 404, 503]);
        assert_eq!(logger.dropped(), 0);
    }
}
