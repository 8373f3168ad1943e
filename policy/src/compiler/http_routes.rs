//! HTTPRoute and GRPCRoute: parents, matches in Gateway API precedence, filters (header
//! modifiers, URLRewrite, RequestRedirect, RequestMirror), timeouts, retries, weighted
//! backendRefs and ReferenceGrant.

use super::*;

impl<'a> Compiler<'a> {
    pub(super) fn route(
        &mut self,
        r: &'a HttpRoute,
        tables: &mut HashMap<(SvcKey<'a>, u16), Candidates>,
    ) {
        let meta = &r.metadata;
        let kind = if r.grpc { "GRPCRoute" } else { "HTTPRoute" };
        self.route_kind = kind;
        let rid = id(meta);
        let errors_before = self.errors.len();
        let mut plans = Vec::new();
        for (i, rule) in r.spec.rules.iter().enumerate() {
            let field = format!("spec.rules[{i}]");
            let matches = if rule.matches.is_empty() {
                vec![RouteMatch {
                    path: PathMatch::Prefix("/".into()),
                    method: None,
                    headers: Vec::new(),
                    query: Vec::new(),
                }]
            } else {
                let mut v = Vec::new();
                for (j, m) in rule.matches.iter().enumerate() {
                    if let Some(m) = self.route_match(meta, &format!("{field}.matches[{j}]"), m) {
                        v.push(m);
                    }
                }
                v
            };
            let filters = self.filters(meta, &field, &rule.filters, false, r.grpc);
            if let Some(f) = &filters {
                self.check_rule_filters(meta, &field, f, rule, &matches);
            }
            let mut backends = Vec::new();
            let mut invalid_filter = filters.is_none();
            for (k, b) in rule.backend_refs.iter().enumerate() {
                let bfield = format!("{field}.backendRefs[{k}]");
                let Some(mut plan) = self.backend(meta, &bfield, b) else {
                    continue;
                };
                match self.filters(meta, &bfield, &b.filters, true, r.grpc) {
                    Some(f) => plan.filters = f,
                    None => invalid_filter = true,
                }
                backends.push(plan);
            }
            let (request_timeout, per_try_timeout) = self.timeouts(meta, &field, rule);
            let retry = self.retry(meta, &field, rule);
            let name = rule
                .name
                .clone()
                .unwrap_or_else(|| format!("{}.{}.{i}", meta.namespace, meta.name));
            plans.push(RulePlan {
                name: name.into(),
                matches,
                backends,
                filters: filters.unwrap_or_default(),
                invalid_filter,
                request_timeout,
                per_try_timeout,
                retry,
            });
        }
        let parents = self.parents(meta, &r.spec.parent_refs, false);
        if self.errors.len() > errors_before || parents.is_empty() {
            return;
        }
        let created = meta.creation_timestamp.as_deref();
        for (i, plan) in plans.into_iter().enumerate() {
            let mut wb = WeightedBackends::default();
            if plan.invalid_filter {
                // Gateway API: a filter that cannot be applied must not be skipped; the
                // requests it would have processed get an error (500, as an all-zero rule).
                self.warnings.push(format!("{kind} {rid}: spec.rules[{i}]: unsupported filter; requests matching this rule get 500"));
            }
            for b in plan.backends {
                if plan.invalid_filter {
                    break;
                }
                let backend = self.resolve(b.target);
                if let Backend::Invalid { reason } = &backend {
                    self.warnings.push(format!("{kind} {rid}: spec.rules[{i}]: invalid backendRef: {reason}; its share of requests gets 500"));
                }
                let filters = self.resolve_filters(kind, &rid, i, b.filters);
                wb.total_weight += u64::from(b.weight);
                wb.backends.push(BackendRef {
                    backend,
                    weight: b.weight,
                    filters: Arc::new(filters),
                });
            }
            let filters = self.resolve_filters(kind, &rid, i, plan.filters);
            let rule = Arc::new(RouteRule {
                name: plan.name,
                backends: wb,
                filters,
                request_timeout: plan.request_timeout,
                per_try_timeout: plan.per_try_timeout,
                retry: plan.retry,
                grpc: r.grpc,
            });
            for &parent in &parents {
                let list = tables.entry(parent).or_default();
                for (j, m) in plan.matches.iter().enumerate() {
                    let key = Precedence::new(m, created, rid.clone(), i, j);
                    list.push((key, m.clone(), rule.clone()));
                }
            }
        }
    }

    /// A backend target as the data path uses it.
    pub(super) fn resolve(&mut self, target: Result<(SvcKey<'a>, u16), String>) -> Backend {
        match target {
            Ok(((ns, name), port)) => match self.services.get_key_value(&(ns, name)) {
                Some((key, svc)) => {
                    let key = *key;
                    let what = if svc.entry.is_some() {
                        "ServiceEntry host"
                    } else {
                        "Service"
                    };
                    match self.cluster(key, port) {
                        Some(cl) => Backend::Cluster(cl),
                        None => Backend::Invalid {
                            reason: format!("{what} {ns}/{name} has no port {port}").into(),
                        },
                    }
                }
                None => Backend::Invalid {
                    reason: format!("Service {ns}/{name} not found").into(),
                },
            },
            Err(reason) => Backend::Invalid {
                reason: reason.into(),
            },
        }
    }

    /// Resolve mirror targets; an unusable mirror is dropped with a warning (Envoy would
    /// shadow to a cluster that does not exist, which only fails the shadow).
    pub(super) fn resolve_filters(
        &mut self,
        kind: &str,
        rid: &str,
        i: usize,
        plan: FilterPlan<'a>,
    ) -> Filters {
        let mut filters = plan.filters;
        for (target, numerator, denominator) in plan.mirrors {
            match self.resolve(target) {
                Backend::Cluster(cluster) => filters.mirrors.push(Mirror {
                    cluster,
                    numerator,
                    denominator,
                }),
                Backend::Invalid { reason } => self.warnings.push(format!(
                    "{kind} {rid}: spec.rules[{i}]: RequestMirror target unusable ({reason}); not mirrored"
                )),
            }
        }
        filters
    }

    /// `timeouts` as Istio converts them (policy.md 3.6): `request` is the route timeout;
    /// `backendRequest` is the per-try timeout when the rule has a `retry` stanza, else it
    /// becomes the route timeout. `0s` disables.
    pub(super) fn timeouts(
        &mut self,
        meta: &ObjectMeta,
        field: &str,
        rule: &HttpRouteRule,
    ) -> (Option<Duration>, Option<Duration>) {
        let Some(t) = &rule.timeouts else {
            return (None, None);
        };
        let mut parse = |name: &str, v: &Option<String>| -> Option<Duration> {
            let v = v.as_deref()?;
            match parse_duration(v) {
                Some(d) => Some(d).filter(|d| !d.is_zero()),
                None => {
                    self.errors.push(error(
                        self.route_kind,
                        meta,
                        format!("{field}.timeouts.{name}"),
                        format!("{v:?} is not a Gateway API duration (like 1h, 10s, 500ms)"),
                    ));
                    None
                }
            }
        };
        let request = parse("request", &t.request);
        let backend = parse("backendRequest", &t.backend_request);
        if let (Some(r), Some(b)) = (request, backend)
            && b > r
        {
            self.errors.push(error(
                self.route_kind,
                meta,
                format!("{field}.timeouts.backendRequest"),
                "must not be greater than timeouts.request",
            ));
        }
        match (rule.retry.is_some(), backend) {
            (true, b) => (request, b),
            (false, Some(b)) => (Some(b), None),
            (false, None) => (request, None),
        }
    }

    /// `retry` (GEP-1731) as Istio converts it; absent = Istio's waypoint default policy.
    pub(super) fn retry(
        &mut self,
        meta: &ObjectMeta,
        field: &str,
        rule: &HttpRouteRule,
    ) -> Option<RetryPolicy> {
        let Some(r) = &rule.retry else {
            return Some(RetryPolicy::default());
        };
        let mut policy = RetryPolicy::default();
        if let Some(a) = r.attempts {
            match u32::try_from(a) {
                Ok(0) => return None,
                Ok(a) => policy.retries = a,
                Err(_) => {
                    self.errors.push(error(
                        self.route_kind,
                        meta,
                        format!("{field}.retry.attempts"),
                        format!("{a} must not be negative"),
                    ));
                }
            }
        }
        for (k, c) in r.codes.iter().enumerate() {
            match u16::try_from(*c).ok().filter(|c| (400..=599).contains(c)) {
                Some(c) => policy.codes.push(c),
                None => self.errors.push(error(
                    self.route_kind,
                    meta,
                    format!("{field}.retry.codes[{k}]"),
                    format!("{c} is not a 4xx or 5xx status code"),
                )),
            }
        }
        if let Some(b) = &r.backoff {
            match parse_duration(b) {
                Some(d) => policy.backoff = d,
                None => self.errors.push(error(
                    self.route_kind,
                    meta,
                    format!("{field}.retry.backoff"),
                    format!("{b:?} is not a Gateway API duration"),
                )),
            }
        }
        Some(policy)
    }

    /// Parse `filters` of a rule (or of a backendRef). `None` = a filter we cannot apply
    /// (ExtensionRef, ExternalAuth, unknown types): the rule must answer 500.
    pub(super) fn filters(
        &mut self,
        meta: &'a ObjectMeta,
        field: &str,
        list: &'a [HttpRouteFilter],
        backend_level: bool,
        grpc: bool,
    ) -> Option<FilterPlan<'a>> {
        let kind = self.route_kind;
        let mut plan = FilterPlan::default();
        let mut ok = true;
        let mut seen: Vec<&str> = Vec::new();
        for (k, f) in list.iter().enumerate() {
            let ff = format!("{field}.filters[{k}]");
            let t = f.type_.as_str();
            if t != "RequestMirror" {
                if seen.contains(&t) {
                    self.errors.push(error(
                        kind,
                        meta,
                        format!("{ff}.type"),
                        format!("{t} may appear at most once"),
                    ));
                    continue;
                }
                seen.push(t);
            }
            // Istio supports only the header modifiers and RequestMirror on backendRefs and
            // on GRPCRoutes (conversion.go); the rest is reported like Istio's InvalidFilter.
            let limited = matches!(t, "RequestRedirect" | "URLRewrite" | "CORS");
            if limited && (backend_level || grpc) {
                let msg = if grpc {
                    "not supported on GRPCRoute"
                } else {
                    "not supported on a backendRef (Istio applies only header modifiers and RequestMirror there)"
                };
                self.errors.push(error(
                    kind,
                    meta,
                    format!("{ff}.type"),
                    format!("{t} is {msg}"),
                ));
                continue;
            }
            let missing = |s: &mut Self, member: &str| {
                s.errors.push(error(
                    kind,
                    meta,
                    format!("{ff}.{member}"),
                    format!("required when type is {t}"),
                ));
            };
            match t {
                "RequestHeaderModifier" => match &f.request_header_modifier {
                    Some(m) => {
                        plan.filters.request_headers = Some(self.header_modifier(
                            meta,
                            &format!("{ff}.requestHeaderModifier"),
                            m,
                        ))
                    }
                    None => missing(self, "requestHeaderModifier"),
                },
                "ResponseHeaderModifier" => match &f.response_header_modifier {
                    Some(m) => {
                        plan.filters.response_headers = Some(self.header_modifier(
                            meta,
                            &format!("{ff}.responseHeaderModifier"),
                            m,
                        ))
                    }
                    None => missing(self, "responseHeaderModifier"),
                },
                "RequestRedirect" => match &f.request_redirect {
                    Some(r) => {
                        plan.filters.redirect =
                            self.redirect(meta, &format!("{ff}.requestRedirect"), r)
                    }
                    None => missing(self, "requestRedirect"),
                },
                "URLRewrite" => match &f.url_rewrite {
                    Some(r) => {
                        let path = r.path.as_ref().and_then(|p| {
                            self.path_modifier(meta, &format!("{ff}.urlRewrite.path"), p)
                        });
                        plan.filters.rewrite = Some(Rewrite {
                            hostname: r.hostname.clone().filter(|h| !h.is_empty()),
                            path,
                        });
                    }
                    None => missing(self, "urlRewrite"),
                },
                "RequestMirror" => match &f.request_mirror {
                    Some(m) => {
                        if let Some(mirror) = self.mirror(meta, &format!("{ff}.requestMirror"), m) {
                            plan.mirrors.push(mirror);
                        }
                    }
                    None => missing(self, "requestMirror"),
                },
                "CORS" => self.warnings.push(format!(
                    "{kind} {}: {ff}: CORS is not implemented; ignored",
                    id(meta)
                )),
                other => {
                    self.warnings.push(format!("{kind} {}: {ff}: filter type {other:?} is not supported (Istio: InvalidFilter)", id(meta)));
                    ok = false;
                }
            }
        }
        ok.then_some(plan)
    }

    /// Rule-wide filter constraints (Gateway API CEL rules, policy.md 3.4).
    pub(super) fn check_rule_filters(
        &mut self,
        meta: &ObjectMeta,
        field: &str,
        f: &FilterPlan<'a>,
        rule: &HttpRouteRule,
        matches: &[RouteMatch],
    ) {
        let kind = self.route_kind;
        if f.filters.redirect.is_some() && f.filters.rewrite.is_some() {
            self.errors.push(error(
                kind,
                meta,
                format!("{field}.filters"),
                "RequestRedirect and URLRewrite cannot both be set",
            ));
        }
        if f.filters.redirect.is_some() && !rule.backend_refs.is_empty() {
            self.errors.push(error(
                kind,
                meta,
                format!("{field}.backendRefs"),
                "must be empty when a RequestRedirect filter is set",
            ));
        }
        let prefix_modifier = |p: &Option<PathModifier>| matches!(p, Some(PathModifier::Prefix(_)));
        let uses_prefix = f
            .filters
            .rewrite
            .as_ref()
            .is_some_and(|r| prefix_modifier(&r.path))
            || f.filters
                .redirect
                .as_ref()
                .is_some_and(|r| prefix_modifier(&r.path));
        if uses_prefix
            && matches
                .iter()
                .any(|m| !matches!(m.path, PathMatch::Prefix(_)))
        {
            self.errors.push(error(
                kind,
                meta,
                format!("{field}.filters"),
                "ReplacePrefixMatch requires every match to be a PathPrefix match",
            ));
        }
    }

    pub(super) fn header_modifier(
        &mut self,
        meta: &ObjectMeta,
        field: &str,
        m: &HeaderModifierSpec,
    ) -> HeaderModifier {
        let kind = self.route_kind;
        let mut out = HeaderModifier::default();
        for (list, name, dst) in [(&m.set, "set", 0), (&m.add, "add", 1)] {
            for (k, h) in list.iter().enumerate() {
                let (Ok(n), Ok(v)) = (
                    HeaderName::from_bytes(h.name.as_bytes()),
                    HeaderValue::from_str(&h.value),
                ) else {
                    self.errors.push(error(
                        kind,
                        meta,
                        format!("{field}.{name}[{k}]"),
                        format!("invalid header {:?}: {:?}", h.name, h.value),
                    ));
                    continue;
                };
                if dst == 0 {
                    out.set.push((n, v))
                } else {
                    out.add.push((n, v))
                }
            }
        }
        for (k, r) in m.remove.iter().enumerate() {
            match HeaderName::from_bytes(r.as_bytes()) {
                Ok(n) => out.remove.push(n),
                Err(_) => self.errors.push(error(
                    kind,
                    meta,
                    format!("{field}.remove[{k}]"),
                    format!("{r:?} is not a valid header name"),
                )),
            }
        }
        out
    }

    pub(super) fn path_modifier(
        &mut self,
        meta: &ObjectMeta,
        field: &str,
        p: &PathModifierSpec,
    ) -> Option<PathModifier> {
        let kind = self.route_kind;
        match p.type_.as_str() {
            "ReplaceFullPath" => match p.replace_full_path.as_deref() {
                Some(v) if v.starts_with('/') => Some(PathModifier::Full(v.into())),
                Some(v) => {
                    self.errors.push(error(
                        kind,
                        meta,
                        format!("{field}.replaceFullPath"),
                        format!("{v:?} must start with '/'"),
                    ));
                    None
                }
                None => {
                    self.errors.push(error(
                        kind,
                        meta,
                        format!("{field}.replaceFullPath"),
                        "required when type is ReplaceFullPath",
                    ));
                    None
                }
            },
            "ReplacePrefixMatch" => match p.replace_prefix_match.as_deref() {
                // Istio trims the trailing `/` and treats empty as `/` (strip the prefix).
                Some(v) if v.is_empty() || v.starts_with('/') => {
                    Some(PathModifier::Prefix(v.trim_end_matches('/').into()))
                }
                Some(v) => {
                    self.errors.push(error(
                        kind,
                        meta,
                        format!("{field}.replacePrefixMatch"),
                        format!("{v:?} must start with '/'"),
                    ));
                    None
                }
                None => {
                    self.errors.push(error(
                        kind,
                        meta,
                        format!("{field}.replacePrefixMatch"),
                        "required when type is ReplacePrefixMatch",
                    ));
                    None
                }
            },
            other => {
                self.errors.push(error(kind, meta, format!("{field}.type"), format!("unknown path modifier {other:?} (expected ReplaceFullPath or ReplacePrefixMatch)")));
                None
            }
        }
    }

    pub(super) fn redirect(
        &mut self,
        meta: &ObjectMeta,
        field: &str,
        r: &RedirectSpec,
    ) -> Option<Redirect> {
        let kind = self.route_kind;
        let before = self.errors.len();
        let scheme = r.scheme.clone().filter(|s| !s.is_empty());
        if let Some(s) = &scheme
            && s != "http"
            && s != "https"
        {
            self.errors.push(error(
                kind,
                meta,
                format!("{field}.scheme"),
                format!("{s:?} must be http or https"),
            ));
        }
        let port = match r.port {
            None => None,
            Some(p) => match port_number(p) {
                Some(p) => Some(p),
                None => {
                    self.errors.push(error(
                        kind,
                        meta,
                        format!("{field}.port"),
                        format!("{p} is not a valid port (1-65535)"),
                    ));
                    None
                }
            },
        };
        let status = match r.status_code.unwrap_or(302) {
            c @ (301 | 302 | 303 | 307 | 308) => c as u16,
            c => {
                self.errors.push(error(
                    kind,
                    meta,
                    format!("{field}.statusCode"),
                    format!("{c} is not a redirect code (301, 302, 303, 307, 308)"),
                ));
                302
            }
        };
        let path = r
            .path
            .as_ref()
            .and_then(|p| self.path_modifier(meta, &format!("{field}.path"), p));
        (self.errors.len() == before).then(|| Redirect {
            scheme,
            hostname: r.hostname.clone().filter(|h| !h.is_empty()),
            port,
            path,
            status,
        })
    }

    pub(super) fn mirror(
        &mut self,
        meta: &'a ObjectMeta,
        field: &str,
        m: &'a MirrorSpec,
    ) -> Option<MirrorPlan<'a>> {
        let kind = self.route_kind;
        let (num, den) = match (&m.percent, &m.fraction) {
            (Some(_), Some(_)) => {
                self.errors.push(error(
                    kind,
                    meta,
                    field.to_string(),
                    "percent and fraction cannot both be set",
                ));
                return None;
            }
            (Some(p), None) if (0..=100).contains(p) => (*p, 100),
            (None, Some(f)) => {
                let den = f.denominator.unwrap_or(100);
                if den <= 0 || f.numerator < 0 || f.numerator > den {
                    self.errors.push(error(
                        kind,
                        meta,
                        format!("{field}.fraction"),
                        "need 0 <= numerator <= denominator and denominator > 0",
                    ));
                    return None;
                }
                (f.numerator, den)
            }
            (None, None) => (100, 100),
            (Some(p), None) => {
                self.errors.push(error(
                    kind,
                    meta,
                    format!("{field}.percent"),
                    format!("{p} is out of range (0-100)"),
                ));
                return None;
            }
        };
        let b = &m.backend_ref;
        let target = self.backend_target(
            meta,
            &format!("{field}.backendRef"),
            b.group.as_deref(),
            b.kind.as_deref(),
            &b.name,
            b.namespace.as_deref(),
            b.port,
        )?;
        Some((
            target,
            u32::try_from(num).unwrap_or(0),
            u32::try_from(den).unwrap_or(100),
        ))
    }

    /// The bound (Service, port) pairs a route attaches to; everything else is a warning.
    /// `tcp`: a TCPRoute, which attaches to TCP (and undeclared) ports only, where an
    /// HTTPRoute/GRPCRoute attaches to every other port.
    pub(super) fn parents(
        &mut self,
        meta: &'a ObjectMeta,
        refs: &'a [ParentReference],
        tcp: bool,
    ) -> Vec<(SvcKey<'a>, u16)> {
        let rk = self.route_kind;
        let rid = id(meta);
        let mut out = Vec::new();
        for (j, p) in refs.iter().enumerate() {
            let field = format!("spec.parentRefs[{j}]");
            let group = p
                .group
                .as_deref()
                .unwrap_or(crate::resources::GATEWAY_GROUP);
            let kind = p.kind.as_deref().unwrap_or("Gateway");
            let entry = group == "networking.istio.io" && kind == "ServiceEntry";
            let service = group.is_empty() && kind == "Service";
            if !(service || entry) {
                self.warnings.push(format!(
                    "{rk} {rid}: {field}: parent {kind} {} (group {group:?}) is not a mesh Service parent (set group: \"\" and kind: Service, or group: networking.istio.io and kind: ServiceEntry); skipped",
                    p.name
                ));
                continue;
            }
            let port = match p.port {
                None => None,
                Some(n) => match port_number(n) {
                    Some(n) => Some(n),
                    None => {
                        self.errors.push(error(
                            rk,
                            meta,
                            format!("{field}.port"),
                            format!("{n} is not a valid port (1-65535)"),
                        ));
                        continue;
                    }
                },
            };
            let ns = p.namespace.as_deref().unwrap_or(&meta.namespace);
            if ns != meta.namespace {
                self.warnings.push(format!(
                    "{rk} {rid}: {field}: consumer route for Service {ns}/{} is not supported in Istio ambient; skipped",
                    p.name
                ));
                continue;
            }
            // A ServiceEntry parent is each of its hosts (one service each).
            let keys: Vec<SvcKey<'a>> = if entry {
                match self.entry_keys(ns, &p.name) {
                    Some(keys) => keys,
                    None => {
                        self.warnings.push(format!(
                            "{rk} {rid}: {field}: parent ServiceEntry {ns}/{} not found; skipped",
                            p.name
                        ));
                        continue;
                    }
                }
            } else {
                match self.services.get_key_value(&(ns, p.name.as_str())) {
                    Some((key, svc)) if svc.entry.is_none() => vec![*key],
                    _ => {
                        self.warnings.push(format!(
                            "{rk} {rid}: {field}: parent Service {ns}/{} not found; skipped",
                            p.name
                        ));
                        continue;
                    }
                }
            };
            for key in keys {
                self.parent_ports(&mut out, key, p, port, tcp, &field, &rid);
            }
        }
        out
    }

    /// The ports of one parent service a parentRef selects (by `port`, `sectionName`).
    #[allow(clippy::too_many_arguments)]
    fn parent_ports(
        &mut self,
        out: &mut Vec<(SvcKey<'a>, u16)>,
        key: SvcKey<'a>,
        p: &ParentReference,
        port: Option<u16>,
        tcp: bool,
        field: &str,
        rid: &str,
    ) {
        let rk = self.route_kind;
        let (ns, name) = key;
        let Some(svc) = self.services.get(&key) else {
            return;
        };
        let what = if svc.entry.is_some() {
            "ServiceEntry host"
        } else {
            "Service"
        };
        {
            if let Err(reason) = &svc.binding {
                self.warnings.push(format!(
                    "{rk} {rid}: {field}: {USE_WAYPOINT} label missing from parent and parent namespace; in ambient mode, route will not be respected ({reason})"
                ));
                return;
            }
            let explicit = port.is_some() || p.section_name.is_some();
            let mut matched = false;
            for sp in &svc.ports {
                let port_ok = port.is_none_or(|n| n == sp.port);
                let section_ok = p.section_name.as_deref().is_none_or(|s| s == sp.name);
                if !(port_ok && section_ok) {
                    continue;
                }
                matched = true;
                // An HTTPRoute cannot apply to an opaque TCP port; say so only when the
                // parentRef named that port explicitly.
                let fits = match sp.protocol {
                    AppProtocol::Tcp => tcp,
                    AppProtocol::Unknown => true,
                    _ => !tcp,
                };
                if !fits {
                    if explicit {
                        self.warnings.push(format!(
                            "{rk} {rid}: {field}: {what} {ns}/{name} port {} is {}; {rk} ignored there",
                            sp.port,
                            if tcp { "HTTP" } else { "TCP" }
                        ));
                    }
                } else if !out.contains(&(key, sp.port)) {
                    out.push((key, sp.port));
                }
            }
            if !matched {
                self.warnings.push(format!(
                    "{rk} {rid}: {field}: no port of {what} {ns}/{name} matches; skipped"
                ));
            }
        }
    }

    pub(super) fn route_match(
        &mut self,
        meta: &ObjectMeta,
        field: &str,
        m: &HttpRouteMatch,
    ) -> Option<RouteMatch> {
        let before = self.errors.len();
        let rkind = self.route_kind;
        let err = |errors: &mut Vec<ConfigError>, f: String, msg: String| {
            errors.push(error(rkind, meta, f, msg))
        };
        let (kind, value) = m.path.as_ref().map_or(("PathPrefix", "/"), |p| {
            (
                p.type_.as_deref().unwrap_or("PathPrefix"),
                p.value.as_deref().unwrap_or("/"),
            )
        });
        let path = match kind {
            "Exact" | "PathPrefix" if !value.starts_with('/') => {
                err(
                    &mut self.errors,
                    format!("{field}.path.value"),
                    format!("{value:?} must start with '/'"),
                );
                None
            }
            "Exact" => Some(PathMatch::Exact(value.into())),
            "PathPrefix" => {
                let trimmed = value.trim_end_matches('/');
                Some(PathMatch::Prefix(if trimmed.is_empty() {
                    "/".into()
                } else {
                    trimmed.into()
                }))
            }
            "RegularExpression" => match full_regex(value) {
                Ok(r) => Some(PathMatch::Regex(r)),
                Err(e) => {
                    err(&mut self.errors, format!("{field}.path.value"), e);
                    None
                }
            },
            other => {
                err(
                    &mut self.errors,
                    format!("{field}.path.type"),
                    format!(
                        "unknown path match type {other:?} (expected Exact, PathPrefix or RegularExpression)"
                    ),
                );
                None
            }
        };
        let method = match m.method.as_deref() {
            None => None,
            Some(s) if is_upper_token(s) => Method::from_bytes(s.as_bytes()).ok(),
            Some(s) => {
                err(
                    &mut self.errors,
                    format!("{field}.method"),
                    format!("{s:?} is not an upper-case HTTP method"),
                );
                None
            }
        };
        let mut headers: Vec<HeaderMatch> = Vec::new();
        for (k, h) in m.headers.iter().enumerate() {
            let f = format!("{field}.headers[{k}]");
            let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) else {
                err(
                    &mut self.errors,
                    format!("{f}.name"),
                    format!("{:?} is not a valid header name", h.name),
                );
                continue;
            };
            let value = value_match(h, &f, &mut self.errors, meta, rkind);
            // Gateway API: if a header name repeats, only the first entry counts.
            if let Some(value) = value
                && !headers.iter().any(|x| x.name == name)
            {
                headers.push(HeaderMatch { name, value });
            }
        }
        let mut query: Vec<QueryMatch> = Vec::new();
        for (k, q) in m.query_params.iter().enumerate() {
            let f = format!("{field}.queryParams[{k}]");
            if q.name.is_empty() {
                err(
                    &mut self.errors,
                    format!("{f}.name"),
                    "must not be empty".into(),
                );
                continue;
            }
            if let Some(value) = value_match(q, &f, &mut self.errors, meta, rkind)
                && !query.iter().any(|x| x.name == q.name)
            {
                query.push(QueryMatch {
                    name: q.name.clone(),
                    value,
                });
            }
        }
        if self.errors.len() > before {
            return None;
        }
        Some(RouteMatch {
            path: path?,
            method,
            headers,
            query,
        })
    }

    pub(super) fn backend(
        &mut self,
        meta: &'a ObjectMeta,
        field: &str,
        b: &'a HttpBackendRef,
    ) -> Option<BackendPlan<'a>> {
        let weight = b.weight.unwrap_or(1);
        if !(0..=MAX_WEIGHT).contains(&weight) {
            self.errors.push(error(
                self.route_kind,
                meta,
                format!("{field}.weight"),
                format!("{weight} is out of range (0-{MAX_WEIGHT})"),
            ));
            return None;
        }
        let target = self.backend_target(
            meta,
            field,
            b.group.as_deref(),
            b.kind.as_deref(),
            &b.name,
            b.namespace.as_deref(),
            b.port,
        )?;
        // Zero weights are dropped (Istio conversion.go); they never receive traffic.
        let weight = u32::try_from(weight).ok().filter(|w| *w > 0)?;
        Some(BackendPlan {
            target,
            weight,
            filters: FilterPlan::default(),
        })
    }

    /// Where a backendRef (or mirror backendRef) points, or why it cannot be used. `None`
    /// only for a field error (reported). Cross-namespace references need a ReferenceGrant
    /// in the target namespace, as Istio requires (`RefNotPermitted` otherwise).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backend_target(
        &mut self,
        meta: &'a ObjectMeta,
        field: &str,
        group: Option<&str>,
        kind: Option<&str>,
        name: &'a str,
        namespace: Option<&'a str>,
        port: Option<i64>,
    ) -> Option<Result<(SvcKey<'a>, u16), String>> {
        let port = match port {
            None => None,
            Some(n) => match port_number(n) {
                Some(n) => Some(n),
                None => {
                    self.errors.push(error(
                        self.route_kind,
                        meta,
                        format!("{field}.port"),
                        format!("{n} is not a valid port (1-65535)"),
                    ));
                    return None;
                }
            },
        };
        let group = group.unwrap_or("");
        let kind = kind.unwrap_or("Service");
        let ns = namespace.unwrap_or(&meta.namespace);
        if group == "networking.istio.io" && matches!(kind, "Hostname" | "ServiceEntry") {
            return Some(self.entry_backend(meta, kind, name, ns, port));
        }
        Some(if !(group.is_empty() && kind == "Service") {
            Err(format!(
                "unsupported backendRef kind {kind} (group {group:?}; supported: Service, and Hostname or ServiceEntry in networking.istio.io)"
            ))
        } else if ns != meta.namespace && !self.granted(&meta.namespace, ns, name) {
            Err(format!(
                "backendRef to Service {ns}/{name} from namespace {} is not permitted by a ReferenceGrant (RefNotPermitted)",
                meta.namespace
            ))
        } else if let Some(port) = port {
            Ok(((ns, name), port))
        } else {
            Err(format!(
                "backendRef to Service {ns}/{name} has no port (port is required for Service backends)"
            ))
        })
    }

    /// A backendRef to a ServiceEntry host, Istio's way: `kind: Hostname` names the host (in
    /// any namespace; the route's own first), `kind: ServiceEntry` the entry (its first host;
    /// same namespace or a ReferenceGrant). The port is required as for Services.
    fn entry_backend(
        &self,
        meta: &'a ObjectMeta,
        kind: &str,
        name: &'a str,
        ns: &'a str,
        port: Option<u16>,
    ) -> Result<(SvcKey<'a>, u16), String> {
        let key = if kind == "Hostname" {
            self.host_key(&meta.namespace, name).ok_or_else(|| {
                format!("backendRef to Hostname {name}: no ServiceEntry has that host")
            })?
        } else {
            if ns != meta.namespace && !self.granted(&meta.namespace, ns, name) {
                return Err(format!(
                    "backendRef to ServiceEntry {ns}/{name} from namespace {} is not permitted by a ReferenceGrant (RefNotPermitted)",
                    meta.namespace
                ));
            }
            self.entry_keys(ns, name)
                .and_then(|k| k.first().copied())
                .ok_or_else(|| format!("backendRef to ServiceEntry {ns}/{name}: not found"))?
        };
        match port {
            Some(port) => Ok((key, port)),
            None => Err(format!(
                "backendRef to {kind} {name} has no port (port is required)"
            )),
        }
    }

    /// Whether a ReferenceGrant in `to_ns` lets routes of the current kind in `from_ns`
    /// reference Service `name`.
    pub(super) fn granted(&self, from_ns: &str, to_ns: &str, name: &str) -> bool {
        let kind = self.route_kind;
        self.grants.iter().any(|g| {
            g.metadata.namespace == to_ns
                && g.spec.from.iter().any(|f| {
                    f.group == crate::resources::GATEWAY_GROUP
                        && f.kind == kind
                        && f.namespace == from_ns
                })
                && g.spec.to.iter().any(|t| {
                    t.group.is_empty()
                        && t.kind == "Service"
                        && t.name.as_deref().is_none_or(|n| n.is_empty() || n == name)
                })
        })
    }
}

/// Header/query value match (`Exact` default, `RegularExpression`).
pub(super) fn value_match(
    v: &HttpValueMatch,
    field: &str,
    errors: &mut Vec<ConfigError>,
    meta: &ObjectMeta,
    kind: &str,
) -> Option<MatchKind> {
    match v.type_.as_deref().unwrap_or("Exact") {
        "Exact" => Some(MatchKind::Exact(v.value.clone())),
        "RegularExpression" => match full_regex(&v.value) {
            Ok(r) => Some(MatchKind::Regex(r)),
            Err(e) => {
                errors.push(error(kind, meta, format!("{field}.value"), e));
                None
            }
        },
        other => {
            errors.push(error(
                kind,
                meta,
                format!("{field}.type"),
                format!("unknown match type {other:?} (expected Exact or RegularExpression)"),
            ));
            None
        }
    }
}

/// A Gateway API `Duration` (GEP-2257): `^([0-9]{1,5}(h|m|s|ms)){1,4}$`.
pub(crate) fn parse_duration(v: &str) -> Option<Duration> {
    let b = v.as_bytes();
    let (mut i, mut parts, mut total) = (0, 0, Duration::ZERO);
    while i < b.len() {
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let digits = i - start;
        if digits == 0 || digits > 5 {
            return None;
        }
        let n: u64 = v[start..i].parse().ok()?;
        let unit = if v[i..].starts_with("ms") {
            i += 2;
            Duration::from_millis(n)
        } else {
            let d = match b.get(i)? {
                b'h' => Duration::from_secs(n * 3600),
                b'm' => Duration::from_secs(n * 60),
                b's' => Duration::from_secs(n),
                _ => return None,
            };
            i += 1;
            d
        };
        total += unit;
        parts += 1;
    }
    (parts > 0 && parts <= 4).then_some(total)
}

/// An anchored regex: Gateway API / Envoy `safe_regex` match the whole value.
pub(super) fn full_regex(v: &str) -> Result<regex::Regex, String> {
    regex::Regex::new(&format!("^(?:{v})$")).map_err(|e| format!("invalid regular expression: {e}"))
}

/// An RFC 9110 token with no lower-case letters (Gateway API methods are upper case).
pub(super) fn is_upper_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_uppercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b)
        })
}
