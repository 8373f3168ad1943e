//! The compiled conditions of an AuthorizationPolicy rule, shaped like the Envoy RBAC config
//! istiod generates for a waypoint (`pilot/pkg/security/authz/model`), and their evaluation.
//!
//! A [`Field`] is one attribute of a rule (`principals`, `methods`, one `when` key, ...): "values
//! are ORed; `notValues` become NOT(OR(notValues)); both present = AND of the two" (Istio
//! `model.go`, `rule.permission/principal`). A [`Clause`] ANDs fields: one `from[].source` or one
//! `to[].operation`, plus the rule's `when` conditions.

use std::net::IpAddr;

use http::HeaderName;
use ipnet::IpNet;
use regex::Regex;
use serde_json::Value;

use super::{AuthzRequest, HttpAttrs};

/// An Envoy `StringMatcher` as Istio's `matcher.StringMatcher*` builds it.
#[derive(Debug, Clone)]
pub(crate) enum StrMatch {
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    /// Istio turns a lone `*` into the regex `.+` ("matches when value is not empty").
    NonEmpty,
    /// A full-match regex (Envoy `safe_regex` matches the whole value).
    Regex(Regex),
}

impl StrMatch {
    /// Istio `StringMatcher(v)`: "`*` becomes regex `.+`; a leading `*` is a suffix match; a
    /// trailing `*` a prefix match; else exact". Only one wildcard position is recognised.
    pub(crate) fn istio(v: &str) -> StrMatch {
        if v == "*" {
            StrMatch::NonEmpty
        } else if let Some(rest) = v.strip_prefix('*') {
            StrMatch::Suffix(rest.into())
        } else if let Some(rest) = v.strip_suffix('*') {
            StrMatch::Prefix(rest.into())
        } else {
            StrMatch::Exact(v.into())
        }
    }

    /// Istio `StringMatcherWithPrefix(v, prefix)`, used for principals with `spiffe://`: the
    /// prefix is ignored for `*`; a leading `*` becomes the regex `<prefix>.*<rest>` (the rest is
    /// *not* escaped, exactly as Istio writes it); a trailing `*` a prefix match.
    pub(crate) fn istio_with_prefix(v: &str, prefix: &str) -> Result<StrMatch, String> {
        Ok(if v == "*" {
            StrMatch::NonEmpty
        } else if let Some(rest) = v.strip_prefix('*') {
            StrMatch::Regex(full_regex(&format!("{}.*{rest}", regex::escape(prefix)))?)
        } else if let Some(rest) = v.strip_suffix('*') {
            StrMatch::Prefix(format!("{prefix}{rest}").into())
        } else {
            StrMatch::Exact(format!("{prefix}{v}").into())
        })
    }

    pub(crate) fn matches(&self, s: &str) -> bool {
        match self {
            StrMatch::Exact(v) => s == &**v,
            StrMatch::Prefix(v) => s.starts_with(&**v),
            StrMatch::Suffix(v) => s.ends_with(&**v),
            // `.+` in full-match mode: at least one character, none of them a newline.
            StrMatch::NonEmpty => !s.is_empty() && !s.contains('\n'),
            StrMatch::Regex(r) => r.is_match(s),
        }
    }
}

/// An anchored regex: Envoy `safe_regex` (RE2) matches the whole value.
pub(crate) fn full_regex(pattern: &str) -> Result<Regex, String> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| format!("invalid regular expression: {e}"))
}

/// An Envoy `HeaderMatcher` as Istio's `matcher.HeaderMatcher`/`HostMatcher` build it: `*` is
/// `present_match`, otherwise an exact/prefix/suffix string match on the header value (with
/// repeated headers joined by `,`). `ignore_case` only for hosts.
#[derive(Debug, Clone)]
pub(crate) struct HeaderValueMatch {
    kind: HeaderKind,
    ignore_case: bool,
}

#[derive(Debug, Clone)]
enum HeaderKind {
    Present,
    Exact(Box<[u8]>),
    Prefix(Box<[u8]>),
    Suffix(Box<[u8]>),
}

impl HeaderValueMatch {
    pub(crate) fn istio(v: &str, ignore_case: bool) -> HeaderValueMatch {
        let kind = if v == "*" {
            HeaderKind::Present
        } else if let Some(rest) = v.strip_prefix('*') {
            HeaderKind::Suffix(rest.as_bytes().into())
        } else if let Some(rest) = v.strip_suffix('*') {
            HeaderKind::Prefix(rest.as_bytes().into())
        } else {
            HeaderKind::Exact(v.as_bytes().into())
        };
        HeaderValueMatch { kind, ignore_case }
    }

    /// `value` is `None` when the header is absent: only `present_match` cares, and an absent
    /// header never matches any form.
    fn matches(&self, value: Option<&[u8]>) -> bool {
        let Some(value) = value else { return false };
        let eq = |a: &[u8], b: &[u8]| {
            if self.ignore_case {
                a.eq_ignore_ascii_case(b)
            } else {
                a == b
            }
        };
        match &self.kind {
            HeaderKind::Present => true,
            HeaderKind::Exact(v) => eq(value, v),
            HeaderKind::Prefix(v) => value.len() >= v.len() && eq(&value[..v.len()], v),
            HeaderKind::Suffix(v) => {
                value.len() >= v.len() && eq(&value[value.len() - v.len()..], v)
            }
        }
    }
}

/// Which request header a header condition reads. Envoy keeps `Host` as the `:authority`
/// pseudo-header (and resolves a lookup of `host` to it), so both are read from
/// [`HttpAttrs::host`].
#[derive(Debug, Clone)]
pub(crate) enum HeaderSource {
    Authority,
    Method,
    Named(HeaderName),
}

/// A `paths` value: Envoy `url_path` string match, or a URI template (`{*}`, `{**}`).
#[derive(Debug, Clone)]
pub(crate) enum PathMatch {
    String(StrMatch),
    Template(Regex),
}

/// One condition on one request attribute.
#[derive(Debug, Clone)]
pub(crate) enum Check {
    /// `io.istio.peer_principal` (the HBONE peer's SPIFFE URI): `principals`, `namespaces`,
    /// `serviceAccounts`, `source.principal`, `source.namespace`, `source.serviceAccount`.
    PeerPrincipal(StrMatch),
    /// Envoy `direct_remote_ip`: `ipBlocks`, `source.ip`.
    SourceIp(IpNet),
    /// Envoy `remote_ip`: `remoteIpBlocks`, `remote.ip`.
    RemoteIp(IpNet),
    /// `destination.ip`.
    DestIp(IpNet),
    /// `ports`, `destination.port`.
    DestPort(u16),
    /// `connection.sni`. The waypoint's inner HTTP connection carries no TLS (the HBONE
    /// CONNECT is terminated first), so the requested server name is always empty there.
    Sni(StrMatch),
    /// `hosts`, `methods`, `request.headers[...]`.
    Header {
        source: HeaderSource,
        value: HeaderValueMatch,
    },
    /// `request.experimental.inline.headers[...]`: one element of the `,`-joined value matches
    /// (Istio `HeaderMatcherWithRegex`); `None` = present.
    InlineHeader {
        source: HeaderSource,
        regex: Option<regex::bytes::Regex>,
    },
    /// `paths`.
    Path(PathMatch),
    /// `requestPrincipals`, `request.auth.principal`: JWT `iss` and `sub` claims.
    RequestPrincipal { iss: StrMatch, sub: StrMatch },
    /// `request.auth.audiences` (`aud`), `request.auth.presenter` (`azp`),
    /// `request.auth.claims[a][b]`: the claim at `path` is a string that matches, or a list with
    /// a string element that matches.
    Claim {
        path: Box<[Box<str>]>,
        value: StrMatch,
    },
}

impl Check {
    /// Whether this condition needs HTTP attributes (Istio's generators return "is HTTP only"
    /// for hosts, methods, paths, requestPrincipals, request.headers and request.auth.*).
    pub(crate) fn http_only(&self) -> bool {
        matches!(
            self,
            Check::Header { .. }
                | Check::InlineHeader { .. }
                | Check::Path(_)
                | Check::RequestPrincipal { .. }
                | Check::Claim { .. }
        )
    }

    fn matches(&self, req: &AuthzRequest<'_>) -> bool {
        match self {
            Check::PeerPrincipal(m) => req.source_principal.is_some_and(|p| m.matches(p)),
            Check::SourceIp(net) => ip_in(*net, req.source_ip),
            Check::RemoteIp(net) => ip_in(*net, req.remote_ip),
            Check::DestIp(net) => ip_in(*net, req.dest_ip),
            Check::DestPort(p) => req.dest_port == *p,
            Check::Sni(m) => m.matches(""),
            Check::Header { source, value } => req
                .http
                .as_ref()
                .is_some_and(|h| with_header(h, source, |v| value.matches(v))),
            Check::InlineHeader { source, regex } => req.http.as_ref().is_some_and(|h| {
                with_header(h, source, |v| match (v, regex) {
                    (None, _) => false,
                    (Some(_), None) => true,
                    (Some(v), Some(r)) => r.is_match(v),
                })
            }),
            Check::Path(m) => req.http.as_ref().is_some_and(|h| match m {
                PathMatch::String(s) => s.matches(h.path),
                PathMatch::Template(r) => r.is_match(h.path),
            }),
            Check::RequestPrincipal { iss, sub } => req
                .http
                .as_ref()
                .and_then(jwt_issuer_subject)
                .is_some_and(|(i, s)| iss.matches(i) && sub.matches(s)),
            Check::Claim { path, value } => req
                .http
                .as_ref()
                .and_then(|h| h.request_auth)
                .and_then(|claims| claim_at(claims, path))
                .is_some_and(|claim| match claim {
                    Value::String(s) => value.matches(s),
                    Value::Array(items) => items
                        .iter()
                        .any(|i| i.as_str().is_some_and(|s| value.matches(s))),
                    _ => false,
                }),
        }
    }
}

/// Envoy compares an address with a CIDR range of the same family only. IPv4-mapped IPv6
/// addresses are compared as IPv4, as Envoy reports them on dual-stack sockets.
fn ip_in(net: IpNet, ip: Option<IpAddr>) -> bool {
    ip.is_some_and(|ip| net.contains(&ip.to_canonical()))
}

/// Call `f` with the header's value as Envoy's header matcher sees it: all values of a repeated
/// header joined with `,`; `None` when absent. `:authority` absent = empty host.
fn with_header<R>(
    h: &HttpAttrs<'_>,
    source: &HeaderSource,
    f: impl FnOnce(Option<&[u8]>) -> R,
) -> R {
    match source {
        HeaderSource::Authority => f((!h.host.is_empty()).then_some(h.host.as_bytes())),
        HeaderSource::Method => f(Some(h.method.as_bytes())),
        HeaderSource::Named(name) => {
            let mut values = h.headers.get_all(name).iter();
            let Some(first) = values.next() else {
                return f(None);
            };
            let Some(second) = values.next() else {
                return f(Some(first.as_bytes()));
            };
            let mut joined = first.as_bytes().to_vec();
            for v in std::iter::once(second).chain(values) {
                joined.push(b',');
                joined.extend_from_slice(v.as_bytes());
            }
            f(Some(&joined))
        }
    }
}

/// The JWT `iss` and `sub` of the request: from the verified claims when present, else from
/// `request_principal` (`<iss>/<sub>`, split at the last `/` as Istio splits policy values).
fn jwt_issuer_subject<'a>(h: &HttpAttrs<'a>) -> Option<(&'a str, &'a str)> {
    if let Some(claims) = h.request_auth {
        let iss = claims.get("iss")?.as_str()?;
        let sub = claims.get("sub")?.as_str()?;
        return Some((iss, sub));
    }
    h.request_principal?.rsplit_once('/')
}

/// Envoy metadata matcher path walk: every segment must name a field of an object.
fn claim_at<'v>(claims: &'v Value, path: &[Box<str>]) -> Option<&'v Value> {
    path.iter()
        .try_fold(claims, |v, key| v.as_object()?.get(&**key))
}

/// One attribute condition: "values are ORed; notValues become NOT(OR(notValues)); both
/// present = AND of the two".
#[derive(Debug, Clone)]
pub(crate) struct Field {
    pub(crate) any_of: Vec<Check>,
    pub(crate) none_of: Vec<Check>,
    /// Any check needs HTTP attributes (all checks of a field read the same attribute).
    pub(crate) http_only: bool,
}

impl Field {
    pub(crate) fn new(any_of: Vec<Check>, none_of: Vec<Check>) -> Field {
        let http_only = any_of.iter().chain(&none_of).any(Check::http_only);
        Field {
            any_of,
            none_of,
            http_only,
        }
    }

    fn matches(&self, req: &AuthzRequest<'_>) -> bool {
        (self.any_of.is_empty() || self.any_of.iter().any(|c| c.matches(req)))
            && !self.none_of.iter().any(|c| c.matches(req))
    }
}

/// Fields ANDed; no fields = any.
#[derive(Debug, Clone, Default)]
pub(crate) struct Clause {
    pub(crate) fields: Vec<Field>,
}

impl Clause {
    /// On TCP (`req.http` is `None`) an HTTP-only field is skipped: "For DENY/AUDIT, the
    /// HTTP-only part is ignored and the rest of the rule kept". ALLOW rules using one never get
    /// here on TCP (see [`super::Rule`]).
    pub(crate) fn matches(&self, req: &AuthzRequest<'_>) -> bool {
        let tcp = req.http.is_none();
        self.fields
            .iter()
            .all(|f| (tcp && f.http_only) || f.matches(req))
    }

    pub(crate) fn http_only(&self) -> bool {
        self.fields.iter().any(|f| f.http_only)
    }
}
