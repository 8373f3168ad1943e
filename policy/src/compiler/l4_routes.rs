//! TCPRoute and TLSRoute (passthrough by SNI): L4 route tables per Service port.

use super::*;

impl<'a> Compiler<'a> {
    /// A TCPRoute: weighted TCP backends for the TCP ports it attaches to (Istio
    /// `convertTCPRoute`). Only the first rule is used (Gateway API allows one rule per
    /// TCPRoute on a mesh parent; more are warned about).
    pub(super) fn tcp_route(
        &mut self,
        r: &'a TcpRoute,
        tables: &mut HashMap<(SvcKey<'a>, u16), TcpCandidates>,
    ) {
        self.route_kind = "TCPRoute";
        let Some((key, rule, parents)) =
            self.l4_route(&r.metadata, &r.spec.parent_refs, &r.spec.rules)
        else {
            return;
        };
        for parent in parents {
            tables
                .entry(parent)
                .or_default()
                .push((key.clone(), rule.clone()));
        }
    }

    /// A TLSRoute: like a TCPRoute, selected by SNI (`hostnames`, Istio `buildTLSMatch`).
    pub(super) fn tls_route(
        &mut self,
        r: &'a TlsRoute,
        tables: &mut HashMap<(SvcKey<'a>, u16), TlsCandidates>,
    ) {
        self.route_kind = "TLSRoute";
        let meta = &r.metadata;
        let mut hosts = Vec::new();
        for (i, h) in r.spec.hostnames.iter().enumerate() {
            let valid = !h.is_empty()
                && h.parse::<IpAddr>().is_err()
                && h.strip_prefix("*.").unwrap_or(h).split('.').all(|l| {
                    !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                });
            if valid {
                hosts.push(h.to_ascii_lowercase());
            } else {
                self.errors.push(error(
                    "TLSRoute",
                    meta,
                    format!("spec.hostnames[{i}]"),
                    format!("{h:?} is not a host name (exact, or *. followed by a suffix; no IPs)"),
                ));
            }
        }
        let Some((key, rule, parents)) = self.l4_route(meta, &r.spec.parent_refs, &r.spec.rules)
        else {
            return;
        };
        for parent in parents {
            tables
                .entry(parent)
                .or_default()
                .push((key.clone(), hosts.clone(), rule.clone()));
        }
    }

    /// The shared part of TCPRoute and TLSRoute: backends of the first rule and parents.
    #[allow(clippy::type_complexity)]
    pub(super) fn l4_route(
        &mut self,
        meta: &'a ObjectMeta,
        parent_refs: &'a [ParentReference],
        rules: &'a [crate::resources::TcpRouteRule],
    ) -> Option<(
        (bool, String, String),
        Arc<TcpRouteRule>,
        Vec<(SvcKey<'a>, u16)>,
    )> {
        let kind = self.route_kind;
        let rid = id(meta);
        let errors_before = self.errors.len();
        if rules.len() > 1 {
            self.warnings.push(format!(
                "{kind} {rid}: spec.rules: only the first rule is used"
            ));
        }
        let mut plans = Vec::new();
        if let Some(rule) = rules.first() {
            for (k, b) in rule.backend_refs.iter().enumerate() {
                if let Some(plan) =
                    self.backend(meta, &format!("spec.rules[0].backendRefs[{k}]"), b)
                {
                    plans.push(plan);
                }
            }
        }
        let parents = self.parents(meta, parent_refs, true);
        if self.errors.len() > errors_before || parents.is_empty() {
            return None;
        }
        let mut wb = WeightedBackends::default();
        for b in plans {
            let backend = self.resolve(b.target);
            if let Backend::Invalid { reason } = &backend {
                self.warnings.push(format!("{kind} {rid}: spec.rules[0]: invalid backendRef: {reason}; its share of connections is rejected"));
            }
            wb.total_weight += u64::from(b.weight);
            wb.backends.push(BackendRef {
                backend,
                weight: b.weight,
                filters: Arc::default(),
            });
        }
        let name = rules
            .first()
            .and_then(|rule| rule.name.clone())
            .unwrap_or_else(|| format!("{}.{}.0", meta.namespace, meta.name));
        let rule = Arc::new(TcpRouteRule {
            name: name.into(),
            backends: wb,
        });
        let created = meta.creation_timestamp.clone();
        let key = (created.is_none(), created.unwrap_or_default(), rid);
        Some((key, rule, parents))
    }
}
