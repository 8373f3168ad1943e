//! HTTPRoute matching with Gateway API precedence, and weighted backend choice.
//! INTERFACE CONTRACT (the proxy crate is written against exactly these items; extend, do not rename).

use std::borrow::Cow;
use std::cmp::Reverse;
use std::sync::Arc;

use http::{HeaderMap, Method};

use crate::snapshot::Cluster;

/// How a string is compared.
#[derive(Debug, Clone)]
pub enum MatchKind {
    Exact(String),
    /// RE2-like, anchored over the whole value (Gateway API / Envoy `safe_regex` full match).
    Regex(regex::Regex),
}

/// A path match (Gateway API `HTTPPathMatch`).
#[derive(Debug, Clone)]
pub enum PathMatch {
    /// Case-sensitive exact path.
    Exact(String),
    /// Element-wise prefix on `/` boundaries; stored without a trailing `/` (except `/` itself).
    Prefix(String),
    /// Full-match regular expression.
    Regex(regex::Regex),
}

#[derive(Debug, Clone)]
pub struct HeaderMatch {
    /// Lower-case header name.
    pub name: http::HeaderName,
    pub value: MatchKind,
}

#[derive(Debug, Clone)]
pub struct QueryMatch {
    /// Exact, case-sensitive parameter name.
    pub name: String,
    pub value: MatchKind,
}

/// One `HTTPRouteMatch` (all conditions ANDed).
#[derive(Debug, Clone)]
pub struct RouteMatch {
    pub path: PathMatch,
    pub method: Option<Method>,
    pub headers: Vec<HeaderMatch>,
    pub query: Vec<QueryMatch>,
}

/// Where a request goes once a rule matched.
#[derive(Debug, Clone)]
pub enum Backend {
    /// A resolved Service port.
    Cluster(Arc<Cluster>),
    /// A backendRef that cannot be used (missing Service, unsupported kind, no such port, ...).
    /// Requests that draw it get Envoy's `cluster_not_found` answer: 500 with flag `NC`
    /// (Gateway API routes set cluster_not_found_response_code = 500, policy.md 3.5).
    Invalid { reason: Arc<str> },
}

/// One weighted backendRef (weight > 0; zero weights are dropped at compile time).
#[derive(Debug, Clone)]
pub struct BackendRef {
    pub backend: Backend,
    pub weight: u32,
}

/// The weighted backend set of a rule.
#[derive(Debug, Clone, Default)]
pub struct WeightedBackends {
    /// Non-zero-weight entries in declaration order.
    pub backends: Vec<BackendRef>,
    /// Sum of weights (u64: up to 1,000,000 per entry).
    pub total_weight: u64,
}

impl WeightedBackends {
    /// Pick a backend with probability weight/total, given a uniformly random `r` (any u64;
    /// reduced modulo `total_weight`). `None` when there is no non-zero weight: the caller
    /// answers 500 as Istio does for an all-zero-weight rule (policy.md 3.5).
    pub fn pick(&self, r: u64) -> Option<&BackendRef> {
        if self.total_weight == 0 {
            return None;
        }
        let mut x = r % self.total_weight;
        for b in &self.backends {
            let w = u64::from(b.weight);
            if x < w {
                return Some(b);
            }
            x -= w;
        }
        self.backends.last()
    }
}

/// One HTTPRoute rule as the data path needs it.
#[derive(Debug, Clone)]
pub struct RouteRule {
    /// `route_name` in the access log: the rule's `name`, else `<ns>.<route>.<ruleIndex>`
    /// (Istio conversion.go), as Envoy's `%ROUTE_NAME%` prints it.
    pub name: Arc<str>,
    pub backends: WeightedBackends,
}

/// All rules attached to one Service port, pre-sorted by Gateway API precedence.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// (match, index into `rules`), sorted so the first matching entry wins.
    pub(crate) entries: Vec<(RouteMatch, usize)>,
    pub(crate) rules: Vec<Arc<RouteRule>>,
}

impl RouteTable {
    /// The winning rule for a request, or `None` (-> 404 `route_not_found`, flag `NR`).
    /// `path` is the request path without the query; `query` the raw query string, if any.
    /// The path must already be normalized with [`normalize_path`].
    pub fn select(
        &self,
        method: &Method,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> Option<&Arc<RouteRule>> {
        // Decoded lazily: most tables have no query matches.
        let mut params: Option<Vec<(String, String)>> = None;
        self.entries
            .iter()
            .find(|(m, _)| m.matches(method, path, query, headers, &mut params))
            .and_then(|(_, i)| self.rules.get(*i))
    }

    /// Every (match, rule) entry in precedence order, with whether it matches the request and,
    /// when not, the first condition that failed (`waypoint explain`). The first entry whose
    /// result is `Ok` is the one [`RouteTable::select`] picks.
    pub fn explain(
        &self,
        method: &Method,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> Vec<MatchTrace> {
        let mut params: Option<Vec<(String, String)>> = None;
        self.entries
            .iter()
            .filter_map(|(m, i)| {
                let rule = self.rules.get(*i)?;
                Some(MatchTrace {
                    rule: rule.clone(),
                    description: m.describe(),
                    result: m.why_not(method, path, query, headers, &mut params),
                })
            })
            .collect()
    }

    /// Number of (match, rule) entries, for diagnostics.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Build a table from candidates in any order: sorted by [`Precedence`], rules shared by
    /// several matches stored once.
    pub(crate) fn build(mut candidates: Vec<(Precedence, RouteMatch, Arc<RouteRule>)>) -> Self {
        candidates.sort_by(|a, b| a.0.cmp(&b.0));
        let mut table = RouteTable::default();
        for (_, m, rule) in candidates {
            let index = match table.rules.iter().position(|r| Arc::ptr_eq(r, &rule)) {
                Some(i) => i,
                None => {
                    table.rules.push(rule);
                    table.rules.len() - 1
                }
            };
            table.entries.push((m, index));
        }
        table
    }
}

/// One entry of [`RouteTable::explain`].
#[derive(Debug, Clone)]
pub struct MatchTrace {
    pub rule: Arc<RouteRule>,
    /// The match as written: `PathPrefix /reviews, method GET, header x-env=canary`.
    pub description: String,
    /// `Err(condition that failed)`.
    pub result: Result<(), String>,
}

/// Sort key implementing Gateway API HTTPRoute precedence (`httproute_types.go`,
/// `HTTPRouteRule.Matches`; policy.md 3.2). Smaller sorts first, i.e. wins.
/// Regex precedence is implementation-specific: we rank it below every prefix, as Istio does.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Precedence {
    /// Exact(3) > Prefix(2) > Regex(1).
    pub path_rank: Reverse<u8>,
    /// More characters in the path value first.
    pub path_len: Reverse<usize>,
    pub has_method: Reverse<bool>,
    pub headers: Reverse<usize>,
    pub query: Reverse<usize>,
    /// `(absent, creationTimestamp)`: oldest first, absent counts as newest. RFC 3339
    /// timestamps from the API server (`Z`, whole seconds) compare correctly as strings.
    pub created: (bool, String),
    /// `namespace/name` alphabetical.
    pub route: String,
    /// Rule order, then match order, within one route.
    pub rule: usize,
    pub matched: usize,
}

impl Precedence {
    /// Key for one match of rule `rule` in route `namespace/name`.
    pub(crate) fn new(
        m: &RouteMatch,
        created: Option<&str>,
        route: String,
        rule: usize,
        matched: usize,
    ) -> Self {
        let (rank, len) = match &m.path {
            PathMatch::Exact(p) => (3, p.len()),
            PathMatch::Prefix(p) => (2, p.len()),
            PathMatch::Regex(r) => (1, r.as_str().len()),
        };
        Precedence {
            path_rank: Reverse(rank),
            path_len: Reverse(len),
            has_method: Reverse(m.method.is_some()),
            headers: Reverse(m.headers.len()),
            query: Reverse(m.query.len()),
            created: (created.is_none(), created.unwrap_or_default().to_string()),
            route,
            rule,
            matched,
        }
    }
}

impl MatchKind {
    fn matches(&self, value: &str) -> bool {
        match self {
            MatchKind::Exact(v) => v == value,
            MatchKind::Regex(r) => r.is_match(value),
        }
    }
}

impl PathMatch {
    /// Whether a normalized request path matches.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => p == path,
            // Element-wise (Envoy `path_separated_prefix`): `/abc` matches `/abc`, `/abc/`,
            // `/abc/def`, never `/abcd`.
            PathMatch::Prefix(p) => {
                p == "/"
                    || path
                        .strip_prefix(p.as_str())
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
            PathMatch::Regex(r) => r.is_match(path),
        }
    }
}

impl MatchKind {
    fn describe(&self) -> String {
        match self {
            MatchKind::Exact(v) => format!("={v}"),
            MatchKind::Regex(r) => format!("~{}", unanchor(r.as_str())),
        }
    }
}

/// The regex as written (compiled ones are wrapped in `^(?:...)$`).
fn unanchor(r: &str) -> &str {
    r.strip_prefix("^(?:")
        .and_then(|r| r.strip_suffix(")$"))
        .unwrap_or(r)
}

impl RouteMatch {
    /// The match as Gateway API spells it.
    pub fn describe(&self) -> String {
        let mut parts = vec![match &self.path {
            PathMatch::Exact(p) => format!("Exact {p}"),
            PathMatch::Prefix(p) => format!("PathPrefix {p}"),
            PathMatch::Regex(r) => format!("RegularExpression {}", unanchor(r.as_str())),
        }];
        if let Some(m) = &self.method {
            parts.push(format!("method {m}"));
        }
        for h in &self.headers {
            parts.push(format!("header {}{}", h.name, h.value.describe()));
        }
        for q in &self.query {
            parts.push(format!("query {}{}", q.name, q.value.describe()));
        }
        parts.join(", ")
    }

    /// `Ok` when the request matches, else the first condition that failed.
    fn why_not(
        &self,
        method: &Method,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
        params: &mut Option<Vec<(String, String)>>,
    ) -> Result<(), String> {
        if !self.path.matches(path) {
            let kind = match &self.path {
                PathMatch::Exact(_) => "Exact",
                PathMatch::Prefix(_) => "PathPrefix",
                PathMatch::Regex(_) => "RegularExpression",
            };
            return Err(format!("path {path} does not match {kind}"));
        }
        if let Some(m) = self.method.as_ref().filter(|m| *m != method) {
            return Err(format!("method {method} is not {m}"));
        }
        for h in &self.headers {
            if !header_matches(h, headers) {
                return Err(match headers.get(&h.name) {
                    None => format!("header {} is absent", h.name),
                    Some(v) => format!(
                        "header {}: {:?} does not match {}",
                        h.name,
                        String::from_utf8_lossy(v.as_bytes()),
                        h.value.describe()
                    ),
                });
            }
        }
        if self.query.is_empty() {
            return Ok(());
        }
        let params = params.get_or_insert_with(|| parse_query(query.unwrap_or("")));
        for q in &self.query {
            match params.iter().find(|(name, _)| *name == q.name) {
                None => return Err(format!("query parameter {} is absent", q.name)),
                Some((_, v)) if !q.value.matches(v) => {
                    return Err(format!(
                        "query parameter {}: {v:?} does not match {}",
                        q.name,
                        q.value.describe()
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    fn matches(
        &self,
        method: &Method,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
        params: &mut Option<Vec<(String, String)>>,
    ) -> bool {
        if !self.path.matches(path) {
            return false;
        }
        if self.method.as_ref().is_some_and(|m| m != method) {
            return false;
        }
        if !self.headers.iter().all(|h| header_matches(h, headers)) {
            return false;
        }
        if self.query.is_empty() {
            return true;
        }
        let params = params.get_or_insert_with(|| parse_query(query.unwrap_or("")));
        self.query.iter().all(|q| {
            // Repeated parameters are undefined in Gateway API; the first one counts.
            params
                .iter()
                .find(|(name, _)| *name == q.name)
                .is_some_and(|(_, v)| q.value.matches(v))
        })
    }
}

/// A header condition. Repeated request headers are joined with `,` (RFC 7230 3.2.2), as
/// Envoy's header matcher sees them.
fn header_matches(h: &HeaderMatch, headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(&h.name).iter();
    let Some(first) = values.next() else {
        return false;
    };
    let mut joined: Cow<'_, [u8]> = Cow::Borrowed(first.as_bytes());
    for v in values {
        let buf = joined.to_mut();
        buf.push(b',');
        buf.extend_from_slice(v.as_bytes());
    }
    match &h.value {
        MatchKind::Exact(v) => v.as_bytes() == &*joined,
        MatchKind::Regex(r) => std::str::from_utf8(&joined).is_ok_and(|s| r.is_match(s)),
    }
}

/// Split a raw query string into percent-decoded `(name, value)` pairs (`+` is kept as is:
/// this is a URI query, not a form body).
fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(name), percent_decode(value))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    if !s.contains('%') {
        return s.to_string();
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = hex_pair(bytes, i + 1)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The byte encoded by two hex digits at `bytes[i..i + 2]`, if any.
fn hex_pair(bytes: &[u8], i: usize) -> Option<u8> {
    let hi = (*bytes.get(i)? as char).to_digit(16)?;
    let lo = (*bytes.get(i + 1)? as char).to_digit(16)?;
    u8::try_from(hi * 16 + lo).ok()
}

/// Envoy `normalize_path: true` with `merge_slashes: false` and escaped slashes kept (Istio's
/// default `BASE` pathNormalization, protocol.md 2.6): RFC 3986 dot-segment removal, plus the
/// canonicalisation Envoy applies (percent-encoded unreserved characters decoded, remaining
/// escapes upper-cased, `\` treated as `/`). Returns `Err(())` for a path Envoy rejects with
/// 400 (not starting with `/`, or a `..` that climbs above the root is clamped, not rejected).
/// Idempotent: `normalize_path(normalize_path(p)) == normalize_path(p)`.
///
/// Also rejected: `%00` (Istio's normalization page: 400). A `%` not followed by two hex
/// digits is re-encoded as `%25`, so decoding can never create a new escape on a second pass.
#[allow(clippy::result_unit_err)]
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, ()> {
    if !path.starts_with('/') {
        return Err(());
    }
    if !path.bytes().any(|b| matches!(b, b'%' | b'.' | b'\\')) {
        return Ok(Cow::Borrowed(path));
    }
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            match hex_pair(bytes, i + 1) {
                Some(0) => return Err(()),
                Some(c) if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') => {
                    decoded.push(char::from(c));
                }
                Some(c) => {
                    decoded.push_str(&format!("%{c:02X}"));
                }
                None => {
                    decoded.push_str("%25");
                    i += 1;
                    continue;
                }
            }
            i += 3;
            continue;
        }
        // Copy the whole UTF-8 run up to the next special byte.
        let end = bytes[i..]
            .iter()
            .position(|&b| b == b'%' || b == b'\\')
            .map_or(bytes.len(), |n| i + n);
        if b == b'\\' {
            decoded.push('/');
            i += 1;
        } else {
            decoded.push_str(&path[i..end]);
            i = end;
        }
    }
    let normalized = remove_dot_segments(&decoded);
    if normalized == path {
        Ok(Cow::Borrowed(path))
    } else {
        Ok(Cow::Owned(normalized))
    }
}

/// RFC 3986 5.2.4 for an absolute path: `.` segments vanish, `..` removes the previous
/// segment (clamped at the root); a trailing `.`/`..` leaves a trailing `/`. Empty segments
/// (`//`) are kept: BASE normalization does not merge slashes.
fn remove_dot_segments(path: &str) -> String {
    let rest = path.strip_prefix('/').unwrap_or(path);
    let segments: Vec<&str> = rest.split('/').collect();
    let last = segments.len().saturating_sub(1);
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, seg) in segments.into_iter().enumerate() {
        match seg {
            "." => {}
            ".." => {
                out.pop();
            }
            s => {
                out.push(s);
                continue;
            }
        }
        if i == last {
            out.push("");
        }
    }
    let mut result = String::with_capacity(path.len());
    for seg in out {
        result.push('/');
        result.push_str(seg);
    }
    if result.is_empty() {
        result.push('/');
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn regex(s: &str) -> regex::Regex {
        regex::Regex::new(&format!("^(?:{s})$")).expect("regex")
    }

    fn all() -> RouteMatch {
        RouteMatch {
            path: PathMatch::Prefix("/".into()),
            method: None,
            headers: Vec::new(),
            query: Vec::new(),
        }
    }

    fn one_rule(m: RouteMatch) -> RouteTable {
        let rule = Arc::new(RouteRule {
            name: "r".into(),
            backends: WeightedBackends::default(),
        });
        RouteTable {
            entries: vec![(m, 0)],
            rules: vec![rule],
        }
    }

    fn hits(t: &RouteTable, path: &str, query: Option<&str>, headers: &[(&str, &str)]) -> bool {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                http::HeaderValue::from_str(v).expect("value"),
            );
        }
        t.select(&Method::GET, path, query, &map).is_some()
    }

    #[test]
    fn prefix_matches_on_segment_boundaries() {
        let p = PathMatch::Prefix("/abc".into());
        for (path, want) in [
            ("/abc", true),
            ("/abc/", true),
            ("/abc/def", true),
            ("/abcd", false),
            ("/ab", false),
            ("/", false),
        ] {
            assert_eq!(p.matches(path), want, "{path}");
        }
        assert!(PathMatch::Prefix("/".into()).matches("/anything/at/all"));
    }

    #[test]
    fn exact_and_regex_paths_match_whole_path() {
        let e = PathMatch::Exact("/abc".into());
        assert!(
            e.matches("/abc") && !e.matches("/abc/") && !e.matches("/Abc") && !e.matches("/abcd")
        );
        let r = PathMatch::Regex(regex("/v[0-9]+"));
        assert!(r.matches("/v12") && !r.matches("/v12/x") && !r.matches("/x/v1"));
    }

    #[test]
    fn method_must_be_equal() {
        let t = one_rule(RouteMatch {
            method: Some(Method::POST),
            ..all()
        });
        assert!(!hits(&t, "/", None, &[]));
        let m = HeaderMap::new();
        assert!(t.select(&Method::POST, "/", None, &m).is_some());
    }

    #[test]
    fn header_names_are_case_insensitive_and_repeats_are_joined() {
        let exact = one_rule(RouteMatch {
            headers: vec![HeaderMatch {
                name: http::HeaderName::from_static("x-env"),
                value: MatchKind::Exact("a,b".into()),
            }],
            ..all()
        });
        assert!(hits(&exact, "/", None, &[("X-Env", "a"), ("x-env", "b")]));
        assert!(!hits(&exact, "/", None, &[("x-env", "a")]));
        assert!(!hits(&exact, "/", None, &[]));
        let re = one_rule(RouteMatch {
            headers: vec![HeaderMatch {
                name: http::HeaderName::from_static("x-env"),
                value: MatchKind::Regex(regex("pr.d")),
            }],
            ..all()
        });
        assert!(hits(&re, "/", None, &[("x-env", "prod")]));
        assert!(!hits(&re, "/", None, &[("x-env", "prod-1")]));
    }

    #[test]
    fn query_params_are_decoded_first_wins_and_names_are_exact() {
        let t = one_rule(RouteMatch {
            query: vec![QueryMatch {
                name: "a b".into(),
                value: MatchKind::Exact("x+y/z".into()),
            }],
            ..all()
        });
        assert!(hits(&t, "/", Some("a%20b=x+y%2Fz"), &[]));
        assert!(hits(&t, "/", Some("other=1&a%20b=x+y/z&a%20b=nope"), &[]));
        assert!(!hits(&t, "/", Some("a%20b=nope&a%20b=x+y/z"), &[]));
        assert!(!hits(&t, "/", Some("A%20B=x+y/z"), &[]));
        assert!(!hits(&t, "/", None, &[]));
        let flag = one_rule(RouteMatch {
            query: vec![QueryMatch {
                name: "debug".into(),
                value: MatchKind::Exact(String::new()),
            }],
            ..all()
        });
        assert!(hits(&flag, "/", Some("debug"), &[]));
        let re = one_rule(RouteMatch {
            query: vec![QueryMatch {
                name: "v".into(),
                value: MatchKind::Regex(regex("[0-9]+")),
            }],
            ..all()
        });
        assert!(hits(&re, "/", Some("v=42"), &[]) && !hits(&re, "/", Some("v=4x"), &[]));
    }

    fn weighted(weights: &[u32]) -> WeightedBackends {
        WeightedBackends {
            backends: weights
                .iter()
                .map(|w| BackendRef {
                    backend: Backend::Invalid {
                        reason: format!("w{w}").into(),
                    },
                    weight: *w,
                })
                .collect(),
            total_weight: weights.iter().map(|w| u64::from(*w)).sum(),
        }
    }

    fn picked(wb: &WeightedBackends, r: u64) -> u32 {
        wb.pick(r).map_or(0, |b| b.weight)
    }

    #[test]
    fn pick_distributes_by_weight() {
        let wb = weighted(&[90, 10]);
        let counts = (0..100u64).fold([0, 0], |mut acc, r| {
            acc[usize::from(picked(&wb, r) == 10)] += 1;
            acc
        });
        assert_eq!(counts, [90, 10]);
        assert_eq!(picked(&wb, 89), 90);
        assert_eq!(picked(&wb, 90), 10);
        assert_eq!(picked(&wb, 190), 10);
        assert_eq!(picked(&wb, u64::MAX), 90); // u64::MAX % 100 == 15
        assert!(WeightedBackends::default().pick(3).is_none());
    }

    #[test]
    fn normalize_path_table() {
        let cases = [
            ("/", Some("/")),
            ("/a/b", Some("/a/b")),
            ("/a.html", Some("/a.html")),
            ("/public/./data/abc/../xyz", Some("/public/data/xyz")),
            ("/a/b/..", Some("/a/")),
            ("/a/.", Some("/a/")),
            ("/..", Some("/")),
            ("/../../a", Some("/a")),
            ("/a//b", Some("/a//b")),
            ("/a//../b", Some("/a/b")),
            ("/a\\b\\..\\c", Some("/a/c")),
            ("/%61%2d%7E", Some("/a-~")),
            ("/%2e%2E/x", Some("/x")),
            ("/a%2fb", Some("/a%2Fb")),
            ("/a%2Fb/%5c", Some("/a%2Fb/%5C")),
            ("/%zz/%4", Some("/%25zz/%254")),
            ("/%%34%31", Some("/%2541")),
            ("/...", Some("/...")),
            ("/é/../ü", Some("/ü")),
            ("/a%00", None),
            ("a/b", None),
            ("", None),
            ("*", None),
        ];
        for (input, want) in cases {
            assert_eq!(
                normalize_path(input)
                    .ok()
                    .map(|c| c.into_owned())
                    .as_deref(),
                want,
                "{input}"
            );
        }
        assert!(matches!(normalize_path("/a/b.c"), Ok(Cow::Borrowed(_))));
        assert!(matches!(normalize_path("/a/%2F"), Ok(Cow::Borrowed(_))));
    }

    proptest! {
        #[test]
        fn normalize_path_is_idempotent(p in "/[a-c/.%\\\\0-9A-Fa-f~_-]{0,24}") {
            if let Ok(once) = normalize_path(&p) {
                let twice = normalize_path(&once).map(Cow::into_owned);
                prop_assert_eq!(twice.as_deref(), Ok(&*once));
                prop_assert!(matches!(normalize_path(&once), Ok(Cow::Borrowed(_))));
            }
        }
    }
}
