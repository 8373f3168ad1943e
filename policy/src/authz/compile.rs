//! AuthorizationPolicy validation (Istio's admission webhook, `pkg/config/validation`
//! `ValidateAuthorizationPolicy` and `pkg/config/security`), translation into [`Rule`]s (Istio
//! `pilot/pkg/security/authz/model`), and attachment to this waypoint (Istio
//! `policyattachment.go`).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use http::HeaderName;
use ipnet::IpNet;

use super::matcher::{
    Check, Clause, Field, HeaderSource, HeaderValueMatch, PathMatch, StrMatch, full_regex,
};
use super::{Action, AuthzIndex, AuthzPolicy, AuthzSet, DRY_RUN_ANNOTATION, Rule};
use crate::ConfigError;
use crate::resources::{
    AuthorizationPolicy, AuthzCondition, AuthzOperation, AuthzRule, AuthzSource, GATEWAY_GROUP,
    ObjectMeta, PolicyTargetReference,
};
use crate::snapshot::CompileOptions;

const KIND: &str = "AuthorizationPolicy";
/// The only GatewayClass whose targetRefs reach waypoints.
const WAYPOINT_CLASS: &str = "istio-waypoint";
/// "Supported targetRefs (max 16)".
const MAX_TARGET_REFS: usize = 16;
/// `CheckServiceAccount`: "may not have more than 16 values".
const MAX_SERVICE_ACCOUNTS: usize = 16;
/// Istio appends this to the rules of a CUSTOM policy whose provider it cannot use.
const BAD_CUSTOM_SUFFIX: &str = "-deny-due-to-bad-CUSTOM-action";
/// The trust domain Istio treats as "the local one" in policies.
const CLUSTER_LOCAL: &str = "cluster.local";

/// The outcome of reading a policy's `selector`/`targetRefs`.
pub(crate) enum Attached {
    /// No targetRefs: not a waypoint policy (warned about).
    Ignored,
    /// Invalid targetRefs (errors recorded).
    Invalid,
    To(Attachment),
}

/// Where a policy's `targetRefs` attach it.
#[derive(Default)]
pub(crate) struct Attachment {
    /// This waypoint's Gateway, or GatewayClass `istio-waypoint` from the root namespace.
    pub(crate) waypoint: bool,
    /// Services (in the policy's namespace).
    pub(crate) services: Vec<String>,
}

/// The attachment fields every Istio security policy shares (AuthorizationPolicy,
/// RequestAuthentication): `selector`, `targetRef`, `targetRefs`.
pub(crate) struct Targets<'a> {
    pub(crate) selector: bool,
    pub(crate) target_ref: Option<&'a PolicyTargetReference>,
    pub(crate) target_refs: &'a [PolicyTargetReference],
}

/// What a policy's targetRefs can name besides the Gateway: `Service` namespace/name (does it
/// exist?) and `ServiceEntry` namespace/name (its hosts, each one service as istiod makes
/// them; `None`: no such ServiceEntry).
pub(crate) struct TargetIndex<'x> {
    pub(crate) service_exists: &'x dyn Fn(&str, &str) -> bool,
    pub(crate) entry_hosts: &'x dyn Fn(&str, &str) -> Option<Vec<String>>,
}

/// Read a policy's `targetRefs` the way Istio attaches policies to a waypoint (`policy.md`
/// 1.11); shared by AuthorizationPolicy and RequestAuthentication. Errors and warnings name
/// the policy as `kind namespace/name`.
pub(crate) fn attach(
    kind: &'static str,
    meta: &ObjectMeta,
    targets: &Targets<'_>,
    opts: &CompileOptions,
    service_exists: &TargetIndex<'_>,
    errors: &mut Vec<ConfigError>,
    warnings: &mut Vec<String>,
) -> Attached {
    let mut c = PolicyCompiler {
        kind,
        meta,
        opts,
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let attached = c.attachment(targets, service_exists);
    errors.append(&mut c.errors);
    warnings.append(&mut c.warnings);
    attached
}

/// Validate and compile every policy; attach those whose `targetRefs` reach this waypoint.
/// `service_exists(namespace, name)` is used only to warn about targetRefs to unknown Services.
pub(crate) fn compile_policies(
    policies: &[&AuthorizationPolicy],
    opts: &CompileOptions,
    service_exists: &TargetIndex<'_>,
    errors: &mut Vec<ConfigError>,
    warnings: &mut Vec<String>,
) -> AuthzIndex {
    let mut waypoint = Vec::new();
    let mut by_service: BTreeMap<(String, String), Vec<Arc<AuthzPolicy>>> = BTreeMap::new();
    for p in policies {
        let mut c = PolicyCompiler {
            kind: KIND,
            meta: &p.metadata,
            opts,
            errors: Vec::new(),
            warnings: Vec::new(),
        };
        // Policies without targetRefs are for ztunnel and sidecars: only warned about, not
        // validated against waypoint-only restrictions. Others are validated in full, even
        // when they target another waypoint, so errors do not depend on where they attach.
        let targets = Targets {
            selector: p.spec.selector.is_some(),
            target_ref: p.spec.target_ref.as_ref(),
            target_refs: &p.spec.target_refs,
        };
        let attachment = c.attachment(&targets, service_exists);
        let compiled = match attachment {
            Attached::Ignored => None,
            Attached::Invalid | Attached::To(_) => c.policy(p),
        };
        errors.append(&mut c.errors);
        warnings.append(&mut c.warnings);
        let (Attached::To(attachment), Some(policy)) = (attachment, compiled) else {
            continue;
        };
        let policy = Arc::new(policy);
        if attachment.waypoint {
            waypoint.push(policy.clone());
        }
        for svc in attachment.services {
            by_service
                .entry((p.metadata.namespace.clone(), svc))
                .or_default()
                .push(policy.clone());
        }
    }
    let mut all: Vec<Arc<AuthzPolicy>> = waypoint
        .iter()
        .chain(by_service.values().flatten())
        .cloned()
        .collect();
    all.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    all.dedup_by(|a, b| Arc::ptr_eq(a, b));
    let mut index = AuthzIndex {
        waypoint: AuthzSet::new(waypoint.clone()),
        by_service: Default::default(),
        policies: all,
    };
    for ((ns, name), attached) in by_service {
        let mut set = waypoint.clone();
        set.extend(attached);
        index
            .by_service
            .entry(ns.into())
            .or_default()
            .insert(name.into(), AuthzSet::new(set));
    }
    index
}

struct PolicyCompiler<'a> {
    kind: &'static str,
    meta: &'a ObjectMeta,
    opts: &'a CompileOptions,
    errors: Vec<ConfigError>,
    warnings: Vec<String>,
}

/// One value list of a field: its name and values (`principals`, `notPrincipals`, ...).
type ValueList<'v> = (&'v str, &'v [String]);

impl PolicyCompiler<'_> {
    fn id(&self) -> String {
        format!("{}/{}", self.meta.namespace, self.meta.name)
    }

    fn error(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            kind: self.kind.into(),
            namespace: self.meta.namespace.clone(),
            name: self.meta.name.clone(),
            field: field.into(),
            message: message.into(),
        });
    }

    fn warn(&mut self, message: impl AsRef<str>) {
        let id = self.id();
        self.warnings
            .push(format!("{} {id}: {}", self.kind, message.as_ref()));
    }

    /// Where `targetRef`/`targetRefs` attach the policy.
    fn attachment(&mut self, spec: &Targets<'_>, service_exists: &TargetIndex<'_>) -> Attached {
        let kind = self.kind;
        let refs: Vec<(String, &PolicyTargetReference)> = spec
            .target_ref
            .iter()
            .map(|r| ("spec.targetRef".to_string(), *r))
            .chain(
                spec.target_refs
                    .iter()
                    .enumerate()
                    .map(|(i, r)| (format!("spec.targetRefs[{i}]"), r)),
            )
            .collect();
        if refs.is_empty() {
            let id = self.id();
            self.warnings.push(if spec.selector {
                format!(
                    "{kind} {id} uses a selector; waypoints ignore selector-based policies (attach it with targetRefs to the Gateway or Service)"
                )
            } else {
                format!(
                    "{kind} {id} has no targetRefs; waypoints ignore namespace-wide and mesh-wide policies (attach it with targetRefs to the Gateway or Service)"
                )
            });
            return Attached::Ignored;
        }
        let errors_before = self.errors.len();
        if spec.selector {
            self.error(
                "spec.selector",
                "only one of targetRefs or selector can be set",
            );
        }
        if spec.target_ref.is_some() && !spec.target_refs.is_empty() {
            self.error(
                "spec.targetRef",
                "only one of targetRef or targetRefs can be set",
            );
        }
        if spec.target_refs.len() > MAX_TARGET_REFS {
            self.error(
                "spec.targetRefs",
                format!("must have at most {MAX_TARGET_REFS} items"),
            );
        }
        let ns = self.meta.namespace.clone();
        let mut out = Attachment::default();
        for (field, r) in refs {
            if r.name.is_empty() {
                self.error(format!("{field}.name"), "must be set");
                continue;
            }
            if let Some(target_ns) = r.namespace.as_deref().filter(|n| !n.is_empty())
                && target_ns != ns
            {
                self.error(
                    format!("{field}.namespace"),
                    format!(
                        "{target_ns:?}: cross namespace referencing is not supported; the policy must be in the target's namespace"
                    ),
                );
                continue;
            }
            let group = r.group.as_deref().unwrap_or("");
            let group = if group.is_empty() { "core" } else { group };
            match (group, r.kind.as_str()) {
                ("core", "Service") => {
                    if !(service_exists.service_exists)(&ns, &r.name) {
                        self.warn(format!(
                            "{field}: Service {ns}/{} not found; the policy does not apply to it",
                            r.name
                        ));
                    }
                    if !out.services.contains(&r.name) {
                        out.services.push(r.name.clone());
                    }
                }
                (GATEWAY_GROUP, "Gateway") => {
                    // "for Gateway targets a targetRef.namespace other than the policy's own
                    // never matches": the policy must live in the Gateway's namespace.
                    if ns == self.opts.gateway_namespace && r.name == self.opts.gateway_name {
                        out.waypoint = true;
                    }
                }
                (GATEWAY_GROUP, "GatewayClass") => {
                    if r.name == WAYPOINT_CLASS {
                        if ns == self.opts.root_namespace {
                            out.waypoint = true;
                        } else {
                            self.warn(format!(
                                "{field}: GatewayClass targets apply only to policies in the root namespace {:?}; ignored",
                                self.opts.root_namespace
                            ));
                        }
                    }
                }
                ("networking.istio.io", "ServiceEntry") => {
                    // Istio makes one service of each host of a ServiceEntry; the policy
                    // applies to all of them.
                    match (service_exists.entry_hosts)(&ns, &r.name) {
                        Some(hosts) => {
                            for h in hosts {
                                if !out.services.contains(&h) {
                                    out.services.push(h);
                                }
                            }
                        }
                        None => self.warn(format!(
                            "{field}: ServiceEntry {ns}/{} not found; the policy does not apply to it",
                            r.name
                        )),
                    }
                }
                (_, kind) => self.error(
                    format!("{field}.kind"),
                    format!(
                        "targetRef must be to one of Service (group \"\"), ServiceEntry (networking.istio.io), Gateway or GatewayClass (gateway.networking.k8s.io), but was {kind:?} in group {group:?}"
                    ),
                ),
            }
        }
        if self.errors.len() == errors_before {
            Attached::To(out)
        } else {
            Attached::Invalid
        }
    }

    /// Validate the spec and build the policy; `None` when anything is invalid.
    fn policy(&mut self, p: &AuthorizationPolicy) -> Option<AuthzPolicy> {
        let errors_before = self.errors.len();
        let spec = &p.spec;
        let action = match spec.action.as_deref() {
            None | Some("ALLOW") => Action::Allow,
            Some("DENY") => Action::Deny,
            Some("AUDIT") => Action::Audit,
            Some("CUSTOM") => Action::Custom,
            Some(other) => {
                self.error(
                    "spec.action",
                    format!("invalid action {other:?} (expected ALLOW, DENY, AUDIT or CUSTOM)"),
                );
                Action::Allow
            }
        };
        let dry_run = match self.meta.annotations.get(DRY_RUN_ANNOTATION) {
            None => false,
            Some(v) => parse_go_bool(v).unwrap_or_else(|| {
                self.warn(format!(
                    "metadata.annotations[\"{DRY_RUN_ANNOTATION}\"]: {v:?} is not a boolean; the policy is enforced"
                ));
                false
            }),
        };
        let no_rules = spec.rules.as_ref().is_none_or(Vec::is_empty);
        let provider = spec.provider.as_ref().map(|p| p.name.as_str());
        match action {
            Action::Custom if no_rules => self.error(
                "spec.rules",
                "CUSTOM action without `rules` is meaningless as it will never be triggered, add an empty rule `{}` if you want it be triggered for every request",
            ),
            Action::Custom if provider.is_none_or(str::is_empty) => {
                self.error("spec.provider.name", "must not be empty for CUSTOM action")
            }
            Action::Deny if no_rules => self.error(
                "spec.rules",
                "DENY action without `rules` is meaningless as it will never be triggered, add an empty rule `{}` if you want it be triggered for every request",
            ),
            _ => {}
        }
        if provider.is_some() && action != Action::Custom {
            self.error(
                "spec.provider",
                format!("`provider` must not be with non CUSTOM action, found {action}"),
            );
        }
        let provider: Option<Arc<str>> = (action == Action::Custom)
            .then(|| provider.map(Arc::from))
            .flatten();
        let namespace: Arc<str> = self.meta.namespace.as_str().into();
        let name: Arc<str> = self.meta.name.as_str().into();
        let mut rules = Vec::new();
        for (i, rule) in spec.rules.iter().flatten().enumerate() {
            let field = format!("spec.rules[{i}]");
            let id = match &provider {
                Some(pv) => {
                    format!("istio-ext-authz-{pv}-ns[{namespace}]-policy[{name}]-rule[{i}]")
                }
                None => format!("ns[{namespace}]-policy[{name}]-rule[{i}]"),
            };
            if let Some(r) = self.rule(&field, rule, action, id, provider.clone()) {
                rules.push(Arc::new(r));
            }
        }
        (self.errors.len() == errors_before).then_some(AuthzPolicy {
            namespace,
            name,
            action,
            // "dry-run CUSTOM policies still call ext_authz" (Istio builder.go): enforced.
            dry_run: dry_run && action != Action::Custom,
            provider,
            rules,
        })
    }

    fn rule(
        &mut self,
        field: &str,
        rule: &AuthzRule,
        action: Action,
        id: String,
        provider: Option<Arc<str>>,
    ) -> Option<Rule> {
        let errors_before = self.errors.len();
        let mut from = Vec::new();
        let (mut tcp_in_from, mut tcp_in_to) = (false, false);
        if let Some(list) = &rule.from {
            if list.is_empty() {
                self.error(format!("{field}.from"), "must not be empty");
            }
            for (j, f) in list.iter().enumerate() {
                let path = format!("{field}.from[{j}].source");
                match &f.source {
                    None => self.error(path, "is required"),
                    Some(src) => {
                        tcp_in_from |= has_tcp_source_fields(src);
                        from.push(self.source(&path, src, action));
                    }
                }
            }
        }
        let mut to = Vec::new();
        if let Some(list) = &rule.to {
            if list.is_empty() {
                self.error(format!("{field}.to"), "must not be empty");
            }
            for (j, t) in list.iter().enumerate() {
                let path = format!("{field}.to[{j}].operation");
                match &t.operation {
                    None => self.error(path, "is required"),
                    Some(op) => {
                        tcp_in_to |= !op.ports.is_empty() || !op.not_ports.is_empty();
                        to.push(self.operation(&path, op));
                    }
                }
            }
        }
        let mut when = Clause::default();
        for (k, cond) in rule.when.iter().flatten().enumerate() {
            let path = format!("{field}.when[{k}]");
            if let Some(f) = self.condition(&path, cond, action) {
                when.fields.push(f);
            }
        }
        let (from_exists, to_exists) = (!from.is_empty(), !to.is_empty());
        if action == Action::Deny
            && ((from_exists && !to_exists && !tcp_in_from) || (to_exists && !tcp_in_to))
        {
            self.warn(format!(
                "{field}: configured AuthorizationPolicy will deny all traffic to TCP ports under its scope due to the use of only HTTP attributes in a DENY rule; it is recommended to explicitly specify the port"
            ));
        }
        if self.errors.len() > errors_before {
            return None;
        }
        let uses_http = from.iter().chain(&to).any(Clause::http_only) || when.http_only();
        let id: Arc<str> = id.into();
        let deny_id = if action == Action::Custom {
            format!("{id}{BAD_CUSTOM_SUFFIX}").into()
        } else {
            id.clone()
        };
        Some(Rule {
            id,
            deny_id,
            action,
            provider,
            from,
            to,
            when,
            uses_http,
        })
    }

    fn source(&mut self, path: &str, s: &AuthzSource, action: Action) -> Clause {
        let identity_lists = [
            ("principals", &s.principals),
            ("notPrincipals", &s.not_principals),
            ("namespaces", &s.namespaces),
            ("notNamespaces", &s.not_namespaces),
            ("serviceAccounts", &s.service_accounts),
            ("notServiceAccounts", &s.not_service_accounts),
            ("trustDomains", &s.trust_domains),
            ("notTrustDomains", &s.not_trust_domains),
            ("requestPrincipals", &s.request_principals),
            ("notRequestPrincipals", &s.not_request_principals),
        ];
        if action == Action::Custom {
            for (name, list) in identity_lists {
                if !list.is_empty() {
                    self.error(
                        format!("{path}.{name}"),
                        "is currently not supported with CUSTOM action",
                    );
                }
            }
        }
        let all_empty = identity_lists.iter().all(|(_, l)| l.is_empty())
            && s.ip_blocks.is_empty()
            && s.not_ip_blocks.is_empty()
            && s.remote_ip_blocks.is_empty()
            && s.not_remote_ip_blocks.is_empty();
        if all_empty {
            self.error(path, "must not be empty");
        }
        let identity = s.principals.len()
            + s.not_principals.len()
            + s.namespaces.len()
            + s.not_namespaces.len();
        if identity > 0 && !(s.service_accounts.is_empty() && s.not_service_accounts.is_empty()) {
            self.error(
                format!("{path}.serviceAccounts"),
                "cannot set serviceAccounts with namespaces or principals",
            );
        }
        let opts = self.opts;
        let ns = self.meta.namespace.clone();
        let mut clause = Clause::default();
        let fields = [
            self.field(
                path,
                ("principals", &s.principals),
                ("notPrincipals", &s.not_principals),
                &mut |v| principal_checks(v, opts),
            ),
            self.field(
                path,
                ("requestPrincipals", &s.request_principals),
                ("notRequestPrincipals", &s.not_request_principals),
                &mut |v| Ok(vec![request_principal_check(v)]),
            ),
            self.field(
                path,
                ("namespaces", &s.namespaces),
                ("notNamespaces", &s.not_namespaces),
                &mut |v| namespace_check(v).map(|c| vec![c]),
            ),
            self.service_accounts(path, s, &ns),
            self.field(
                path,
                ("trustDomains", &s.trust_domains),
                ("notTrustDomains", &s.not_trust_domains),
                &mut |v| trust_domain_checks(v, opts),
            ),
            self.field(
                path,
                ("ipBlocks", &s.ip_blocks),
                ("notIpBlocks", &s.not_ip_blocks),
                &mut |v| Ok(vec![Check::SourceIp(parse_cidr(v)?)]),
            ),
            self.field(
                path,
                ("remoteIpBlocks", &s.remote_ip_blocks),
                ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
                &mut |v| Ok(vec![Check::RemoteIp(parse_cidr(v)?)]),
            ),
        ];
        clause.fields.extend(fields.into_iter().flatten());
        clause
    }

    fn service_accounts(&mut self, path: &str, s: &AuthzSource, ns: &str) -> Option<Field> {
        for (name, list) in [
            ("serviceAccounts", &s.service_accounts),
            ("notServiceAccounts", &s.not_service_accounts),
        ] {
            if list.len() > MAX_SERVICE_ACCOUNTS {
                self.error(
                    format!("{path}.{name}"),
                    format!("may not have more than {MAX_SERVICE_ACCOUNTS} values"),
                );
            }
        }
        self.field(
            path,
            ("serviceAccounts", &s.service_accounts),
            ("notServiceAccounts", &s.not_service_accounts),
            &mut |v| service_account_check(v, ns).map(|c| vec![c]),
        )
    }

    fn operation(&mut self, path: &str, op: &AuthzOperation) -> Clause {
        if [
            &op.hosts,
            &op.not_hosts,
            &op.ports,
            &op.not_ports,
            &op.methods,
            &op.not_methods,
            &op.paths,
            &op.not_paths,
        ]
        .iter()
        .all(|l| l.is_empty())
        {
            self.error(path, "must not be empty");
        }
        let mut clause = Clause::default();
        let fields = [
            self.field(
                path,
                ("hosts", &op.hosts),
                ("notHosts", &op.not_hosts),
                &mut |v| {
                    Ok(vec![Check::Header {
                        source: HeaderSource::Authority,
                        value: HeaderValueMatch::istio(v, true),
                    }])
                },
            ),
            self.field(
                path,
                ("ports", &op.ports),
                ("notPorts", &op.not_ports),
                &mut |v| Ok(vec![Check::DestPort(parse_port(v)?)]),
            ),
            self.field(
                path,
                ("methods", &op.methods),
                ("notMethods", &op.not_methods),
                &mut |v| {
                    Ok(vec![Check::Header {
                        source: HeaderSource::Method,
                        value: HeaderValueMatch::istio(v, false),
                    }])
                },
            ),
            self.field(
                path,
                ("paths", &op.paths),
                ("notPaths", &op.not_paths),
                &mut |v| Ok(vec![Check::Path(path_match(v)?)]),
            ),
        ];
        clause.fields.extend(fields.into_iter().flatten());
        clause
    }

    /// One `when` condition (Istio `ValidateAttribute` and `model.New`).
    fn condition(&mut self, path: &str, cond: &AuthzCondition, action: Action) -> Option<Field> {
        let key = cond.key.as_str();
        if key.is_empty() {
            self.error(format!("{path}.key"), "must not be empty");
            return None;
        }
        if cond.values.is_empty() && cond.not_values.is_empty() {
            self.error(
                path,
                format!("at least one of `values` or `notValues` must be set for key {key}"),
            );
            return None;
        }
        if action == Action::Custom
            && (matches!(
                key,
                "source.namespace" | "source.serviceAccount" | "source.principal"
            ) || key.starts_with("request.auth."))
        {
            self.error(
                format!("{path}.key"),
                format!("{key} is currently not supported with CUSTOM action"),
            );
            return None;
        }
        let key_error = |message: String| (format!("{path}.key"), message);
        let builder: Result<Box<ValueBuilder<'_>>, (String, String)> = match key {
            k if k.starts_with("request.headers") => header_source(k, "request.headers")
                .map_err(key_error)
                .map(|source| {
                    Box::new(move |v: &str| {
                        Ok(vec![Check::Header {
                            source: source.clone(),
                            value: HeaderValueMatch::istio(v, false),
                        }])
                    }) as Box<ValueBuilder<'_>>
                }),
            k if k.starts_with("request.experimental.inline.headers") => {
                header_source(k, "request.experimental.inline.headers")
                    .map_err(key_error)
                    .map(|source| {
                        Box::new(move |v: &str| {
                            Ok(vec![Check::InlineHeader {
                                source: source.clone(),
                                regex: inline_header_regex(v)?,
                            }])
                        }) as Box<ValueBuilder<'_>>
                    })
            }
            "source.ip" => Ok(Box::new(|v: &str| {
                Ok(vec![Check::SourceIp(parse_cidr(v)?)])
            })),
            "remote.ip" => Ok(Box::new(|v: &str| {
                Ok(vec![Check::RemoteIp(parse_cidr(v)?)])
            })),
            "destination.ip" => Ok(Box::new(|v: &str| Ok(vec![Check::DestIp(parse_cidr(v)?)]))),
            "destination.port" => Ok(Box::new(|v: &str| {
                Ok(vec![Check::DestPort(parse_port(v)?)])
            })),
            "connection.sni" => Ok(Box::new(|v: &str| Ok(vec![Check::Sni(StrMatch::istio(v))]))),
            "source.namespace" => Ok(Box::new(|v: &str| namespace_check(v).map(|c| vec![c]))),
            "source.principal" => {
                let opts = self.opts;
                Ok(Box::new(move |v: &str| principal_checks(v, opts)))
            }
            "source.serviceAccount" => {
                for (name, list) in [("values", &cond.values), ("notValues", &cond.not_values)] {
                    if list.len() > MAX_SERVICE_ACCOUNTS {
                        self.error(
                            format!("{path}.{name}"),
                            format!("may not have more than {MAX_SERVICE_ACCOUNTS} values"),
                        );
                    }
                }
                let ns = self.meta.namespace.clone();
                Ok(Box::new(move |v: &str| {
                    service_account_check(v, &ns).map(|c| vec![c])
                }))
            }
            "request.auth.principal" => {
                Ok(Box::new(|v: &str| Ok(vec![request_principal_check(v)])))
            }
            "request.auth.audiences" => Ok(claim_builder(vec!["aud".into()])),
            "request.auth.presenter" => Ok(claim_builder(vec!["azp".into()])),
            k if k.starts_with("request.auth.claims") => validate_map_key(k)
                .and_then(|()| nested_claim_names(&k["request.auth.claims".len()..]))
                .map_err(key_error)
                .map(claim_builder),
            k if k.starts_with("experimental.envoy.filters.") => Err(key_error(format!(
                "{k}: Envoy dynamic metadata conditions are not supported by this waypoint"
            ))),
            "destination.namespace" => Err(key_error(format!(
                "attribute {key} is replaced by the metadata.namespace"
            ))),
            k if k.starts_with("destination.labels") => Err(key_error(format!(
                "attribute {k} is replaced by the workload selector"
            ))),
            "destination.name" | "destination.user" => Err(key_error(format!(
                "deprecated attribute {key}: only supported in v1alpha1"
            ))),
            _ => Err(key_error(format!("unknown attribute: {key}"))),
        };
        let mut builder = match builder {
            Ok(b) => b,
            Err((field, message)) => {
                self.error(field, message);
                return None;
            }
        };
        self.field(
            path,
            ("values", &cond.values),
            ("notValues", &cond.not_values),
            &mut *builder,
        )
    }

    /// Build one field from its value lists, recording an error on every bad value
    /// (`<path>.<list>[<k>]`). `None` when both lists are empty or a value is invalid.
    fn field(
        &mut self,
        path: &str,
        values: ValueList<'_>,
        not_values: ValueList<'_>,
        build: &mut ValueBuilder<'_>,
    ) -> Option<Field> {
        let errors_before = self.errors.len();
        let mut lists = [Vec::new(), Vec::new()];
        for ((name, list), out) in [values, not_values].into_iter().zip(&mut lists) {
            for (k, v) in list.iter().enumerate() {
                let field = format!("{path}.{name}[{k}]");
                if v.is_empty() {
                    self.error(field, "empty value not allowed");
                    continue;
                }
                match build(v) {
                    Ok(checks) => out.extend(checks),
                    Err(message) => self.error(field, message),
                }
            }
        }
        let [any_of, none_of] = lists;
        if self.errors.len() > errors_before || (any_of.is_empty() && none_of.is_empty()) {
            return None;
        }
        Some(Field::new(any_of, none_of))
    }
}

/// Turns one value of a field into the checks it ORs in (more than one for principals expanded
/// to trust domain aliases).
type ValueBuilder<'a> = dyn FnMut(&str) -> Result<Vec<Check>, String> + 'a;

fn claim_builder<'a>(path: Vec<Box<str>>) -> Box<ValueBuilder<'a>> {
    let path: Box<[Box<str>]> = path.into();
    Box::new(move |v: &str| {
        Ok(vec![Check::Claim {
            path: path.clone(),
            value: StrMatch::istio(v),
        }])
    })
}

/// Source fields that exist on TCP (Istio's DENY-rule warning looks for them).
fn has_tcp_source_fields(s: &AuthzSource) -> bool {
    [
        &s.principals,
        &s.not_principals,
        &s.ip_blocks,
        &s.not_ip_blocks,
        &s.namespaces,
        &s.not_namespaces,
        &s.remote_ip_blocks,
        &s.not_remote_ip_blocks,
        &s.service_accounts,
        &s.not_service_accounts,
        &s.trust_domains,
        &s.not_trust_domains,
    ]
    .iter()
    .any(|l| !l.is_empty())
}

/// Go's `strconv.ParseBool` (how Istio reads `istio.io/dry-run`).
fn parse_go_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// `principals` / `source.principal`: trust-domain aliases expanded (Istio
/// `ReplaceTrustDomainAliases`), then matched against `spiffe://<value>` ("the policy value gets
/// `spiffe://` prepended").
fn principal_checks(v: &str, opts: &CompileOptions) -> Result<Vec<Check>, String> {
    let mut checks = Vec::new();
    for p in expand_trust_domains(v, opts) {
        checks.push(Check::PeerPrincipal(StrMatch::istio_with_prefix(
            &p,
            "spiffe://",
        )?));
    }
    Ok(checks)
}

/// "For a 5-segment principal whose trust domain is the local TD, an alias, or the literal
/// `cluster.local`, Istio expands the rule to every TD in {trustDomain + aliases}. A principal
/// with TD `*` is left as-is; a malformed principal (not 5 segments) is left as-is; a TD that is
/// none of these is kept" (`trustdomain/bundle.go`). A wildcard TD that suffix-matches a bundle
/// TD (`*local`) is kept as written for that TD.
fn expand_trust_domains(principal: &str, opts: &CompileOptions) -> Vec<String> {
    let parts: Vec<&str> = principal.split('/').collect();
    if parts.len() != 5 || parts[0] == "*" {
        return vec![principal.to_string()];
    }
    let td = parts[0];
    let bundle: Vec<&str> = std::iter::once(opts.trust_domain.as_str())
        .chain(opts.trust_domain_aliases.iter().map(String::as_str))
        .collect();
    if !(bundle.iter().any(|b| td_string_match(td, b)) || td == CLUSTER_LOCAL) {
        return vec![principal.to_string()];
    }
    let rest = parts[1..].join("/");
    let mut out: Vec<String> = Vec::new();
    for b in bundle {
        let p = if suffix_match(b, td) {
            principal.to_string()
        } else {
            format!("{b}/{rest}")
        };
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// Istio `trustdomain.stringMatch` for one list entry: the pattern may be on either side.
fn td_string_match(a: &str, s: &str) -> bool {
    a == s
        || s == "*"
        || prefix_match(a, s)
        || prefix_match(s, a)
        || suffix_match(a, s)
        || suffix_match(s, a)
}

fn prefix_match(a: &str, pattern: &str) -> bool {
    pattern.strip_suffix('*').is_some_and(|p| a.starts_with(p))
}

fn suffix_match(a: &str, pattern: &str) -> bool {
    pattern.strip_prefix('*').is_some_and(|p| a.ends_with(p))
}

/// `trustDomains` (Istio 1.31): the peer principal starts with `spiffe://<td>/`; `*` is any
/// peer identity, `*x` / `x*` a regex over the trust domain part; a trust domain that is ours,
/// an alias or `cluster.local` is expanded to every trust domain of the bundle, as principals
/// are (policy.md 1.4).
fn trust_domain_checks(v: &str, opts: &CompileOptions) -> Result<Vec<Check>, String> {
    if v.is_empty() || v.contains('/') {
        return Err(format!("{v:?} is not a trust domain"));
    }
    if v == "*" {
        return Ok(vec![Check::PeerPrincipal(StrMatch::NonEmpty)]);
    }
    if v.starts_with('*') || v.ends_with('*') {
        let re = regex::escape(v.trim_matches('*'));
        let pattern = match (v.starts_with('*'), v.ends_with('*')) {
            (true, true) => format!("spiffe://[^/]*{re}[^/]*/.*"),
            (true, false) => format!("spiffe://[^/]*{re}/.*"),
            _ => format!("spiffe://{re}[^/]*/.*"),
        };
        return Ok(vec![Check::PeerPrincipal(StrMatch::Regex(full_regex(
            &pattern,
        )?))]);
    }
    let bundle: Vec<&str> = std::iter::once(opts.trust_domain.as_str())
        .chain(opts.trust_domain_aliases.iter().map(String::as_str))
        .collect();
    let tds: Vec<&str> = if bundle.contains(&v) || v == CLUSTER_LOCAL {
        bundle
    } else {
        vec![v]
    };
    Ok(tds
        .into_iter()
        .map(|td| Check::PeerPrincipal(StrMatch::Prefix(format!("spiffe://{td}/").into())))
        .collect())
}

/// `namespaces` / `source.namespace`: Istio's regex `.*/ns/<ns>/.*` over the peer principal,
/// with `*` in the value turned into `.*` (the value is not otherwise escaped).
fn namespace_check(v: &str) -> Result<Check, String> {
    let v = v.replace('*', ".*");
    Ok(Check::PeerPrincipal(StrMatch::Regex(full_regex(
        &format!(".*/ns/{v}/.*"),
    )?)))
}

/// `serviceAccounts` / `source.serviceAccount`: `<ns>/<sa>` or `<sa>` (the policy's namespace);
/// Istio `CheckServiceAccount` rules, then the regex `spiffe://.+/ns/<ns>/(.+/|)sa/<sa>(/.+)?`.
fn service_account_check(v: &str, policy_ns: &str) -> Result<Check, String> {
    if v.contains('*') {
        return Err("wildcard not allowed".into());
    }
    if v.len() > 320 {
        return Err("value cannot exceed 320 characters".into());
    }
    let (ns, sa) = match v.split_once('/') {
        Some((ns, sa)) => {
            if sa.contains('/') {
                return Err(format!(
                    "expected format 'serviceAccount' or 'namespace/serviceAccount', found {v:?}"
                ));
            }
            if ns.is_empty() || sa.is_empty() {
                return Err(format!(
                    "expected format 'serviceAccount' or 'namespace/serviceAccount', found {v:?}"
                ));
            }
            (ns, sa)
        }
        None => (policy_ns, v),
    };
    Ok(Check::PeerPrincipal(StrMatch::Regex(full_regex(
        &format!("spiffe://.+/ns/{ns}/(.+/|)sa/{sa}(/.+)?"),
    )?)))
}

/// `requestPrincipals` / `request.auth.principal`: "value split at the **last** `/` into
/// iss/sub; `*` = any iss and any sub (i.e. "has a valid JWT"); `*x` / `x*` handled per side"
/// (Istio `requestPrincipalGenerator`).
fn request_principal_check(v: &str) -> Check {
    let split = v.rfind('/').map(|i| (&v[..i], &v[i + 1..]));
    let (iss, sub) = if v == "*" {
        (StrMatch::NonEmpty, StrMatch::NonEmpty)
    } else if let Some(rest) = v.strip_prefix('*') {
        match split {
            Some((iss, sub)) => (
                if iss == "*" {
                    StrMatch::NonEmpty
                } else {
                    StrMatch::Suffix(iss.trim_start_matches_once('*').into())
                },
                StrMatch::Exact(sub.into()),
            ),
            None => (StrMatch::NonEmpty, StrMatch::Suffix(rest.into())),
        }
    } else if let Some(rest) = v.strip_suffix('*') {
        match split {
            Some((iss, sub)) => (
                StrMatch::Exact(iss.into()),
                if sub == "*" {
                    StrMatch::NonEmpty
                } else {
                    StrMatch::Prefix(sub.trim_end_matches_once('*').into())
                },
            ),
            None => (StrMatch::Prefix(rest.into()), StrMatch::NonEmpty),
        }
    } else {
        match split {
            Some((iss, sub)) => (StrMatch::Exact(iss.into()), StrMatch::Exact(sub.into())),
            None => (StrMatch::Exact(v.into()), StrMatch::Exact("".into())),
        }
    };
    Check::RequestPrincipal { iss, sub }
}

/// `strings.TrimPrefix`/`TrimSuffix` with one character: remove it once if present.
trait TrimOnce {
    fn trim_start_matches_once(&self, c: char) -> &str;
    fn trim_end_matches_once(&self, c: char) -> &str;
}

impl TrimOnce for str {
    fn trim_start_matches_once(&self, c: char) -> &str {
        self.strip_prefix(c).unwrap_or(self)
    }
    fn trim_end_matches_once(&self, c: char) -> &str {
        self.strip_suffix(c).unwrap_or(self)
    }
}

/// An IP or CIDR (Istio `ValidateIPs`: "bad CIDR range" / "bad IP address"); a single IP is a
/// /32 or /128.
fn parse_cidr(v: &str) -> Result<IpNet, String> {
    if v.contains('/') {
        v.parse::<IpNet>()
            .map_err(|e| format!("bad CIDR range ({v}): {e}"))
    } else {
        v.parse::<IpAddr>()
            .map(IpNet::from)
            .map_err(|_| format!("bad IP address ({v})"))
    }
}

/// A port: decimal digits only, 0..=65535 (Istio `ValidatePorts`, `strconv.ParseUint`).
fn parse_port(v: &str) -> Result<u16, String> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("bad port ({v}): not a decimal number"));
    }
    v.parse::<u16>()
        .map_err(|_| format!("bad port ({v}): must be in the range 0-65535"))
}

/// `paths`: "if the value contains `{*}` or `{**}` it is treated as an Envoy URI template (`{*}`
/// = one segment, `{**}` = zero or more, must be last; `*` outside an operator makes it
/// invalid)"; otherwise the four string forms. Paths are matched against the normalised path,
/// which always starts with `/`, so a value must start with `/` or `*` to ever match.
fn path_match(v: &str) -> Result<PathMatch, String> {
    if v.contains("{*}") || v.contains("{**}") {
        return path_template(v).map(PathMatch::Template);
    }
    if v.contains('{') || v.contains('}') {
        // Istio `CheckValidPathTemplate`: braces beyond a supported template are invalid.
        return Err(format!(
            "invalid or unsupported path {v}: contains '{{' or '}}' beyond a supported path template"
        ));
    }
    if !(v.starts_with('/') || v.starts_with('*')) {
        return Err(format!(
            "{v:?} must start with '/' or '*' (paths are matched against the normalised request path)"
        ));
    }
    Ok(PathMatch::String(StrMatch::istio(v)))
}

/// Envoy's URI template matcher, reached through Istio's `{*}` -> `*`, `{**}` -> `**`: a path
/// glob matches one segment of pchars (`[a-zA-Z0-9-._~%!$&'()+,;:@=]+`), a text glob zero or
/// more pchars or `/`; literal segments must be pchars (Istio `CheckValidPathTemplate`, Envoy
/// `uri_template_internal.cc`).
fn path_template(v: &str) -> Result<regex::Regex, String> {
    const PCHARS: &str = r"a-zA-Z0-9\-._~%!$&'()+,;:@=";
    let Some(rest) = v.strip_prefix('/') else {
        return Err(format!("invalid path template {v}: must start with '/'"));
    };
    let segments: Vec<&str> = rest.split('/').collect();
    let last = segments.len().saturating_sub(1);
    let mut regex = String::new();
    let mut seen_text_glob = false;
    for (i, seg) in segments.into_iter().enumerate() {
        regex.push('/');
        match seg {
            "{*}" | "{**}" if seen_text_glob => {
                return Err(format!(
                    "invalid or unsupported path {v}: {{**}} is not the last operator"
                ));
            }
            "{*}" => regex.push_str(&format!("[{PCHARS}]+")),
            "{**}" => {
                seen_text_glob = true;
                regex.push_str(&format!("[{PCHARS}/]*"));
            }
            // A single trailing '/' is kept as an empty last segment.
            "" if i == last && i > 0 => {}
            s if s.contains(['{', '}']) => {
                return Err(format!(
                    "invalid or unsupported path {v}: contains '{{' or '}}' beyond a supported path template"
                ));
            }
            s if !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~%!$&'()+,;:@=".contains(&b)) =>
            {
                regex.push_str(&regex::escape(s));
            }
            s => {
                return Err(format!(
                    "invalid or unsupported path {v}: contains segment {s:?} with invalid string literal"
                ));
            }
        }
    }
    full_regex(&regex)
}

/// Istio `validateMapKey`: `a[b]` with a non-empty `b`.
fn validate_map_key(key: &str) -> Result<(), String> {
    match key.find('[') {
        Some(open) if key.ends_with(']') && open > 0 && open + 2 < key.len() => Ok(()),
        _ => Err(format!("bad key ({key}): should have format a[b]")),
    }
}

/// The header a `request.headers[<name>]` key reads. Header names are case-insensitive.
/// Envoy's request header map resolves `host` to `:authority` ("Special case where we map a
/// legacy host header to :authority", `header_map_impl.cc`), so both read the authority. Of the
/// pseudo-headers only `:authority` and `:method` are available here (`:path` would include the
/// query string, which this waypoint does not pass to authorization).
fn header_source(key: &str, prefix: &str) -> Result<HeaderSource, String> {
    validate_map_key(key)?;
    let rest = &key[prefix.len()..];
    let name = rest
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .ok_or_else(|| format!("expecting format [<NAME>], but found {rest}"))?;
    let lower = name.to_ascii_lowercase();
    match lower.as_str() {
        ":authority" | "host" => Ok(HeaderSource::Authority),
        ":method" => Ok(HeaderSource::Method),
        n if n.starts_with(':') => Err(format!(
            "{key}: pseudo-header {n} is not supported (only :authority and :method); use to.operation.paths for the path"
        )),
        n => HeaderName::from_bytes(n.as_bytes())
            .map(HeaderSource::Named)
            .map_err(|_| format!("{key}: {name:?} is not a valid header name")),
    }
}

/// `request.experimental.inline.headers[...]` value: Istio `HeaderMatcherWithRegex`, one element
/// of the comma-joined header value matches (`None` = present).
fn inline_header_regex(v: &str) -> Result<Option<regex::bytes::Regex>, String> {
    if v == "*" {
        return Ok(None);
    }
    let r = if let Some(rest) = v.strip_prefix('*') {
        format!(".*{}", regex::escape(rest))
    } else if let Some(rest) = v.strip_suffix('*') {
        format!("{}.*", regex::escape(rest))
    } else {
        regex::escape(v)
    };
    regex::bytes::Regex::new(&format!("^(?:{r}|{r},.*|.*,{r},.*|.*,{r})$"))
        .map(Some)
        .map_err(|e| format!("invalid value: {e}"))
}

/// Istio `extractNameInNestedBrackets`: `[a][b]` -> `[a, b]`; otherwise the whole `[...]` is one
/// name.
fn nested_claim_names(s: &str) -> Result<Vec<Box<str>>, String> {
    let bytes = s.as_bytes();
    let find_end = |begin: usize| -> Option<usize> {
        if bytes.get(begin) != Some(&b'[') {
            return None;
        }
        for (i, &b) in bytes.iter().enumerate().skip(begin + 1) {
            match b {
                b'[' => return None,
                b']' => return Some(i),
                _ => {}
            }
        }
        None
    };
    let mut claims = Vec::new();
    let mut begin = 0;
    while begin < bytes.len() {
        let Some(end) = find_end(begin) else {
            let name = s
                .strip_prefix('[')
                .and_then(|r| r.strip_suffix(']'))
                .ok_or_else(|| format!("expecting format [<NAME>], but found {s}"))?;
            return Ok(vec![name.into()]);
        };
        claims.push(s[begin + 1..end].into());
        begin = end + 1;
    }
    Ok(claims)
}
