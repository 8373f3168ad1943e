//! # Istio AuthorizationPolicy for a waypoint: compiled policies and request evaluation
//!
//! Contract:
//! - [`crate::compile`] validates every `security.istio.io` AuthorizationPolicy (as Istio's
//!   admission webhook does) and attaches the ones with `targetRefs` to this waypoint:
//!   `Gateway` (this waypoint, same namespace) and `GatewayClass istio-waypoint` (root namespace)
//!   policies apply to all traffic; `Service` policies to that Service's traffic only
//!   (`policy.md` 1.11). "Waypoint proxies are required to use `targetRefs` for policies to
//!   apply; `selector` policies will be ignored" (`authorization_policy.proto`): those get a
//!   warning.
//! - The data path asks [`crate::Snapshot::authz_for`] (or reads [`crate::ServicePort::authz`])
//!   for the [`AuthzSet`] of the Service a request is for, fills an [`AuthzRequest`], and calls
//!   [`evaluate`]. Sets are merged and sorted at compile time, so a request only walks the
//!   rules that apply to its Service.
//! - [`evaluate`] reproduces the Envoy filters istiod configures, in their order: CUSTOM, then
//!   RBAC with action LOG (AUDIT), DENY, ALLOW. "If any DENY policy matches, deny; if the
//!   workload has no ALLOW policy, allow; if any ALLOW policy matches, allow; otherwise deny.
//!   AUDIT never changes allow/deny." A denial carries Envoy's response details
//!   `rbac_access_denied_matched_policy[<rule id>|none]`.
//! - Pure: no I/O, no clocks; never panics.

mod compile;
mod matcher;

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use http::HeaderMap;
use serde_json::Value;

use matcher::Clause;

pub(crate) use compile::{Attached, TargetIndex, Targets, attach, compile_policies};

/// Annotation that turns a policy into a dry run (Envoy shadow rules; never enforced).
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// The `action` of an AuthorizationPolicy. "Default `action` is ALLOW."
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Deny,
    Audit,
    Custom,
}

impl Action {
    /// The name as written in the API (`ALLOW`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
            Action::Custom => "CUSTOM",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One compiled AuthorizationPolicy.
#[derive(Debug)]
pub struct AuthzPolicy {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub action: Action,
    /// `istio.io/dry-run: "true"`: evaluated as Envoy shadow rules, never enforced. CUSTOM
    /// policies ignore it, as Istio's do ("dry-run CUSTOM policies still call ext_authz").
    pub dry_run: bool,
    /// The extension provider of a CUSTOM policy.
    pub provider: Option<Arc<str>>,
    /// One per `spec.rules[]` entry, in order. Empty for `spec: {}` (matches nothing).
    pub rules: Vec<Arc<Rule>>,
}

/// One compiled `spec.rules[i]`, named the way Envoy reports it.
#[derive(Debug)]
pub struct Rule {
    /// `ns[<ns>]-policy[<name>]-rule[<i>]` (Istio `builder.go` `policyName`); CUSTOM rules are
    /// prefixed `istio-ext-authz-<provider>-`.
    pub id: Arc<str>,
    /// The id reported when this CUSTOM rule denies for lack of a usable provider:
    /// `<id>-deny-due-to-bad-CUSTOM-action` (Istio `getBadCustomDenyRules`). Same as `id`
    /// for other actions.
    deny_id: Arc<str>,
    action: Action,
    provider: Option<Arc<str>>,
    /// ORed; empty = any source.
    from: Vec<Clause>,
    /// ORed; empty = any operation.
    to: Vec<Clause>,
    /// ANDed into the rule.
    when: Clause,
    /// Any field needs HTTP attributes.
    uses_http: bool,
}

impl Rule {
    /// "A rule matches when (some `from`) AND (some `to`) AND (all `when`)". On TCP, "for
    /// ALLOW, an HTTP-only field on a TCP chain makes that rule be dropped (narrower allow, more
    /// denials). For DENY/AUDIT, the HTTP-only part is ignored and the rest of the rule kept
    /// (wider deny)" (Istio `model.go` `checkError`). CUSTOM rules are built as DENY.
    pub fn matches(&self, req: &AuthzRequest<'_>) -> bool {
        if req.http.is_none() && self.uses_http && self.action == Action::Allow {
            return false;
        }
        (self.from.is_empty() || self.from.iter().any(|c| c.matches(req)))
            && (self.to.is_empty() || self.to.iter().any(|c| c.matches(req)))
            && self.when.matches(req)
    }

    pub fn action(&self) -> Action {
        self.action
    }
}

/// What the data path knows about a request (or a TCP connection: `http` is `None`).
#[derive(Debug, Clone, Copy)]
pub struct AuthzRequest<'a> {
    /// The HBONE peer identity, full SPIFFE URI (`spiffe://cluster.local/ns/x/sa/y`), Istio's
    /// `io.istio.peer_principal`. `None` matches no `principals`/`namespaces`/`serviceAccounts`.
    pub source_principal: Option<&'a str>,
    /// Envoy `direct_remote_ip` (`ipBlocks`, `source.ip`): the client address of the CONNECT.
    pub source_ip: Option<IpAddr>,
    /// Envoy `remote_ip` (`remoteIpBlocks`, `remote.ip`): from X-Forwarded-For or proxy
    /// protocol when trusted, else the same as `source_ip`.
    pub remote_ip: Option<IpAddr>,
    /// The address the client dialled (the CONNECT target) (`destination.ip`).
    pub dest_ip: Option<IpAddr>,
    /// The port the client dialled (the Service port) (`ports`, `destination.port`).
    pub dest_port: u16,
    /// HTTP attributes; `None` for TCP traffic.
    pub http: Option<HttpAttrs<'a>>,
}

/// The HTTP attributes of a request.
#[derive(Debug, Clone, Copy)]
pub struct HttpAttrs<'a> {
    /// `:method`.
    pub method: &'a str,
    /// The normalised path without the query string (Envoy's `url_path`).
    pub path: &'a str,
    /// `:authority` (HTTP/2) or `Host` (HTTP/1); empty when absent.
    pub host: &'a str,
    pub headers: &'a HeaderMap,
    /// `<iss>/<sub>` of a verified JWT; used only when `request_auth` is `None`.
    pub request_principal: Option<&'a str>,
    /// The verified JWT payload (Envoy `jwt_authn` `payload_in_metadata`); `None` when the
    /// request carried no token. Source of `requestPrincipals` (`iss`, `sub`) and
    /// `request.auth.*`.
    pub request_auth: Option<&'a Value>,
}

/// The outcome of [`evaluate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The rule that decided: the matching DENY (or CUSTOM) rule of a denial, the matching
    /// ALLOW rule of an allow; `None` for "no ALLOW policy matched" and for "no policy applies".
    pub matched_policy: Option<Arc<str>>,
    /// Envoy `%RESPONSE_CODE_DETAILS%` of a denial:
    /// `rbac_access_denied_matched_policy[<id>]` or `rbac_access_denied_matched_policy[none]`;
    /// empty when allowed. A denial is answered `403` with body `RBAC: access denied`.
    pub details: String,
    /// The AUDIT rule that matched (Envoy sets `access_log_hint`); never affects `allowed`.
    pub audit: Option<Arc<str>>,
    /// What the dry-run policies would have decided (for logs), when any applies and was
    /// reached.
    pub dry_run: Option<DryRun>,
    /// A CUSTOM rule matched and its provider could not be used, so the request is denied,
    /// as Istio denies when a policy's provider cannot be resolved (see [`evaluate`]).
    pub custom: Option<CustomMatch>,
}

/// The would-be result of the dry-run (`istio.io/dry-run`) policies, as Envoy's shadow rules
/// report it (stats prefixes `istio_dry_run_deny_` and `istio_dry_run_allow_`). Dry-run DENY
/// rules are evaluated whenever the enforced DENY filter is reached; dry-run ALLOW rules only
/// when the request passed the enforced DENY rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DryRun {
    pub allowed: bool,
    /// The dry-run rule that matched (`None` for "no dry-run ALLOW rule matched").
    pub matched_policy: Option<Arc<str>>,
}

/// A CUSTOM policy rule that matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomMatch {
    pub provider: Arc<str>,
    /// The rule id (`istio-ext-authz-<provider>-ns[..]-policy[..]-rule[..]`).
    pub policy: Arc<str>,
    /// The id Istio gives this rule when it has to deny instead of calling the provider:
    /// `<policy>-deny-due-to-bad-CUSTOM-action` (Istio `getBadCustomDenyRules`).
    pub deny_id: Arc<str>,
    /// The CUSTOM policies for this traffic name more than one provider. Istio then builds
    /// deny rules for all of them ("only 1 provider can be used per workload", `builder.go`,
    /// unless `PILOT_ENABLE_MULTIPLE_CUSTOM_AUTHZ_PROVIDERS`).
    pub conflicting_providers: bool,
}

impl CustomMatch {
    /// The RBAC denial Istio configures when the provider cannot be used (unknown provider,
    /// wrong provider type, several providers): `403 RBAC: access denied`, details
    /// `rbac_access_denied_matched_policy[<id>-deny-due-to-bad-CUSTOM-action]`.
    pub fn bad_provider_denial(&self) -> Decision {
        let mut d = Decision::deny(Some(self.deny_id.clone()));
        d.custom = Some(self.clone());
        d
    }
}

impl Decision {
    fn allow(matched_policy: Option<Arc<str>>) -> Decision {
        Decision {
            allowed: true,
            matched_policy,
            details: String::new(),
            audit: None,
            dry_run: None,
            custom: None,
        }
    }

    fn deny(matched_policy: Option<Arc<str>>) -> Decision {
        let details = format!(
            "rbac_access_denied_matched_policy[{}]",
            matched_policy.as_deref().unwrap_or("none")
        );
        Decision {
            allowed: false,
            matched_policy,
            details,
            audit: None,
            dry_run: None,
            custom: None,
        }
    }
}

impl PolicySet {
    fn policies_custom_providers<'p>(
        &self,
        policies: &'p [Arc<AuthzPolicy>],
    ) -> impl Iterator<Item = &'p Arc<str>> {
        policies
            .iter()
            .filter(|p| p.action == Action::Custom)
            .filter_map(|p| p.provider.as_ref())
    }
}

/// The policies that apply to one Service's traffic, split by action, each list sorted by rule
/// id. Envoy keeps an RBAC filter's policies in a `std::map` and reports the first that matches,
/// so the lowest id wins when several match.
#[derive(Debug, Default)]
struct PolicySet {
    policies: Vec<Arc<AuthzPolicy>>,
    custom: Vec<Arc<Rule>>,
    audit: Vec<Arc<Rule>>,
    deny: Vec<Arc<Rule>>,
    allow: Vec<Arc<Rule>>,
    /// An enforced ALLOW policy applies (even one with no rules: it allows nothing).
    has_allow: bool,
    dry_deny: Vec<Arc<Rule>>,
    has_dry_deny: bool,
    dry_allow: Vec<Arc<Rule>>,
    has_dry_allow: bool,
    /// More than one distinct provider among the CUSTOM policies.
    conflicting_providers: bool,
}

/// The authorization policies that apply to one Service behind this waypoint. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct AuthzSet(Arc<PolicySet>);

impl AuthzSet {
    fn new(mut policies: Vec<Arc<AuthzPolicy>>) -> AuthzSet {
        policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        policies.dedup_by(|a, b| Arc::ptr_eq(a, b));
        let mut set = PolicySet::default();
        for p in &policies {
            let (list, present) = match (p.action, p.dry_run) {
                (Action::Custom, _) => (&mut set.custom, None),
                (Action::Audit, false) => (&mut set.audit, None),
                // Envoy's shadow engine never sets `access_log_hint`: a dry-run AUDIT policy
                // has no effect at all.
                (Action::Audit, true) => continue,
                (Action::Deny, false) => (&mut set.deny, None),
                (Action::Deny, true) => (&mut set.dry_deny, Some(&mut set.has_dry_deny)),
                (Action::Allow, false) => (&mut set.allow, Some(&mut set.has_allow)),
                (Action::Allow, true) => (&mut set.dry_allow, Some(&mut set.has_dry_allow)),
            };
            list.extend(p.rules.iter().cloned());
            if let Some(present) = present {
                *present = true;
            }
        }
        for list in [
            &mut set.custom,
            &mut set.audit,
            &mut set.deny,
            &mut set.allow,
            &mut set.dry_deny,
            &mut set.dry_allow,
        ] {
            list.sort_by(|a, b| a.id.cmp(&b.id));
        }
        let mut providers: Vec<&Arc<str>> = set.policies_custom_providers(&policies).collect();
        providers.sort();
        providers.dedup();
        set.conflicting_providers = providers.len() > 1;
        set.policies = policies;
        AuthzSet(Arc::new(set))
    }

    /// No policy applies: every request is allowed without looking at it.
    pub fn is_empty(&self) -> bool {
        self.0.policies.is_empty()
    }

    /// The policies in this set, sorted by namespace and name.
    pub fn policies(&self) -> &[Arc<AuthzPolicy>] {
        &self.0.policies
    }
}

/// Policies attached to this waypoint: waypoint-wide (Gateway and GatewayClass targets), and
/// per Service (merged with the waypoint-wide ones at compile time), keyed by namespace then
/// name so a lookup with `&str` needs no allocation.
#[derive(Debug, Default)]
pub(crate) struct AuthzIndex {
    pub(crate) waypoint: AuthzSet,
    pub(crate) by_service: HashMap<Arc<str>, HashMap<Arc<str>, AuthzSet>>,
    /// Every policy that applies somewhere, sorted by namespace and name.
    pub(crate) policies: Vec<Arc<AuthzPolicy>>,
}

impl AuthzIndex {
    pub(crate) fn for_service(&self, namespace: &str, name: &str) -> AuthzSet {
        self.by_service
            .get(namespace)
            .and_then(|m| m.get(name))
            .unwrap_or(&self.waypoint)
            .clone()
    }
}

/// The first rule of a sorted list that matches.
fn first_match<'r>(rules: &'r [Arc<Rule>], req: &AuthzRequest<'_>) -> Option<&'r Arc<Rule>> {
    rules.iter().find(|r| r.matches(req))
}

/// Decide a request the way the waypoint's Envoy filter chain does: CUSTOM (RBAC + ext_authz),
/// then RBAC with action LOG (AUDIT), DENY and ALLOW filters, each stopping the chain when it
/// denies. This is the decision for traffic where no extension provider can be called (TCP,
/// or no usable provider): a matching CUSTOM rule denies with
/// `<id>-deny-due-to-bad-CUSTOM-action` and [`Decision::custom`] names it. HTTP requests with
/// a usable provider use [`custom_match`], then the provider, then [`evaluate_rbac`].
///
/// - CUSTOM: "CUSTOM cannot override ALLOW/DENY: a request passes only if every action lets it
///   pass".
/// - AUDIT "marks a request for auditing; it does not affect allow/deny".
/// - DENY: "if any DENY policy matches, deny".
/// - ALLOW: "if the workload has no ALLOW policy, allow; if any ALLOW policy matches, allow;
///   otherwise deny" (details `rbac_access_denied_matched_policy[none]`).
/// - Dry-run policies only fill [`Decision::dry_run`].
pub fn evaluate(set: &AuthzSet, req: &AuthzRequest<'_>) -> Decision {
    match custom_match(set, req) {
        Some(m) => m.bad_provider_denial(),
        None => evaluate_rbac(set, req),
    }
}

/// The CUSTOM stage alone: the first CUSTOM rule (by id) that matches, whose provider Envoy's
/// ext_authz filter would call (Istio enables ext_authz only when its shadow RBAC rules match).
pub fn custom_match(set: &AuthzSet, req: &AuthzRequest<'_>) -> Option<CustomMatch> {
    let s = &*set.0;
    let rule = first_match(&s.custom, req)?;
    Some(CustomMatch {
        provider: rule.provider.clone().unwrap_or_else(|| "".into()),
        policy: rule.id.clone(),
        deny_id: rule.deny_id.clone(),
        conflicting_providers: s.conflicting_providers,
    })
}

/// The RBAC stages without CUSTOM: AUDIT, DENY, ALLOW (and the dry-run shadows), as the RBAC
/// filters after `ext_authz` and `jwt_authn` decide.
pub fn evaluate_rbac(set: &AuthzSet, req: &AuthzRequest<'_>) -> Decision {
    let s = &*set.0;
    let audit = first_match(&s.audit, req).map(|r| r.id.clone());
    let dry_deny = s
        .has_dry_deny
        .then(|| first_match(&s.dry_deny, req).map(|r| r.id.clone()));
    let mut decision = if let Some(rule) = first_match(&s.deny, req) {
        let mut d = Decision::deny(Some(rule.id.clone()));
        d.dry_run = dry_result(dry_deny, None);
        d
    } else {
        let dry_allow = s
            .has_dry_allow
            .then(|| first_match(&s.dry_allow, req).map(|r| r.id.clone()));
        let mut d = if !s.has_allow {
            Decision::allow(None)
        } else if let Some(rule) = first_match(&s.allow, req) {
            Decision::allow(Some(rule.id.clone()))
        } else {
            Decision::deny(None)
        };
        d.dry_run = dry_result(dry_deny, dry_allow);
        d
    };
    decision.audit = audit;
    decision
}

/// One rule's outcome in [`explain`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleOutcome {
    /// `ns[<ns>]-policy[<name>]-rule[<i>]`.
    pub id: Arc<str>,
    pub matched: bool,
    /// Why it did not match (the first part that failed); empty when it matched.
    pub why_not: String,
}

/// One policy's outcome in [`explain`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyOutcome {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub action: Action,
    pub dry_run: bool,
    pub provider: Option<Arc<str>>,
    /// In `spec.rules` order; empty for `spec: {}` (matches nothing).
    pub rules: Vec<RuleOutcome>,
}

/// Every policy of `set` with each rule's outcome for `req`, and the decision [`evaluate`]
/// makes (`waypoint explain`). Same matching as the data path; nothing is cached.
pub fn explain(set: &AuthzSet, req: &AuthzRequest<'_>) -> (Vec<PolicyOutcome>, Decision) {
    let outcomes = set
        .policies()
        .iter()
        .map(|p| PolicyOutcome {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            action: p.action,
            dry_run: p.dry_run,
            provider: p.provider.clone(),
            rules: p
                .rules
                .iter()
                .map(|r| {
                    let why_not = r.why_not(req);
                    RuleOutcome {
                        id: r.id.clone(),
                        matched: why_not.is_none(),
                        why_not: why_not.unwrap_or_default(),
                    }
                })
                .collect(),
        })
        .collect();
    (outcomes, evaluate(set, req))
}

impl Rule {
    /// `None` when [`Rule::matches`], else which part failed.
    fn why_not(&self, req: &AuthzRequest<'_>) -> Option<String> {
        if req.http.is_none() && self.uses_http && self.action == Action::Allow {
            return Some("uses HTTP-only fields on TCP traffic (ALLOW rule dropped)".into());
        }
        if !(self.from.is_empty() || self.from.iter().any(|c| c.matches(req))) {
            return Some("no `from` source matches".into());
        }
        if !(self.to.is_empty() || self.to.iter().any(|c| c.matches(req))) {
            return Some("no `to` operation matches".into());
        }
        if !self.when.matches(req) {
            return Some("a `when` condition fails".into());
        }
        None
    }
}

/// Combine the shadow results: a matching dry-run DENY rule would deny; else dry-run ALLOW
/// policies would allow only with a matching rule; else (dry-run DENY policies that did not
/// match) allowed.
fn dry_result(deny: Option<Option<Arc<str>>>, allow: Option<Option<Arc<str>>>) -> Option<DryRun> {
    let (allowed, matched_policy) = match (deny, allow) {
        (Some(Some(id)), _) => (false, Some(id)),
        (_, Some(Some(id))) => (true, Some(id)),
        (_, Some(None)) => (false, None),
        (Some(None), None) => (true, None),
        (None, None) => return None,
    };
    Some(DryRun {
        allowed,
        matched_policy,
    })
}

#[cfg(test)]
mod tests;
