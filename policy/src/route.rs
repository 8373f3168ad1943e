//! HTTPRoute matching with Gateway API precedence, and weighted backend choice.
//! INTERFACE CONTRACT (the proxy crate is written against exactly these items; extend, do not rename).

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

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
    /// backendRef-level filters (Istio supports the header modifiers and RequestMirror here,
    /// as Envoy weighted-cluster `request_headers_to_add`/`response_headers_to_add`).
    pub filters: Arc<Filters>,
}

/// `RequestHeaderModifier` / `ResponseHeaderModifier`: `set` overwrites, `add` appends
/// (Envoy `append_action: APPEND_IF_EXISTS_OR_ADD`, i.e. a second header line), `remove`
/// deletes. Applied in the order set, add, remove as Envoy's header mutation does.
#[derive(Debug, Clone, Default)]
pub struct HeaderModifier {
    pub set: Vec<(http::HeaderName, http::HeaderValue)>,
    pub add: Vec<(http::HeaderName, http::HeaderValue)>,
    pub remove: Vec<http::HeaderName>,
}

impl HeaderModifier {
    /// Apply to a header map.
    pub fn apply(&self, h: &mut HeaderMap) {
        for (n, v) in &self.set {
            h.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            h.append(n.clone(), v.clone());
        }
        for n in &self.remove {
            h.remove(n);
        }
    }
}

/// How a path is rewritten (`URLRewrite.path` or `RequestRedirect.path`).
#[derive(Debug, Clone)]
pub enum PathModifier {
    /// `ReplaceFullPath`: the whole path (the query string is kept, as Envoy's
    /// `regex_rewrite` of `/.*` keeps it).
    Full(String),
    /// `ReplacePrefixMatch`: the matched PathPrefix is replaced element-wise. Stored
    /// without a trailing `/` (Istio `createRewriteFilter`); empty = strip the prefix.
    Prefix(String),
}

impl PathModifier {
    /// The new path for `path` (no query), given the PathPrefix that matched (`None` when
    /// the match was not a prefix, which compile rejects for `Prefix`).
    pub fn apply(&self, path: &str, matched_prefix: Option<&str>) -> String {
        match self {
            PathModifier::Full(p) => p.clone(),
            PathModifier::Prefix(replacement) => {
                let prefix = matched_prefix.unwrap_or("/");
                // `/` as the matched prefix: everything is the remainder.
                let rest = if prefix == "/" {
                    path
                } else {
                    path.strip_prefix(prefix).unwrap_or(path)
                };
                // Gateway API table: `/foo/bar` with `/foo` -> `/xyz` gives `/xyz/bar`,
                // `/foo` gives `/xyz`, `/foo/` gives `/xyz/`; an empty replacement strips
                // (`/foo/bar` -> `/bar`, `/foo` -> `/`).
                let mut out = String::with_capacity(replacement.len() + rest.len() + 1);
                out.push_str(replacement);
                if rest.is_empty() {
                    if out.is_empty() {
                        out.push('/');
                    }
                } else if rest.starts_with('/') {
                    out.push_str(rest);
                } else {
                    out.push('/');
                    out.push_str(rest);
                }
                out
            }
        }
    }
}

/// `RequestRedirect`: answered by the waypoint itself (Envoy route `redirect`).
#[derive(Debug, Clone)]
pub struct Redirect {
    /// `http` or `https`; `None` keeps the request's scheme.
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    /// Explicit port; else the scheme's well-known port when a scheme is set (Istio
    /// `FROM_PROTOCOL_DEFAULT`), else the request's port (`FROM_REQUEST_PORT`).
    pub port: Option<u16>,
    pub path: Option<PathModifier>,
    /// 301 or 302 (default), 303, 307, 308.
    pub status: u16,
}

/// `URLRewrite`.
#[derive(Debug, Clone, Default)]
pub struct Rewrite {
    /// New `Host`/`:authority` (Envoy `host_rewrite_literal`).
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

/// `RequestMirror`: a copy of the request goes to `cluster`; its response is discarded.
#[derive(Debug, Clone)]
pub struct Mirror {
    pub cluster: Arc<Cluster>,
    /// Share of requests mirrored, as numerator/denominator (`percent` p = p/100;
    /// `fraction`; default 100%).
    pub numerator: u32,
    pub denominator: u32,
}

impl Mirror {
    /// Whether this request is mirrored, given a uniformly random `r`.
    pub fn sampled(&self, r: u64) -> bool {
        self.denominator > 0 && r % u64::from(self.denominator) < u64::from(self.numerator)
    }
}

/// The filters of a rule (or of a backendRef).
#[derive(Debug, Clone, Default)]
pub struct Filters {
    pub request_headers: Option<HeaderModifier>,
    pub response_headers: Option<HeaderModifier>,
    pub redirect: Option<Redirect>,
    pub rewrite: Option<Rewrite>,
    pub mirrors: Vec<Mirror>,
}

impl Filters {
    pub fn is_empty(&self) -> bool {
        self.request_headers.is_none()
            && self.response_headers.is_none()
            && self.redirect.is_none()
            && self.rewrite.is_none()
            && self.mirrors.is_empty()
    }
}

/// Retry policy of a route (protocol.md 2.6, policy.md 3.7). Istio's waypoint default when the
/// route has no `retry`: 2 retries on `connect-failure,refused-stream,unavailable,cancelled,
/// retriable-status-codes` with no status codes, other hosts preferred.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (Envoy `num_retries`).
    pub retries: u32,
    /// `retriable_status_codes` (Gateway API `retry.codes`).
    pub codes: Vec<u16>,
    /// Base back-off (Envoy default 25 ms; Gateway API `retry.backoff`).
    pub backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            retries: 2,
            codes: Vec::new(),
            backoff: Duration::from_millis(25),
        }
    }
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
#[derive(Debug, Clone, Default)]
pub struct RouteRule {
    /// `route_name` in the access log: the rule's `name`, else `<ns>.<route>.<ruleIndex>`
    /// (Istio conversion.go), as Envoy's `%ROUTE_NAME%` prints it.
    pub name: Arc<str>,
    pub backends: WeightedBackends,
    /// Rule-level filters.
    pub filters: Filters,
    /// `timeouts.request`: whole-request deadline (Envoy route `timeout`); `None` = none,
    /// Istio's default (`timeout: 0s`).
    pub request_timeout: Option<Duration>,
    /// `timeouts.backendRequest` as a per-try timeout (Istio: only when the rule has a
    /// `retry` stanza; otherwise it became `request_timeout` at compile time).
    pub per_try_timeout: Option<Duration>,
    /// `None` = retries disabled (Gateway API `retry.attempts: 0`: Istio emits no policy).
    pub retry: Option<RetryPolicy>,
    /// gRPC route (GRPCRoute): local replies are sent as gRPC status.
    pub grpc: bool,
}

/// The TCPRoute that applies to a TCP Service port: weighted TCP backends. An invalid
/// backend (or all weights zero) rejects the connection, as Istio's dummy
/// `internal.cluster.local` destination does (policy.md 3.8).
#[derive(Debug, Clone, Default)]
pub struct TcpRouteRule {
    /// Rule `name`, else `<ns>.<route>.0`.
    pub name: Arc<str>,
    pub backends: WeightedBackends,
}

/// TLSRoutes on one TCP Service port, matched on the ClientHello SNI as Envoy matches
/// filter-chain `server_names` (Istio maps TLSRoute `hostnames` to `sniHosts`): an exact name
/// first, then the longest `*.` wildcard suffix, then a route without hostnames; ties go to
/// the oldest route, then `namespace/name`.
#[derive(Debug, Clone, Default)]
pub struct TlsRoutes {
    /// (lower-case host names, `*.x` kept as written; empty = any SNI, rule), in route order.
    pub(crate) routes: Vec<(Vec<String>, Arc<TcpRouteRule>)>,
}

impl TlsRoutes {
    /// The route for this SNI (`None` when the client sent none), if any.
    pub fn select(&self, sni: Option<&str>) -> Option<&Arc<TcpRouteRule>> {
        let sni = sni.map(str::to_ascii_lowercase);
        // (rank: 2 exact, 1 wildcard, 0 catch-all; wildcard suffix length).
        let mut best: Option<((u8, usize), &Arc<TcpRouteRule>)> = None;
        for (hosts, rule) in &self.routes {
            let score = if hosts.is_empty() {
                Some((0, 0))
            } else {
                sni.as_deref().and_then(|sni| {
                    hosts
                        .iter()
                        .filter_map(|h| match h.strip_prefix('*') {
                            // `*.example.com` matches `a.example.com` (and deeper), never
                            // `example.com` itself.
                            Some(suffix) => (sni.len() > suffix.len() && sni.ends_with(suffix))
                                .then_some((1, suffix.len())),
                            None => (h == sni).then_some((2, 0)),
                        })
                        .max()
                })
            };
            if let Some(score) = score
                && best.as_ref().is_none_or(|(b, _)| score > *b)
            {
                best = Some((score, rule));
            }
        }
        best.map(|(_, r)| r)
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

/// All rules attached to one Service port, pre-sorted by Gateway API precedence, with an
/// index so a request only tests the entries whose path can match.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// (match, index into `rules`), sorted so the first matching entry wins.
    pub(crate) entries: Vec<(RouteMatch, usize)>,
    pub(crate) rules: Vec<Arc<RouteRule>>,
    /// Entry indices (ascending) by Exact path.
    exact: HashMap<Box<str>, Vec<u32>>,
    /// Entry indices (ascending) by PathPrefix value (no trailing `/`, except `/`).
    prefix: HashMap<Box<str>, Vec<u32>>,
    /// Entry indices (ascending) of RegularExpression paths.
    regex: Vec<u32>,
    /// The same regexes as one set, so a request runs one automaton instead of one per
    /// rule (`None` if the set would exceed the regex size limits: test them one by one).
    regex_set: Option<regex::RegexSet>,
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
        self.select_match(method, path, query, headers)
            .map(|(_, rule)| rule)
    }

    /// Like [`RouteTable::select`], also returning the match that won (URLRewrite
    /// `ReplacePrefixMatch` needs the matched prefix).
    ///
    /// Uses the index: entries are sorted so that every Exact path precedes every prefix,
    /// longer prefixes precede shorter ones and regexes come last (see [`Precedence`]). So
    /// the candidates, visited as "Exact entries for this path, then the prefix entries
    /// for each ancestor of the path from the longest to `/`, then the regexes", each
    /// bucket ascending, are visited in global precedence order: the first that matches
    /// is the same winner as [`RouteTable::select_linear`] finds.
    pub fn select_match(
        &self,
        method: &Method,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> Option<(&RouteMatch, &Arc<RouteRule>)> {
        let mut params: Option<Vec<(String, String)>> = None;
        let mut test = |bucket: &[u32]| -> Option<usize> {
            bucket.iter().map(|&i| i as usize).find(|&i| {
                self.entries
                    .get(i)
                    .is_some_and(|(m, _)| m.matches_rest(method, query, headers, &mut params))
            })
        };
        let mut found = None;
        if let Some(b) = self.exact.get(path) {
            found = test(b);
        }
        if found.is_none() && !self.prefix.is_empty() {
            // Ancestors of the path on `/` boundaries, longest first: the path itself
            // (prefix `/a/b` matches `/a/b`), then the part before each `/` from the right.
            let bytes = path.as_bytes();
            let mut end = path.len();
            loop {
                let candidate = &path[..end];
                if !candidate.is_empty()
                    && candidate != "/"
                    && let Some(b) = self.prefix.get(candidate)
                    && let Some(i) = test(b)
                {
                    found = Some(i);
                    break;
                }
                match bytes[..end].iter().rposition(|&c| c == b'/') {
                    Some(p) if p > 0 => end = p,
                    _ => break,
                }
            }
            if found.is_none()
                && let Some(b) = self.prefix.get("/")
            {
                found = test(b);
            }
        }
        if found.is_none() && !self.regex.is_empty() {
            let hits = self.regex_set.as_ref().map(|set| set.matches(path));
            found = self
                .regex
                .iter()
                .enumerate()
                .filter(|(k, _)| hits.as_ref().is_none_or(|h| h.matched(*k)))
                .map(|(_, &i)| i as usize)
                .find(|&i| {
                    self.entries.get(i).is_some_and(|(m, _)| {
                        (hits.is_some() || m.path.matches(path))
                            && m.matches_rest(method, query, headers, &mut params)
                    })
                });
        }
        let (m, rule) = self.entries.get(found?)?;
        Some((m, self.rules.get(*rule)?))
    }

    /// The reference implementation: test every entry in precedence order. Same answer as
    /// [`RouteTable::select`] (proved by a property test); kept for tests and benches.
    pub fn select_linear(
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
        table.index();
        table
    }

    /// Build the path index over `entries` (already sorted).
    fn index(&mut self) {
        self.exact.clear();
        self.prefix.clear();
        self.regex.clear();
        self.regex_set = None;
        for (i, (m, _)) in self.entries.iter().enumerate() {
            let Ok(i) = u32::try_from(i) else { break };
            match &m.path {
                PathMatch::Exact(p) => self.exact.entry(p.as_str().into()).or_default().push(i),
                PathMatch::Prefix(p) => self.prefix.entry(p.as_str().into()).or_default().push(i),
                PathMatch::Regex(_) => self.regex.push(i),
            }
        }
        let patterns =
            self.regex
                .iter()
                .filter_map(|&i| match &self.entries.get(i as usize)?.0.path {
                    PathMatch::Regex(r) => Some(r.as_str().to_string()),
                    _ => None,
                });
        self.regex_set = if self.regex.len() > 1 {
            regex::RegexSet::new(patterns).ok()
        } else {
            None
        };
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
        self.path.matches(path) && self.matches_rest(method, query, headers, params)
    }

    /// Everything but the path.
    fn matches_rest(
        &self,
        method: &Method,
        query: Option<&str>,
        headers: &HeaderMap,
        params: &mut Option<Vec<(String, String)>>,
    ) -> bool {
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

/// `%XX` decoded (invalid escapes kept as they are), lossy UTF-8: query parameters for route
/// matching and JWT `fromParams` alike.
pub(crate) fn percent_decode(s: &str) -> String {
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
/// Istio MeshConfig `pathNormalization.normalization` (policy.md 1.8): how request paths are
/// normalized before routing and authorization; the normalized path is also what the
/// backend receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PathNormalization {
    /// Envoy `normalize_path: false`: the path is used as received.
    None,
    /// Istio's default (`DEFAULT` = `BASE`): see [`normalize_path`].
    #[default]
    Base,
    /// `BASE` plus `merge_slashes` (`//` -> `/`).
    MergeSlashes,
    /// `%2F`/`%5C` decoded first (UNESCAPE_AND_FORWARD), then `MERGE_SLASHES`.
    DecodeAndMergeSlashes,
}

impl PathNormalization {
    /// From the MeshConfig enum name (`NONE`, `BASE`, `DEFAULT`, `MERGE_SLASHES`,
    /// `DECODE_AND_MERGE_SLASHES`).
    pub fn parse(s: &str) -> Option<PathNormalization> {
        Some(match s {
            "NONE" => PathNormalization::None,
            "BASE" | "DEFAULT" | "" => PathNormalization::Base,
            "MERGE_SLASHES" => PathNormalization::MergeSlashes,
            "DECODE_AND_MERGE_SLASHES" => PathNormalization::DecodeAndMergeSlashes,
            _ => return None,
        })
    }
}

/// Normalize `path` with `mode` (Envoy's order: unescape slashes, RFC 3986 normalization,
/// then slash merging). `Err(())`: the request is rejected with 400.
#[allow(clippy::result_unit_err)]
pub fn normalize_path_with(path: &str, mode: PathNormalization) -> Result<Cow<'_, str>, ()> {
    match mode {
        PathNormalization::None => Ok(Cow::Borrowed(path)),
        PathNormalization::Base => normalize_path(path),
        PathNormalization::MergeSlashes => Ok(merge_slashes(normalize_path(path)?)),
        PathNormalization::DecodeAndMergeSlashes => {
            let unescaped = unescape_slashes(path);
            let normalized = normalize_path(&unescaped)?.into_owned();
            Ok(Cow::Owned(
                merge_slashes(Cow::Owned(normalized)).into_owned(),
            ))
        }
    }
}

fn merge_slashes(p: Cow<'_, str>) -> Cow<'_, str> {
    if !p.contains("//") {
        return p;
    }
    let mut out = String::with_capacity(p.len());
    for c in p.chars() {
        if c == '/' && out.ends_with('/') {
            continue;
        }
        out.push(c);
    }
    Cow::Owned(out)
}

/// `%2F`/`%2f` -> `/`, `%5C`/`%5c` -> `\` (which normalization then turns into `/`).
fn unescape_slashes(p: &str) -> Cow<'_, str> {
    if !p.contains('%') {
        return Cow::Borrowed(p);
    }
    let mut out = String::with_capacity(p.len());
    let mut rest = p;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let esc = rest.get(i..i + 3).unwrap_or("");
        match esc {
            "%2F" | "%2f" => out.push('/'),
            "%5C" | "%5c" => out.push('\\'),
            _ => {
                out.push('%');
                rest = &rest[i + 1..];
                continue;
            }
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

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
            ..RouteRule::default()
        });
        let mut t = RouteTable {
            entries: vec![(m, 0)],
            rules: vec![rule],
            ..RouteTable::default()
        };
        t.index();
        t
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
                    filters: Arc::default(),
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

    #[test]
    fn replace_prefix_match_follows_the_gateway_api_table() {
        let xyz = PathModifier::Prefix("/xyz".into());
        let strip = PathModifier::Prefix(String::new());
        for (m, path, prefix, want) in [
            (&xyz, "/foo/bar", "/foo", "/xyz/bar"),
            (&xyz, "/foo", "/foo", "/xyz"),
            (&xyz, "/foo/", "/foo", "/xyz/"),
            (&xyz, "/anything", "/", "/xyz/anything"),
            (&strip, "/foo/bar", "/foo", "/bar"),
            (&strip, "/foo", "/foo", "/"),
            (&strip, "/foo/", "/foo", "/"),
        ] {
            assert_eq!(m.apply(path, Some(prefix)), want, "{path} - {prefix}");
        }
        assert_eq!(
            PathModifier::Full("/one".into()).apply("/x/y", None),
            "/one"
        );
    }

    /// A random match over a small alphabet so that paths collide often.
    fn arb_match() -> impl Strategy<Value = RouteMatch> {
        let path = prop_oneof![
            "(/[ab]{1,2}){0,3}"
                .prop_map(|p| { PathMatch::Prefix(if p.is_empty() { "/".into() } else { p }) }),
            "(/[ab]{1,2}){1,3}/?".prop_map(PathMatch::Exact),
            Just(PathMatch::Regex(regex("/a.*"))),
            Just(PathMatch::Regex(regex("/[ab]+/b"))),
        ];
        let method = prop_oneof![
            Just(None),
            Just(Some(Method::GET)),
            Just(Some(Method::POST))
        ];
        let header = prop_oneof![
            Just(Vec::new()),
            Just(vec![HeaderMatch {
                name: http::HeaderName::from_static("x"),
                value: MatchKind::Exact("1".into()),
            }]),
        ];
        let query = prop_oneof![
            Just(Vec::new()),
            Just(vec![QueryMatch {
                name: "q".into(),
                value: MatchKind::Exact("1".into()),
            }]),
        ];
        (path, method, header, query).prop_map(|(path, method, headers, query)| RouteMatch {
            path,
            method,
            headers,
            query,
        })
    }

    /// Build a table from (route index, rule index, match) as the compiler does.
    fn table_of(matches: &[(usize, Vec<RouteMatch>)]) -> RouteTable {
        let mut candidates = Vec::new();
        for (i, (route, ms)) in matches.iter().enumerate() {
            let rule = Arc::new(RouteRule {
                name: format!("rule{i}").into(),
                ..RouteRule::default()
            });
            // Two routes: `a` older than `b` in half the cases.
            let created = (route % 2 == 0).then_some("2024-01-01T00:00:00Z");
            for (j, m) in ms.iter().enumerate() {
                let key = Precedence::new(m, created, format!("default/r{route}"), i, j);
                candidates.push((key, m.clone(), rule.clone()));
            }
        }
        RouteTable::build(candidates)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// The index never changes the answer: same winner as testing every entry in order.
        #[test]
        fn indexed_select_equals_linear_scan(
            rules in proptest::collection::vec(
                (0usize..3, proptest::collection::vec(arb_match(), 1..3)), 1..12),
            path in "(/[ab]{1,2}){0,4}/?",
            post in any::<bool>(),
            header in any::<bool>(),
            query in any::<bool>(),
        ) {
            let t = table_of(&rules);
            let path = if path.is_empty() { "/".to_string() } else { path };
            let method = if post { Method::POST } else { Method::GET };
            let mut h = HeaderMap::new();
            if header {
                h.insert("x", http::HeaderValue::from_static("1"));
            }
            let q = query.then_some("q=1");
            let fast = t.select(&method, &path, q, &h).map(|r| r.name.clone());
            let slow = t.select_linear(&method, &path, q, &h).map(|r| r.name.clone());
            prop_assert_eq!(fast, slow);
        }
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

#[cfg(test)]
mod normalization_modes {
    use super::*;

    #[test]
    fn each_mesh_path_normalization_mode_behaves_as_istio_documents() {
        use PathNormalization::*;
        let cases = [
            ("/a//b/../c", None, "/a//b/../c"),
            ("/a//b/../c", Base, "/a//c"),
            ("/a//b/../c", MergeSlashes, "/a/c"),
            ("/a%2Fb/./c", Base, "/a%2Fb/c"),
            ("/a%2Fb//c", DecodeAndMergeSlashes, "/a/b/c"),
            ("/a%5cb", DecodeAndMergeSlashes, "/a/b"),
            ("/%61dmin", Base, "/admin"),
        ];
        for (input, mode, want) in cases {
            assert_eq!(
                normalize_path_with(input, mode).unwrap(),
                want,
                "{input} {mode:?}"
            );
        }
        assert_eq!(PathNormalization::parse("DEFAULT"), Some(Base));
        assert_eq!(PathNormalization::parse("bogus"), Option::None);
    }
}
