//! Access-log formats as Istio configures Envoy's file access log (MeshConfig
//! `accessLogEncoding` / `accessLogFormat`, protocol.md 3.1-3.2; istiod
//! `FileAccessLogFromMeshConfig`): Envoy format strings with command operators
//! (`%START_TIME%`, `%REQ(X-REQUEST-ID)%`, `%RESPONSE_FLAGS%`, ...), compiled once into a
//! [`LogFormat`] and rendered per record on the writer thread.
//!
//! - [`LogFormat::IstioJson`]: Istio's default JSON line (`EnvoyJSONLogFormatIstio`), written
//!   by serde from the record (the fast path, and this waypoint's default).
//! - [`LogFormat::text`]: an Envoy text format; Istio appends a newline when the format lacks
//!   one (`fileAccessLogFormat`); `-` for an absent value, as Envoy prints it.
//! - [`LogFormat::json`]: an Envoy `json_format` (the JSON object of MeshConfig
//!   `accessLogFormat` with `accessLogEncoding: JSON`, or an `envoyFileAccessLog` provider's
//!   `labels`): a value that is exactly one operator keeps its type (numbers as numbers, an
//!   absent value as `null`); a value mixing text and operators is a string with `-` for
//!   absent parts; non-string values are written as given; keys sorted (Envoy's formatter
//!   gets them from a protobuf `Struct`, a map, and its output order is not the written one
//!   either).
//!
//! An operator this waypoint does not produce is a configuration error naming it (Envoy would
//! reject an unknown one too; ones it knows but we do not fill are listed in the error).
//! Request and response headers beyond the record's own fields (`%REQ(X-FOO)%`) are kept per
//! request only when a format names them ([`LogFormat::request_headers`]).

use std::borrow::Cow;
use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::AccessLogRecord;

/// Where lines go.
pub type OutputSink = Box<dyn std::io::Write + Send>;

/// Istio's default text format (`EnvoyTextLogFormat`, Istio 1.25+: `%UPSTREAM_CLUSTER_RAW%`).
pub const ISTIO_TEXT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% \"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER_RAW% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n";

/// The longest format accepted (a format is configuration, not traffic; this only keeps a
/// mistake from becoming a megabyte of work per request).
pub const MAX_FORMAT_LEN: usize = 16 * 1024;

/// Headers a format may name beyond the record's fields, per direction.
pub const MAX_CAPTURED_HEADERS: usize = 32;

/// Request and response header values a format asked for, by lower-case name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CapturedHeaders {
    pub request: Vec<(Box<str>, String)>,
    pub response: Vec<(Box<str>, String)>,
}

/// A compiled access-log format.
#[derive(Debug, Clone, PartialEq)]
pub enum LogFormat {
    /// Istio's default JSON line ([`AccessLogRecord::write_line`]).
    IstioJson,
    /// An Envoy text format (newline included).
    Text(Template),
    /// An Envoy `json_format` object, one line per record.
    Json(Vec<(String, JsonValue)>),
}

/// One value of a JSON format.
#[derive(Debug, Clone, PartialEq)]
pub enum JsonValue {
    /// Exactly one operator: typed.
    Op(Op),
    /// Text with operators: a string.
    Template(Template),
    /// A non-string value, written as given.
    Literal(serde_json::Value),
    Object(Vec<(String, JsonValue)>),
}

/// Literal text and operators, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Template(Vec<Piece>);

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Op(Op),
}

/// One command operator with its optional `:N` length limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Op {
    kind: OpKind,
    max_len: Option<usize>,
}

#[derive(Debug, Clone, PartialEq)]
enum OpKind {
    StartTime(Option<Vec<TimePart>>),
    /// `REQ(a?b)`: the first present of the names (lower case).
    Req(Vec<String>),
    Resp(Vec<String>),
    Protocol,
    ResponseCode,
    ResponseFlags,
    ResponseCodeDetails,
    ConnectionTerminationDetails,
    UpstreamTransportFailureReason,
    BytesReceived,
    BytesSent,
    Duration,
    UpstreamHost,
    /// `%UPSTREAM_CLUSTER%`: the observability name, which istiod sets to the name plus `;`
    /// on every cluster (`alt_stat_name`, protocol.md 2.5).
    UpstreamCluster,
    UpstreamClusterRaw,
    UpstreamLocalAddress,
    DownstreamLocalAddress,
    DownstreamLocalAddressWithoutPort,
    DownstreamLocalPort,
    DownstreamRemoteAddress,
    DownstreamRemoteAddressWithoutPort,
    DownstreamRemotePort,
    RequestedServerName,
    RouteName,
    Hostname(String),
}

/// Envoy's `START_TIME(...)` format: strftime specifiers plus `%E<n>S` / `%<n>f` fractions.
#[derive(Debug, Clone, PartialEq)]
enum TimePart {
    Text(String),
    Year,
    Month,
    Day,
    Hour,
    Minute,
    Second,
    /// Seconds with `n` fractional digits (`%E3S`).
    SecondFraction(u8),
    /// `n` fractional digits alone (`%3f`, `%f` = 9).
    Fraction(u8),
    EpochSeconds,
    DayOfYear,
    Zone,
}

/// The operators this waypoint fills, for error messages.
const SUPPORTED: &str = "START_TIME, START_TIME(format), REQ(h?h2):N, RESP(h?h2):N, PROTOCOL, RESPONSE_CODE, RESPONSE_FLAGS, RESPONSE_CODE_DETAILS, CONNECTION_TERMINATION_DETAILS, UPSTREAM_TRANSPORT_FAILURE_REASON, BYTES_RECEIVED, BYTES_SENT, DURATION, UPSTREAM_HOST, UPSTREAM_CLUSTER, UPSTREAM_CLUSTER_RAW, UPSTREAM_LOCAL_ADDRESS, DOWNSTREAM_LOCAL_ADDRESS, DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT, DOWNSTREAM_LOCAL_PORT, DOWNSTREAM_REMOTE_ADDRESS, DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT, DOWNSTREAM_REMOTE_PORT, REQUESTED_SERVER_NAME, ROUTE_NAME, HOSTNAME";

impl LogFormat {
    /// Compile an Envoy text format; a newline is appended when missing (Istio does).
    pub fn text(format: &str) -> Result<LogFormat, String> {
        if format.len() > MAX_FORMAT_LEN {
            return Err(format!(
                "the format is {} bytes; at most {MAX_FORMAT_LEN}",
                format.len()
            ));
        }
        let mut owned = format.to_string();
        if !owned.ends_with('\n') {
            owned.push('\n');
        }
        let t = parse_template(&owned)?;
        let f = LogFormat::Text(t);
        f.check_headers()?;
        Ok(f)
    }

    /// Compile an Envoy `json_format` from the JSON object text of MeshConfig
    /// `accessLogFormat`.
    pub fn json_text(format: &str) -> Result<LogFormat, String> {
        if format.len() > MAX_FORMAT_LEN {
            return Err(format!(
                "the format is {} bytes; at most {MAX_FORMAT_LEN}",
                format.len()
            ));
        }
        let v: serde_json::Value = serde_json::from_str(format)
            .map_err(|e| format!("not a JSON object of key to operator: {e}"))?;
        LogFormat::json(&v)
    }

    /// Compile an Envoy `json_format` object.
    pub fn json(v: &serde_json::Value) -> Result<LogFormat, String> {
        let serde_json::Value::Object(map) = v else {
            return Err("a JSON format must be an object of key to operator".into());
        };
        let f = LogFormat::Json(json_object(map, "")?);
        f.check_headers()?;
        Ok(f)
    }

    fn check_headers(&self) -> Result<(), String> {
        for (dir, n) in [
            ("request", self.request_headers().len()),
            ("response", self.response_headers().len()),
        ] {
            if n > MAX_CAPTURED_HEADERS {
                return Err(format!(
                    "the format names {n} {dir} headers; at most {MAX_CAPTURED_HEADERS}"
                ));
            }
        }
        Ok(())
    }

    /// Request headers (lower case) the format reads beyond the record's own fields: the
    /// request path keeps these per request, and nothing else.
    pub fn request_headers(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.visit(&mut |op| {
            if let OpKind::Req(names) = &op.kind {
                for n in names {
                    if req_field(n).is_none() && !out.contains(n) {
                        out.push(n.clone());
                    }
                }
            }
        });
        out
    }

    /// Response headers (lower case) the format reads beyond the record's own fields.
    pub fn response_headers(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.visit(&mut |op| {
            if let OpKind::Resp(names) = &op.kind {
                for n in names {
                    if resp_field(n).is_none() && !out.contains(n) {
                        out.push(n.clone());
                    }
                }
            }
        });
        out
    }

    fn visit(&self, f: &mut impl FnMut(&Op)) {
        fn template(t: &Template, f: &mut impl FnMut(&Op)) {
            for p in &t.0 {
                if let Piece::Op(op) = p {
                    f(op);
                }
            }
        }
        fn object(o: &[(String, JsonValue)], f: &mut impl FnMut(&Op)) {
            for (_, v) in o {
                match v {
                    JsonValue::Op(op) => f(op),
                    JsonValue::Template(t) => template(t, f),
                    JsonValue::Object(o) => object(o, f),
                    JsonValue::Literal(_) => {}
                }
            }
        }
        match self {
            LogFormat::IstioJson => {}
            LogFormat::Text(t) => template(t, f),
            LogFormat::Json(o) => object(o, f),
        }
    }

    /// Append one line for `r` (newline included) to `out`.
    pub fn render(&self, r: &AccessLogRecord, out: &mut Vec<u8>) {
        match self {
            LogFormat::IstioJson => r.write_line(out),
            LogFormat::Text(t) => {
                let mut s = String::with_capacity(512);
                t.render(r, &mut s);
                out.extend_from_slice(s.as_bytes());
            }
            LogFormat::Json(o) => {
                let v = render_object(o, r);
                if serde_json::to_writer(&mut *out, &v).is_ok() {
                    out.push(b'\n');
                }
            }
        }
    }
}

fn json_object(
    map: &serde_json::Map<String, serde_json::Value>,
    path: &str,
) -> Result<Vec<(String, JsonValue)>, String> {
    let mut out = Vec::with_capacity(map.len());
    for (k, v) in map {
        let at = if path.is_empty() {
            k.clone()
        } else {
            format!("{path}.{k}")
        };
        let value = match v {
            serde_json::Value::String(s) => {
                let t = parse_template(s).map_err(|e| format!("key {at:?}: {e}"))?;
                match t.0.as_slice() {
                    [Piece::Op(op)] => JsonValue::Op(op.clone()),
                    _ => JsonValue::Template(t),
                }
            }
            serde_json::Value::Object(inner) => JsonValue::Object(json_object(inner, &at)?),
            other => JsonValue::Literal(other.clone()),
        };
        out.push((k.clone(), value));
    }
    Ok(out)
}

fn render_object(o: &[(String, JsonValue)], r: &AccessLogRecord) -> serde_json::Value {
    let mut map = serde_json::Map::with_capacity(o.len());
    for (k, v) in o {
        let value = match v {
            JsonValue::Op(op) => match op.value(r) {
                Value::Missing => serde_json::Value::Null,
                Value::Num(n) => serde_json::Value::from(n),
                Value::Str(s) => serde_json::Value::String(s.into_owned()),
            },
            JsonValue::Template(t) => {
                let mut s = String::new();
                t.render(r, &mut s);
                serde_json::Value::String(s)
            }
            JsonValue::Literal(v) => v.clone(),
            JsonValue::Object(inner) => render_object(inner, r),
        };
        map.insert(k.clone(), value);
    }
    serde_json::Value::Object(map)
}

impl Template {
    fn render(&self, r: &AccessLogRecord, out: &mut String) {
        for p in &self.0 {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Op(op) => match op.value(r) {
                    Value::Missing => out.push('-'),
                    Value::Num(n) => {
                        let _ = write!(out, "{n}");
                    }
                    Value::Str(s) if s.is_empty() => out.push('-'),
                    Value::Str(s) => out.push_str(&s),
                },
            }
        }
    }
}

/// One operator's value for a record.
enum Value<'a> {
    Missing,
    Num(u64),
    Str(Cow<'a, str>),
}

fn opt(s: Option<&str>) -> Value<'_> {
    match s {
        Some(s) if !s.is_empty() => Value::Str(Cow::Borrowed(s)),
        _ => Value::Missing,
    }
}

/// `ip:port` split as Envoy's `*_WITHOUT_PORT` / `*_PORT` operators do (`[v6]:port` too).
fn split_host_port(a: &str) -> Option<(&str, &str)> {
    let (host, port) = a.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    Some((host.trim_start_matches('[').trim_end_matches(']'), port))
}

/// Reads one field of the record.
type FieldGetter = fn(&AccessLogRecord) -> Option<&str>;

/// Request headers the record holds as fields (lower-case names), by name.
fn req_field(name: &str) -> Option<FieldGetter> {
    Some(match name {
        ":method" => |r| r.method.as_deref(),
        ":path" => |r| r.path.as_deref(),
        ":authority" | "host" => |r| r.authority.as_deref(),
        "user-agent" => |r| r.user_agent.as_deref(),
        "x-request-id" => |r| r.request_id.as_deref(),
        "x-forwarded-for" => |r| r.x_forwarded_for.as_deref(),
        // Set by Envoy only when a filter rewrote the path; the record keeps the path as
        // received, which is what `X-ENVOY-ORIGINAL-PATH?:PATH` prints.
        "x-envoy-original-path" => |_| None,
        _ => return None,
    })
}

fn resp_field(name: &str) -> Option<FieldGetter> {
    Some(match name {
        "x-envoy-upstream-service-time" => |r| r.upstream_service_time.as_deref(),
        _ => return None,
    })
}

fn header<'a>(
    names: &[String],
    r: &'a AccessLogRecord,
    field: fn(&str) -> Option<FieldGetter>,
    captured: impl Fn(&'a CapturedHeaders) -> &'a [(Box<str>, String)],
) -> Value<'a> {
    for n in names {
        let v = match field(n) {
            Some(f) => f(r),
            None => r.captured.as_deref().and_then(|c| {
                captured(c)
                    .iter()
                    .find(|(k, _)| **k == **n)
                    .map(|(_, v)| v.as_str())
            }),
        };
        if let Some(v) = v.filter(|v| !v.is_empty()) {
            return Value::Str(Cow::Borrowed(v));
        }
    }
    Value::Missing
}

impl Op {
    fn value<'a>(&'a self, r: &'a AccessLogRecord) -> Value<'a> {
        let v = self.raw(r);
        match (v, self.max_len) {
            (Value::Str(s), Some(max)) if s.len() > max => {
                let mut end = max;
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                Value::Str(Cow::Owned(s[..end].to_string()))
            }
            (v, _) => v,
        }
    }

    fn raw<'a>(&'a self, r: &'a AccessLogRecord) -> Value<'a> {
        match &self.kind {
            OpKind::StartTime(None) => Value::Str(Cow::Owned(
                humantime::format_rfc3339_millis(r.start_time).to_string(),
            )),
            OpKind::StartTime(Some(parts)) => {
                Value::Str(Cow::Owned(format_time(parts, r.start_time)))
            }
            OpKind::Req(names) => header(names, r, req_field, |c| &c.request),
            OpKind::Resp(names) => header(names, r, resp_field, |c| &c.response),
            OpKind::Protocol => opt(r.protocol),
            OpKind::ResponseCode => Value::Num(r.response_code.into()),
            OpKind::ResponseFlags => Value::Str(Cow::Owned(r.response_flags.to_string())),
            OpKind::ResponseCodeDetails => opt(r.response_code_details.as_deref()),
            OpKind::ConnectionTerminationDetails => {
                opt(r.connection_termination_details.as_deref())
            }
            OpKind::UpstreamTransportFailureReason => {
                opt(r.upstream_transport_failure_reason.as_deref())
            }
            OpKind::BytesReceived => Value::Num(r.bytes_received),
            OpKind::BytesSent => Value::Num(r.bytes_sent),
            OpKind::Duration => Value::Num(r.duration),
            OpKind::UpstreamHost => opt(r.upstream_host.as_deref()),
            OpKind::UpstreamCluster => match r.upstream_cluster.as_deref() {
                Some(c) if !c.is_empty() => Value::Str(Cow::Owned(format!("{c};"))),
                _ => Value::Missing,
            },
            OpKind::UpstreamClusterRaw => opt(r.upstream_cluster.as_deref()),
            OpKind::UpstreamLocalAddress => opt(r.upstream_local_address.as_deref()),
            OpKind::DownstreamLocalAddress => opt(r.downstream_local_address.as_deref()),
            OpKind::DownstreamLocalAddressWithoutPort => opt(r
                .downstream_local_address
                .as_deref()
                .and_then(split_host_port)
                .map(|(h, _)| h)),
            OpKind::DownstreamLocalPort => opt(r
                .downstream_local_address
                .as_deref()
                .and_then(split_host_port)
                .map(|(_, p)| p)),
            OpKind::DownstreamRemoteAddress => opt(r.downstream_remote_address.as_deref()),
            OpKind::DownstreamRemoteAddressWithoutPort => opt(r
                .downstream_remote_address
                .as_deref()
                .and_then(split_host_port)
                .map(|(h, _)| h)),
            OpKind::DownstreamRemotePort => opt(r
                .downstream_remote_address
                .as_deref()
                .and_then(split_host_port)
                .map(|(_, p)| p)),
            OpKind::RequestedServerName => opt(r.requested_server_name.as_deref()),
            OpKind::RouteName => opt(r.route_name.as_deref()),
            OpKind::Hostname(h) => Value::Str(Cow::Borrowed(h)),
        }
    }
}

/// Parse a format string into text and operators. `%%` is a literal `%`.
fn parse_template(s: &str) -> Result<Template, String> {
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('%') {
        text.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(after) = rest.strip_prefix('%') {
            text.push('%');
            rest = after;
            continue;
        }
        let (op, after) = parse_op(rest)?;
        if !text.is_empty() {
            pieces.push(Piece::Text(std::mem::take(&mut text)));
        }
        pieces.push(Piece::Op(op));
        rest = after;
    }
    text.push_str(rest);
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    Ok(Template(pieces))
}

/// `NAME[(arg)][:N]%` at the start of `s` (after the opening `%`).
fn parse_op(s: &str) -> Result<(Op, &str), String> {
    let name_len = s
        .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
        .unwrap_or(s.len());
    let name = &s[..name_len];
    if name.is_empty() {
        return Err(format!(
            "a '%' that does not start a command operator (write %% for a literal '%'), at {:?}",
            s.chars().take(20).collect::<String>()
        ));
    }
    let mut rest = &s[name_len..];
    let mut arg = None;
    if let Some(inner) = rest.strip_prefix('(') {
        let close = inner
            .find(')')
            .ok_or_else(|| format!("operator %{name}(...% has no closing ')'"))?;
        arg = Some(&inner[..close]);
        rest = &inner[close + 1..];
    }
    let mut max_len = None;
    if let Some(after) = rest.strip_prefix(':') {
        let digits = after
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(after.len());
        let n: usize = after[..digits]
            .parse()
            .map_err(|_| format!("operator %{name}%: the length after ':' is not a number"))?;
        max_len = Some(n);
        rest = &after[digits..];
    }
    let Some(rest) = rest.strip_prefix('%') else {
        return Err(format!(
            "operator %{name}... is not closed by '%' (expected NAME, NAME(arg) or NAME(arg):N between '%'s)"
        ));
    };
    let no_arg = |kind: OpKind| -> Result<OpKind, String> {
        match arg {
            None => Ok(kind),
            Some(_) => Err(format!("operator %{name}% takes no argument")),
        }
    };
    let headers = |arg: Option<&str>| -> Result<Vec<String>, String> {
        let a = arg.ok_or_else(|| format!("operator %{name}(header)% needs a header name"))?;
        let names: Vec<String> = a
            .split('?')
            .map(|h| h.trim().to_ascii_lowercase())
            .collect();
        if names.is_empty() || names.len() > 2 || names.iter().any(String::is_empty) {
            return Err(format!(
                "operator %{name}({a})%: expected one header, or two as 'main?alternative'"
            ));
        }
        Ok(names)
    };
    let kind = match name {
        "START_TIME" => OpKind::StartTime(match arg {
            None | Some("") => None,
            Some(f) => Some(parse_time_format(f)?),
        }),
        "REQ" => OpKind::Req(headers(arg)?),
        "RESP" => OpKind::Resp(headers(arg)?),
        "PROTOCOL" => no_arg(OpKind::Protocol)?,
        "RESPONSE_CODE" => no_arg(OpKind::ResponseCode)?,
        "RESPONSE_FLAGS" => no_arg(OpKind::ResponseFlags)?,
        "RESPONSE_CODE_DETAILS" => no_arg(OpKind::ResponseCodeDetails)?,
        "CONNECTION_TERMINATION_DETAILS" => no_arg(OpKind::ConnectionTerminationDetails)?,
        "UPSTREAM_TRANSPORT_FAILURE_REASON" => no_arg(OpKind::UpstreamTransportFailureReason)?,
        "BYTES_RECEIVED" => no_arg(OpKind::BytesReceived)?,
        "BYTES_SENT" => no_arg(OpKind::BytesSent)?,
        "DURATION" => no_arg(OpKind::Duration)?,
        "UPSTREAM_HOST" => no_arg(OpKind::UpstreamHost)?,
        "UPSTREAM_CLUSTER" => no_arg(OpKind::UpstreamCluster)?,
        "UPSTREAM_CLUSTER_RAW" => no_arg(OpKind::UpstreamClusterRaw)?,
        "UPSTREAM_LOCAL_ADDRESS" => no_arg(OpKind::UpstreamLocalAddress)?,
        "DOWNSTREAM_LOCAL_ADDRESS" => no_arg(OpKind::DownstreamLocalAddress)?,
        "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => {
            no_arg(OpKind::DownstreamLocalAddressWithoutPort)?
        }
        "DOWNSTREAM_LOCAL_PORT" => no_arg(OpKind::DownstreamLocalPort)?,
        "DOWNSTREAM_REMOTE_ADDRESS" => no_arg(OpKind::DownstreamRemoteAddress)?,
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => {
            no_arg(OpKind::DownstreamRemoteAddressWithoutPort)?
        }
        "DOWNSTREAM_REMOTE_PORT" => no_arg(OpKind::DownstreamRemotePort)?,
        "REQUESTED_SERVER_NAME" => no_arg(OpKind::RequestedServerName)?,
        "ROUTE_NAME" => no_arg(OpKind::RouteName)?,
        "HOSTNAME" => no_arg(OpKind::Hostname(hostname()))?,
        other => {
            return Err(format!(
                "unknown or unsupported command operator %{other}%; this waypoint fills {SUPPORTED}"
            ));
        }
    };
    Ok((Op { kind, max_len }, rest))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "-".into())
}

fn parse_time_format(f: &str) -> Result<Vec<TimePart>, String> {
    let mut parts = Vec::new();
    let mut text = String::new();
    let mut chars = f.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            text.push(c);
            continue;
        }
        let part = match chars.next() {
            Some('%') => {
                text.push('%');
                continue;
            }
            Some('Y') => TimePart::Year,
            Some('m') => TimePart::Month,
            Some('d') => TimePart::Day,
            Some('H') => TimePart::Hour,
            Some('M') => TimePart::Minute,
            Some('S') => TimePart::Second,
            Some('s') => TimePart::EpochSeconds,
            Some('j') => TimePart::DayOfYear,
            Some('z') => TimePart::Zone,
            Some('f') => TimePart::Fraction(9),
            Some('E') => {
                let n = chars.next().and_then(|d| d.to_digit(10));
                match (n, chars.next()) {
                    (Some(n @ 1..=9), Some('S')) => TimePart::SecondFraction(n as u8),
                    _ => {
                        return Err(format!(
                            "START_TIME({f}): %E must be followed by a digit 1-9 and S"
                        ));
                    }
                }
            }
            Some(d @ '1'..='9') => match chars.next() {
                Some('f') => TimePart::Fraction(d.to_digit(10).unwrap_or(9) as u8),
                _ => return Err(format!("START_TIME({f}): %{d} must be followed by f")),
            },
            other => {
                return Err(format!(
                    "START_TIME({f}): unsupported specifier %{}; supported: %Y %m %d %H %M %S %s %j %z %f %<n>f %E<n>S %%",
                    other.map(String::from).unwrap_or_default()
                ));
            }
        };
        if !text.is_empty() {
            parts.push(TimePart::Text(std::mem::take(&mut text)));
        }
        parts.push(part);
    }
    if !text.is_empty() {
        parts.push(TimePart::Text(text));
    }
    Ok(parts)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's
/// `civil_from_days`).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn format_time(parts: &[TimePart], t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs() as i64;
    let nanos = since.subsec_nanos();
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil(days);
    let mut out = String::with_capacity(32);
    let fraction = |n: u8| {
        let digits = format!("{nanos:09}");
        digits[..n as usize].to_string()
    };
    for p in parts {
        let _ = match p {
            TimePart::Text(s) => write!(out, "{s}"),
            TimePart::Year => write!(out, "{y:04}"),
            TimePart::Month => write!(out, "{m:02}"),
            TimePart::Day => write!(out, "{d:02}"),
            TimePart::Hour => write!(out, "{:02}", sod / 3600),
            TimePart::Minute => write!(out, "{:02}", sod / 60 % 60),
            TimePart::Second => write!(out, "{:02}", sod % 60),
            TimePart::SecondFraction(n) => write!(out, "{:02}.{}", sod % 60, fraction(*n)),
            TimePart::Fraction(n) => write!(out, "{}", fraction(*n)),
            TimePart::EpochSeconds => write!(out, "{secs}"),
            TimePart::DayOfYear => {
                let (y0, _, _) = civil(days);
                let jan1 = days_from_civil(y0, 1, 1);
                write!(out, "{:03}", days - jan1 + 1)
            }
            // Envoy formats in UTC.
            TimePart::Zone => write!(out, "+0000"),
        };
    }
    out
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ResponseFlag, ResponseFlags};
    use std::time::Duration;

    fn record() -> AccessLogRecord {
        let mut r = AccessLogRecord::new(UNIX_EPOCH + Duration::from_millis(1_765_070_123_456));
        r.method = Some("GET".into());
        r.path = Some("/reviews/1?x=1".into());
        r.protocol = Some("HTTP/1.1");
        r.response_code = 200;
        r.response_code_details = Some("via_upstream".into());
        r.bytes_sent = 358;
        r.duration = 3;
        r.upstream_service_time = Some("2".into());
        r.user_agent = Some("curl/8.5.0".into());
        r.request_id = Some("3f1e-aa".into());
        r.authority = Some("reviews:9080".into());
        r.upstream_host = Some("envoy://connect_originate/10.1.0.5:9080".into());
        r.upstream_cluster = Some("inbound-vip|9080|http|reviews.default.svc.cluster.local".into());
        r.upstream_local_address = Some("envoy://internal_client_address/".into());
        r.downstream_local_address = Some("10.0.0.10:9080".into());
        r.downstream_remote_address = Some("10.1.0.7:52134".into());
        r.route_name = Some("default".into());
        r
    }

    fn line(f: &LogFormat, r: &AccessLogRecord) -> String {
        let mut out = Vec::new();
        f.render(r, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn istios_default_text_format_prints_as_envoy_does() {
        let f = LogFormat::text(ISTIO_TEXT_FORMAT).unwrap();
        assert_eq!(
            line(&f, &record()),
            "[2025-12-07T01:15:23.456Z] \"GET /reviews/1?x=1 HTTP/1.1\" 200 - via_upstream - \"-\" 0 358 3 2 \"-\" \"curl/8.5.0\" \"3f1e-aa\" \"reviews:9080\" \"envoy://connect_originate/10.1.0.5:9080\" inbound-vip|9080|http|reviews.default.svc.cluster.local envoy://internal_client_address/ 10.0.0.10:9080 10.1.0.7:52134 - default\n"
        );
        // A TCP record: no method, path or protocol; flags set.
        let mut tcp = AccessLogRecord::new(UNIX_EPOCH);
        tcp.response_flags = ResponseFlags::from(ResponseFlag::UF);
        assert_eq!(
            line(&f, &tcp),
            "[1970-01-01T00:00:00.000Z] \"- - -\" 0 UF - - \"-\" 0 0 0 - \"-\" \"-\" \"-\" \"-\" \"-\" - - - - - -\n"
        );
    }

    #[test]
    fn operators_headers_lengths_and_times() {
        let f = LogFormat::text(
            "%REQ(X-TENANT?X-ORG):4% %RESP(CONTENT-TYPE)% %REQ(:METHOD)% %UPSTREAM_CLUSTER% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %DOWNSTREAM_LOCAL_PORT% %START_TIME(%Y/%m/%d %H:%M:%E3S %s %j)% 100%%",
        )
        .unwrap();
        assert_eq!(f.request_headers(), vec!["x-tenant", "x-org"]);
        assert_eq!(f.response_headers(), vec!["content-type"]);
        let mut r = record();
        r.captured = Some(Box::new(CapturedHeaders {
            request: vec![("x-org".into(), "acme-corp".into())],
            response: vec![("content-type".into(), "text/plain".into())],
        }));
        assert_eq!(
            line(&f, &r),
            "acme text/plain GET inbound-vip|9080|http|reviews.default.svc.cluster.local; 10.1.0.7 9080 2025/12/07 01:15:23.456 1765070123 341 100%\n"
        );
    }

    #[test]
    fn json_formats_keep_types() {
        let f = LogFormat::json_text(
            r#"{"code":"%RESPONSE_CODE%","flags":"%RESPONSE_FLAGS%","sni":"%REQUESTED_SERVER_NAME%","who":"%REQ(:AUTHORITY)% via %UPSTREAM_HOST%","svc":{"t":"%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%"},"fixed":7}"#,
        )
        .unwrap();
        assert_eq!(
            line(&f, &record()),
            "{\"code\":200,\"fixed\":7,\"flags\":\"-\",\"sni\":null,\"svc\":{\"t\":\"2\"},\"who\":\"reviews:9080 via envoy://connect_originate/10.1.0.5:9080\"}\n"
        );
    }

    #[test]
    fn bad_formats_are_errors_naming_the_problem() {
        let e = LogFormat::text("%DYNAMIC_METADATA(istio.mixer:status)%").unwrap_err();
        assert!(e.contains("%DYNAMIC_METADATA%"), "{e}");
        assert!(LogFormat::text("100% done").unwrap_err().contains("%%"));
        assert!(LogFormat::text("%REQ%").unwrap_err().contains("header"));
        assert!(
            LogFormat::text("%PROTOCOL")
                .unwrap_err()
                .contains("not closed")
        );
        assert!(
            LogFormat::text("%START_TIME(%Q)%")
                .unwrap_err()
                .contains("%Q")
        );
        let e = LogFormat::json_text(r#"{"a":"%BOGUS%"}"#).unwrap_err();
        assert!(e.contains("key \"a\"") && e.contains("%BOGUS%"), "{e}");
        assert!(LogFormat::json_text("[1]").is_err());
        let many: String = (0..40).map(|i| format!("%REQ(X-H{i})% ")).collect();
        assert!(LogFormat::text(&many).unwrap_err().contains("at most"));
    }

    #[test]
    fn civil_dates_round_trip() {
        for days in [-1, 0, 59, 365, 10_957, 20_429, 2_932_896] {
            let (y, m, d) = civil(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(civil(20_429), (2025, 12, 7));
    }
}
