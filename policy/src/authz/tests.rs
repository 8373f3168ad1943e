//! One table-driven test per AuthorizationPolicy rule of `policy.md` section 1, each named
//! after the rule, plus validation, attachment and a property test. Policies go through YAML
//! and [`crate::compile`], as users write them.

use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::{CompileOptions, ConfigError, Snapshot, compile, parse_manifests};

const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";
const ATTACKER: &str = "spiffe://cluster.local/ns/other/sa/attacker";

/// Labelled namespace, waypoint `default/waypoint`, Services reviews (10.0.0.10:9080),
/// ratings (10.0.0.11:9080), db (10.0.0.12:5432, TCP), and a namespace `istio-system`.
const BASE: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/use-waypoint: waypoint}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: default}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec: {clusterIP: 10.0.0.10, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: default}
spec: {clusterIP: 10.0.0.11, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: default}
spec: {clusterIP: 10.0.0.12, ports: [{name: tcp, port: 5432}]}
";

const GW_REF: &str =
    "targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]";

/// A policy `default/<name>` attached to the waypoint; `body` is the rest of the spec, in YAML
/// flow style (`action: DENY, rules: [...]`).
fn ap(name: &str, body: &str) -> String {
    let spec = if body.is_empty() {
        format!("{{{GW_REF}}}")
    } else {
        format!("{{{GW_REF}, {body}}}")
    };
    ap_raw("default", name, "", &spec)
}

/// A policy with a literal `spec` (flow style) and extra metadata (`, annotations: {...}`).
fn ap_raw(ns: &str, name: &str, meta_extra: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}{meta_extra}}}\nspec: {spec}\n"
    )
}

fn build_with(opts: &CompileOptions, docs: &[String]) -> Result<Snapshot, Vec<ConfigError>> {
    let mut text = BASE.to_string();
    for d in docs {
        text.push_str("---\n");
        text.push_str(d);
    }
    let loaded = parse_manifests(&text, "test.yaml").expect("test YAML parses");
    compile(&loaded, opts)
}

fn snap(docs: &[String]) -> Snapshot {
    build_with(&CompileOptions::default(), docs)
        .unwrap_or_else(|e| panic!("compile failed: {e:#?}"))
}

fn errs(docs: &[String]) -> Vec<ConfigError> {
    match build_with(&CompileOptions::default(), docs) {
        Ok(_) => panic!("expected compile errors for {docs:#?}"),
        Err(e) => e,
    }
}

fn reviews(s: &Snapshot) -> AuthzSet {
    s.authz_for("default", "reviews")
}

/// The set for reviews with these policies.
fn set(docs: &[String]) -> AuthzSet {
    reviews(&snap(docs))
}

/// The set of a single ALLOW policy with one rule: a request is allowed iff the rule matches.
fn allow_rule(rule: &str) -> AuthzSet {
    set(&[ap("p", &format!("rules: [{rule}]"))])
}

/// The set of a single DENY policy with one rule: a request is denied iff the rule matches.
fn deny_rule(rule: &str) -> AuthzSet {
    set(&[ap("p", &format!("action: DENY, rules: [{rule}]"))])
}

/// A request as the proxy would describe it.
#[derive(Debug, Clone)]
struct Req {
    principal: Option<String>,
    source_ip: Option<IpAddr>,
    remote_ip: Option<IpAddr>,
    dest_ip: Option<IpAddr>,
    dest_port: u16,
    http: bool,
    method: String,
    path: String,
    host: String,
    headers: HeaderMap,
    request_principal: Option<String>,
    claims: Option<Value>,
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

impl Req {
    /// `GET <path>` from sleep (10.1.0.5) to reviews (10.0.0.10:9080), `Host: reviews:9080`.
    fn get(path: &str) -> Req {
        Req {
            principal: Some(SLEEP.into()),
            source_ip: Some(ip("10.1.0.5")),
            remote_ip: Some(ip("10.1.0.5")),
            dest_ip: Some(ip("10.0.0.10")),
            dest_port: 9080,
            http: true,
            method: "GET".into(),
            path: path.into(),
            host: "reviews:9080".into(),
            headers: HeaderMap::new(),
            request_principal: None,
            claims: None,
        }
    }
    /// A TCP connection from sleep to db (10.0.0.12:5432).
    fn tcp() -> Req {
        Req {
            http: false,
            dest_ip: Some(ip("10.0.0.12")),
            dest_port: 5432,
            ..Req::get("/")
        }
    }
    fn from(mut self, principal: &str) -> Req {
        self.principal = (!principal.is_empty()).then(|| principal.to_string());
        self
    }
    fn method(mut self, m: &str) -> Req {
        self.method = m.into();
        self
    }
    fn host(mut self, h: &str) -> Req {
        self.host = h.into();
        self
    }
    fn header(mut self, k: &str, v: &str) -> Req {
        let name = HeaderName::from_bytes(k.as_bytes()).expect("header name");
        self.headers
            .append(name, HeaderValue::from_str(v).expect("header value"));
        self
    }
    fn src(mut self, a: &str) -> Req {
        self.source_ip = Some(ip(a));
        self
    }
    fn remote(mut self, a: &str) -> Req {
        self.remote_ip = Some(ip(a));
        self
    }
    fn port(mut self, p: u16) -> Req {
        self.dest_port = p;
        self
    }
    fn claims(mut self, c: Value) -> Req {
        self.claims = Some(c);
        self
    }
}

fn with_req<R>(r: &Req, f: impl FnOnce(&AuthzRequest<'_>) -> R) -> R {
    let http = r.http.then(|| HttpAttrs {
        method: &r.method,
        path: &r.path,
        host: &r.host,
        headers: &r.headers,
        request_principal: r.request_principal.as_deref(),
        request_auth: r.claims.as_ref(),
    });
    f(&AuthzRequest {
        source_principal: r.principal.as_deref(),
        source_ip: r.source_ip,
        remote_ip: r.remote_ip,
        dest_ip: r.dest_ip,
        dest_port: r.dest_port,
        http,
    })
}

fn eval(set: &AuthzSet, r: &Req) -> Decision {
    with_req(r, |q| evaluate(set, q))
}

fn allowed(set: &AuthzSet, r: &Req) -> bool {
    eval(set, r).allowed
}

/// Expected outcome: allowed or not, and the rule id reported (`None` = none).
type Expect = (bool, Option<&'static str>);
const ALLOW: Expect = (true, None);
const DENY_NONE: Expect = (false, None);

/// Run a table of `(case, request, expected)` against one set.
fn table(set: &AuthzSet, cases: &[(&str, Req, Expect)]) {
    for (name, req, (allow, id)) in cases {
        let d = eval(set, req);
        assert_eq!(
            (d.allowed, d.matched_policy.as_deref()),
            (*allow, *id),
            "case {name:?}: {d:?}"
        );
    }
}

/// Run a table of `(case, request, rule matches)` against a one-rule ALLOW policy.
fn matches_table(rule: &str, cases: &[(&str, Req, bool)]) {
    let s = allow_rule(rule);
    for (name, req, want) in cases {
        assert_eq!(allowed(&s, req), *want, "rule {rule}, case {name:?}");
    }
}

fn assert_error(errors: &[ConfigError], name: &str, field: &str, needle: &str) {
    assert!(
        errors.iter().any(|e| e.kind == "AuthorizationPolicy"
            && e.namespace == "default"
            && e.name == name
            && e.field == field
            && e.message.contains(needle)),
        "no error AuthorizationPolicy default/{name} {field} containing {needle:?} in {errors:#?}"
    );
}

const R0: &str = "ns[default]-policy[p]-rule[0]";

// --- the reference policy (envoy-reference README) ----------------------------------------

#[test]
fn reference_policy_allows_sleep_get_only() {
    let text = format!(
        "{}---\n{}",
        include_str!("../../tests-data/bookinfo.yaml"),
        include_str!("../../tests-data/authz.yaml")
    );
    let loaded = parse_manifests(&text, "authz.yaml").expect("parses");
    assert!(
        !loaded
            .warnings
            .iter()
            .any(|w| w.contains("AuthorizationPolicy")),
        "{:?}",
        loaded.warnings
    );
    let s = compile(&loaded, &CompileOptions::default()).expect("compiles");
    let id = "ns[default]-policy[allow-sleep-get]-rule[0]";
    for svc in ["reviews", "ratings"] {
        let set = s.authz_for("default", svc);
        table(
            &set,
            &[
                ("sleep GET", Req::get("/reviews/0"), (true, Some(id))),
                ("sleep POST", Req::get("/").method("POST"), DENY_NONE),
                ("attacker GET", Req::get("/").from(ATTACKER), DENY_NONE),
                (
                    "other sa in default",
                    Req::get("/").from("spiffe://cluster.local/ns/default/sa/productpage"),
                    (true, Some(id)),
                ),
                ("no identity", Req::get("/").from(""), DENY_NONE),
            ],
        );
        let d = eval(&set, &Req::get("/").method("POST"));
        assert_eq!(d.details, "rbac_access_denied_matched_policy[none]");
    }
    // The ServicePort carries the same set.
    let sp = match s.lookup_vip("10.0.0.10:9080".parse().expect("addr")) {
        crate::VipLookup::Bound(sp) => sp,
        other => panic!("{other:?}"),
    };
    assert!(!allowed(&sp.authz, &Req::get("/").from(ATTACKER)));
    assert_eq!(s.authz_policies().len(), 1);
}

// --- 1.1 action order and defaults --------------------------------------------------------

#[test]
fn no_allow_policies_means_allow() {
    let empty = set(&[]);
    assert!(empty.is_empty());
    let only_deny = set(&[ap(
        "p",
        "action: DENY, rules: [{to: [{operation: {methods: [POST], ports: ['9080']}}]}]",
    )]);
    for s in [&empty, &only_deny] {
        table(
            s,
            &[
                ("GET", Req::get("/"), ALLOW),
                ("attacker", Req::get("/").from(ATTACKER), ALLOW),
                ("no identity", Req::get("/").from(""), ALLOW),
                ("tcp", Req::tcp(), ALLOW),
            ],
        );
    }
}

#[test]
fn deny_wins_over_allow() {
    let s = set(&[
        ap("allow-all", "rules: [{}]"),
        ap(
            "deny-post",
            "action: DENY, rules: [{to: [{operation: {methods: [POST]}}]}]",
        ),
    ]);
    table(
        &s,
        &[
            (
                "GET allowed",
                Req::get("/"),
                (true, Some("ns[default]-policy[allow-all]-rule[0]")),
            ),
            (
                "POST denied",
                Req::get("/").method("POST"),
                (false, Some("ns[default]-policy[deny-post]-rule[0]")),
            ),
        ],
    );
}

#[test]
fn allow_policy_present_but_no_match_denies_with_none() {
    let s = set(&[ap(
        "p",
        "rules: [{to: [{operation: {paths: [/public/*]}}]}]",
    )]);
    table(
        &s,
        &[
            ("match", Req::get("/public/x"), (true, Some(R0))),
            ("no match", Req::get("/private"), DENY_NONE),
        ],
    );
    let d = eval(&s, &Req::get("/private"));
    assert_eq!(d.details, "rbac_access_denied_matched_policy[none]");
}

#[test]
fn allow_policies_are_ored() {
    let s = set(&[
        ap("a", "rules: [{to: [{operation: {methods: [GET]}}]}]"),
        ap("b", "rules: [{to: [{operation: {methods: [POST]}}]}]"),
    ]);
    table(
        &s,
        &[
            (
                "GET",
                Req::get("/"),
                (true, Some("ns[default]-policy[a]-rule[0]")),
            ),
            (
                "POST",
                Req::get("/").method("POST"),
                (true, Some("ns[default]-policy[b]-rule[0]")),
            ),
            ("PUT", Req::get("/").method("PUT"), DENY_NONE),
        ],
    );
}

#[test]
fn default_action_is_allow() {
    let s = set(&[ap("p", "rules: [{to: [{operation: {methods: [GET]}}]}]")]);
    assert_eq!(s.policies()[0].action, Action::Allow);
    table(
        &s,
        &[
            ("GET", Req::get("/"), (true, Some(R0))),
            ("POST", Req::get("/").method("POST"), DENY_NONE),
        ],
    );
}

#[test]
fn first_matching_rule_in_envoy_map_order_is_reported() {
    // Envoy keeps policies in a std::map: the lexicographically lowest matching id wins, so
    // rule[10] is reported before rule[2].
    let rules: Vec<String> = (0..11)
        .map(|i| {
            if i == 2 || i == 10 {
                "{}".to_string()
            } else {
                "{to: [{operation: {methods: [NONE]}}]}".to_string()
            }
        })
        .collect();
    let s = set(&[
        ap("z", &format!("action: DENY, rules: [{}]", rules.join(", "))),
        ap(
            "a",
            "action: DENY, rules: [{to: [{operation: {paths: [/a]}}]}]",
        ),
    ]);
    table(
        &s,
        &[
            (
                "z rule 10 before rule 2",
                Req::get("/"),
                (false, Some("ns[default]-policy[z]-rule[10]")),
            ),
            (
                "policy a before z",
                Req::get("/a"),
                (false, Some("ns[default]-policy[a]-rule[0]")),
            ),
        ],
    );
}

#[test]
fn custom_is_evaluated_first_and_denies_without_a_provider() {
    let s = set(&[
        ap("allow-all", "rules: [{}]"),
        ap(
            "ext",
            "action: CUSTOM, provider: {name: opa}, rules: [{to: [{operation: {paths: [/admin/*]}}]}]",
        ),
        ap(
            "deny-admin",
            "action: DENY, rules: [{to: [{operation: {paths: [/admin/*]}}]}]",
        ),
    ]);
    let custom_id = "istio-ext-authz-opa-ns[default]-policy[ext]-rule[0]";
    let d = eval(&s, &Req::get("/admin/x"));
    assert!(!d.allowed);
    assert_eq!(
        d.matched_policy.as_deref(),
        Some("istio-ext-authz-opa-ns[default]-policy[ext]-rule[0]-deny-due-to-bad-CUSTOM-action")
    );
    let custom = d.custom.clone().expect("custom match");
    assert_eq!(&*custom.provider, "opa");
    assert_eq!(&*custom.policy, custom_id);
    assert!(!custom.conflicting_providers);
    // The CUSTOM stage alone names the provider to call; RBAC alone ignores CUSTOM.
    let m = with_req(&Req::get("/admin/x"), |q| custom_match(&s, q)).expect("custom");
    assert_eq!(&*m.provider, "opa");
    assert!(!with_req(&Req::get("/admin/x"), |q| evaluate_rbac(&s, q)).allowed);
    assert!(d.details.contains("deny-due-to-bad-CUSTOM-action"));
    // CUSTOM rules that do not match change nothing.
    let d = eval(&s, &Req::get("/public"));
    assert!(d.allowed && d.custom.is_none());
}

// --- 1.2 empty policy / empty rule --------------------------------------------------------

#[test]
fn empty_spec_allow_denies_all() {
    for s in [set(&[ap("p", "")]), set(&[ap("p", "rules: []")])] {
        table(
            &s,
            &[
                ("GET", Req::get("/"), DENY_NONE),
                ("attacker", Req::get("/").from(ATTACKER), DENY_NONE),
                ("tcp", Req::tcp(), DENY_NONE),
            ],
        );
    }
}

#[test]
fn empty_rule_allow_allows_all() {
    let s = set(&[ap("p", "rules: [{}]")]);
    table(
        &s,
        &[
            ("GET", Req::get("/"), (true, Some(R0))),
            ("no identity", Req::get("/").from(""), (true, Some(R0))),
            ("tcp", Req::tcp(), (true, Some(R0))),
        ],
    );
}

#[test]
fn empty_rule_deny_denies_all() {
    let s = set(&[ap("p", "rules: [{}]"), ap("d", "action: DENY, rules: [{}]")]);
    let id = Some("ns[default]-policy[d]-rule[0]");
    table(
        &s,
        &[
            ("GET", Req::get("/"), (false, id)),
            ("tcp", Req::tcp(), (false, id)),
        ],
    );
}

#[test]
fn deny_or_custom_without_rules_is_an_error() {
    let e = errs(&[ap("d", "action: DENY")]);
    assert_error(&e, "d", "spec.rules", "DENY action without `rules`");
    let e = errs(&[ap("c", "action: CUSTOM, provider: {name: x}")]);
    assert_error(&e, "c", "spec.rules", "CUSTOM action without `rules`");
}

#[test]
fn audit_without_rules_never_triggers() {
    let s = set(&[ap("a", "action: AUDIT")]);
    let d = eval(&s, &Req::get("/"));
    assert!(d.allowed && d.audit.is_none());
}

#[test]
fn rule_matches_some_from_and_some_to_and_all_when() {
    matches_table(
        "{from: [{source: {namespaces: [default]}}, {source: {ipBlocks: [10.9.0.0/16]}}], \
          to: [{operation: {methods: [GET]}}, {operation: {paths: [/p]}}], \
          when: [{key: 'request.headers[x-a]', values: [a]}, {key: source.ip, values: [10.0.0.0/8]}]}",
        &[
            ("all", Req::get("/").header("x-a", "a"), true),
            (
                "second from",
                Req::get("/")
                    .from(ATTACKER)
                    .src("10.9.1.1")
                    .header("x-a", "a"),
                true,
            ),
            (
                "second to",
                Req::get("/p").method("POST").header("x-a", "a"),
                true,
            ),
            (
                "no from",
                Req::get("/").from(ATTACKER).header("x-a", "a"),
                false,
            ),
            (
                "no to",
                Req::get("/").method("POST").header("x-a", "a"),
                false,
            ),
            ("first when fails", Req::get("/"), false),
            (
                "second when fails",
                Req::get("/").header("x-a", "a").src("192.168.0.1"),
                false,
            ),
        ],
    );
}

#[test]
fn fields_within_a_source_or_operation_are_anded() {
    matches_table(
        "{from: [{source: {namespaces: [default], ipBlocks: [10.1.0.0/16]}}], \
          to: [{operation: {methods: [GET], paths: [/a]}}]}",
        &[
            ("all", Req::get("/a"), true),
            ("ip fails", Req::get("/a").src("10.2.0.1"), false),
            ("ns fails", Req::get("/a").from(ATTACKER), false),
            ("path fails", Req::get("/b"), false),
            ("method fails", Req::get("/a").method("PUT"), false),
        ],
    );
}

#[test]
fn values_are_ored_and_not_values_are_anded_negated() {
    matches_table(
        "{to: [{operation: {paths: [/a/*, /b/*], notPaths: [/a/secret, /b/secret]}}]}",
        &[
            ("first value", Req::get("/a/x"), true),
            ("second value", Req::get("/b/x"), true),
            ("no value", Req::get("/c/x"), false),
            ("first notValue", Req::get("/a/secret"), false),
            ("second notValue", Req::get("/b/secret"), false),
        ],
    );
    matches_table(
        "{when: [{key: 'request.headers[x-env]', notValues: [prod, staging]}]}",
        &[
            ("dev", Req::get("/").header("x-env", "dev"), true),
            ("absent header", Req::get("/"), true),
            ("prod", Req::get("/").header("x-env", "prod"), false),
            ("staging", Req::get("/").header("x-env", "staging"), false),
        ],
    );
}

// --- 1.3 string matching --------------------------------------------------------------------

#[test]
fn string_match_forms_exact_prefix_suffix_presence() {
    let cases = |rule: &str, hits: &[&str], misses: &[&str]| {
        let s = allow_rule(rule);
        for p in hits {
            assert!(allowed(&s, &Req::get(p)), "{rule} should match {p}");
        }
        for p in misses {
            assert!(!allowed(&s, &Req::get(p)), "{rule} should not match {p}");
        }
    };
    cases(
        "{to: [{operation: {paths: [/api]}}]}",
        &["/api"],
        &["/api/", "/API", "/ap"],
    );
    cases(
        "{to: [{operation: {paths: [/api/*]}}]}",
        &["/api/", "/api/x/y"],
        &["/api", "/apix"],
    );
    cases(
        "{to: [{operation: {paths: ['*.html']}}]}",
        &["/a.html", "/x/y.html"],
        &["/a.htm", "/a.html/"],
    );
    cases("{to: [{operation: {paths: ['*']}}]}", &["/", "/x"], &[]);
    // A `*` in the middle is literal.
    cases("{to: [{operation: {paths: [/a*b]}}]}", &["/a*b"], &["/axb"]);
}

#[test]
fn hosts_are_case_insensitive_and_port_aware() {
    matches_table(
        "{to: [{operation: {hosts: [example.com, '*.example.org', 'api.*']}}]}",
        &[
            ("exact", Req::get("/").host("example.com"), true),
            ("exact other case", Req::get("/").host("EXAMPLE.com"), true),
            (
                "exact does not match with a port",
                Req::get("/").host("example.com:8080"),
                false,
            ),
            ("suffix", Req::get("/").host("a.EXAMPLE.org"), true),
            (
                "suffix with port",
                Req::get("/").host("a.example.org:80"),
                false,
            ),
            ("prefix", Req::get("/").host("API.example.net:8080"), true),
            ("other", Req::get("/").host("evil.com"), false),
        ],
    );
    matches_table(
        "{to: [{operation: {hosts: [example.com, 'example.com:*']}}]}",
        &[
            ("bare", Req::get("/").host("example.com"), true),
            ("with port", Req::get("/").host("example.com:9080"), true),
        ],
    );
    matches_table(
        "{to: [{operation: {hosts: ['*']}}]}",
        &[
            ("present", Req::get("/").host("x"), true),
            ("absent", Req::get("/").host(""), false),
        ],
    );
}

#[test]
fn header_values_are_case_sensitive_and_repeats_are_joined() {
    matches_table(
        "{when: [{key: 'request.headers[X-User]', values: [alice, 'a,b', 'pre*', '*post']}]}",
        &[
            ("exact", Req::get("/").header("x-user", "alice"), true),
            ("case", Req::get("/").header("x-user", "Alice"), false),
            (
                "joined",
                Req::get("/").header("x-user", "a").header("x-user", "b"),
                true,
            ),
            (
                "joined is not any element",
                Req::get("/")
                    .header("x-user", "alice")
                    .header("x-user", "bob"),
                false,
            ),
            ("prefix", Req::get("/").header("x-user", "prefix"), true),
            ("suffix", Req::get("/").header("x-user", "a-post"), true),
            ("absent", Req::get("/"), false),
        ],
    );
}

#[test]
fn header_presence_matches_any_value_even_empty() {
    matches_table(
        "{when: [{key: 'request.headers[x-token]', values: ['*']}]}",
        &[
            ("value", Req::get("/").header("x-token", "t"), true),
            ("empty value", Req::get("/").header("x-token", ""), true),
            ("absent", Req::get("/"), false),
        ],
    );
}

#[test]
fn inline_headers_match_one_element_of_the_joined_value() {
    matches_table(
        "{when: [{key: 'request.experimental.inline.headers[x-role]', values: [admin, 'ops-*']}]}",
        &[
            ("alone", Req::get("/").header("x-role", "admin"), true),
            ("first", Req::get("/").header("x-role", "admin,user"), true),
            ("middle", Req::get("/").header("x-role", "a,admin,b"), true),
            (
                "last, repeated headers",
                Req::get("/")
                    .header("x-role", "u")
                    .header("x-role", "admin"),
                true,
            ),
            (
                "prefix element",
                Req::get("/").header("x-role", "u,ops-1"),
                true,
            ),
            (
                "substring only",
                Req::get("/").header("x-role", "xadmin"),
                false,
            ),
        ],
    );
}

#[test]
fn methods_match_exactly() {
    matches_table(
        "{to: [{operation: {methods: [GET, 'P*']}}]}",
        &[
            ("GET", Req::get("/"), true),
            ("lower case", Req::get("/").method("get"), false),
            ("prefix", Req::get("/").method("PATCH"), true),
            ("other", Req::get("/").method("DELETE"), false),
        ],
    );
}

#[test]
fn ports_match_the_destination_port() {
    matches_table(
        "{to: [{operation: {ports: ['9080'], notPorts: ['8080']}}]}",
        &[
            ("9080", Req::get("/"), true),
            ("9081", Req::get("/").port(9081), false),
        ],
    );
    matches_table(
        "{to: [{operation: {notPorts: ['9080']}}]}",
        &[
            ("9080", Req::get("/"), false),
            ("8080", Req::get("/").port(8080), true),
        ],
    );
}

#[test]
fn paths_support_uri_templates() {
    matches_table(
        "{to: [{operation: {paths: ['/books/{*}/reviews', '/static/{**}']}}]}",
        &[
            ("one segment", Req::get("/books/42/reviews"), true),
            ("two segments", Req::get("/books/4/2/reviews"), false),
            ("empty segment", Req::get("/books//reviews"), false),
            ("any depth", Req::get("/static/a/b/c.css"), true),
            ("zero segments", Req::get("/static/"), true),
            ("no slash", Req::get("/static"), false),
            ("other", Req::get("/books"), false),
        ],
    );
    matches_table(
        "{to: [{operation: {paths: ['/a/{*}/']}}]}",
        &[
            ("trailing slash", Req::get("/a/x/"), true),
            ("without", Req::get("/a/x"), false),
        ],
    );
}

#[test]
fn paths_are_matched_after_normalisation() {
    // The proxy passes `normalize_path` output (BASE: dot segments resolved, unreserved
    // escapes decoded); `//` is not merged, exactly like Istio's default.
    let s = deny_rule("{to: [{operation: {paths: [/data/secret]}}]}");
    for (raw, denied) in [
        ("/data/secret", true),
        ("/public/../data/secret", true),
        ("/data/./secret", true),
        ("/data/%73ecret", true),
        ("/data//secret", false),
    ] {
        let path = crate::normalize_path(raw).expect("valid path");
        assert_eq!(!allowed(&s, &Req::get(&path)), denied, "{raw} -> {path}");
    }
}

// --- 1.4 source fields ----------------------------------------------------------------------

#[test]
fn principals_match_the_spiffe_uri() {
    matches_table(
        "{from: [{source: {principals: [cluster.local/ns/default/sa/sleep, 'cluster.local/ns/team-*', '*/sa/bot']}}]}",
        &[
            ("exact", Req::get("/"), true),
            (
                "prefix",
                Req::get("/").from("spiffe://cluster.local/ns/team-a/sa/x"),
                true,
            ),
            (
                "suffix",
                Req::get("/").from("spiffe://other.td/ns/x/sa/bot"),
                true,
            ),
            ("other", Req::get("/").from(ATTACKER), false),
            (
                "not a spiffe uri",
                Req::get("/").from("cluster.local/ns/default/sa/sleep"),
                false,
            ),
            ("no identity", Req::get("/").from(""), false),
        ],
    );
    matches_table(
        "{from: [{source: {principals: ['*']}}]}",
        &[
            ("any identity", Req::get("/").from(ATTACKER), true),
            ("no identity", Req::get("/").from(""), false),
        ],
    );
    matches_table(
        "{from: [{source: {notPrincipals: [cluster.local/ns/other/sa/attacker]}}]}",
        &[
            ("sleep", Req::get("/"), true),
            ("attacker", Req::get("/").from(ATTACKER), false),
            (
                "no identity is not the attacker",
                Req::get("/").from(""),
                true,
            ),
        ],
    );
}

#[test]
fn namespaces_match_principal_namespace_segment() {
    matches_table(
        "{from: [{source: {namespaces: [default, 'team-*']}}]}",
        &[
            ("default", Req::get("/"), true),
            ("other", Req::get("/").from(ATTACKER), false),
            (
                "wildcard",
                Req::get("/").from("spiffe://cluster.local/ns/team-a/sa/x"),
                true,
            ),
            (
                "namespace named like the segment elsewhere",
                Req::get("/").from("spiffe://cluster.local/ns/x/sa/default"),
                false,
            ),
            (
                "any trust domain",
                Req::get("/").from("spiffe://foo.bar/ns/default/sa/x"),
                true,
            ),
            ("no identity", Req::get("/").from(""), false),
        ],
    );
}

/// `trustDomains` / `notTrustDomains` (Istio 1.31): the peer's trust domain, exact or with
/// a `*` at either end; ours (and `cluster.local`) expanded to the trust-domain aliases.
#[test]
fn trust_domains_match_the_peer_trust_domain() {
    matches_table(
        "{from: [{source: {trustDomains: [cluster.local, '*.partner.example']}}]}",
        &[
            ("ours", Req::get("/"), true),
            (
                "a partner's",
                Req::get("/").from("spiffe://eu.partner.example/ns/x/sa/y"),
                true,
            ),
            (
                "a prefix of ours is not ours",
                Req::get("/").from("spiffe://cluster.localhost/ns/default/sa/x"),
                false,
            ),
            (
                "the trust domain named in a path is not the trust domain",
                Req::get("/").from("spiffe://evil.example/ns/cluster.local/sa/x"),
                false,
            ),
            ("no identity", Req::get("/").from(""), false),
        ],
    );
    matches_table(
        "{from: [{source: {notTrustDomains: [other.example]}}]}",
        &[
            ("ours", Req::get("/"), true),
            (
                "excluded",
                Req::get("/").from("spiffe://other.example/ns/default/sa/x"),
                false,
            ),
        ],
    );
}

#[test]
fn service_accounts_match_namespace_and_name() {
    matches_table(
        "{from: [{source: {serviceAccounts: [sleep, other/attacker]}}]}",
        &[
            ("policy namespace", Req::get("/"), true),
            ("explicit namespace", Req::get("/").from(ATTACKER), true),
            (
                "same name other namespace",
                Req::get("/").from("spiffe://cluster.local/ns/other/sa/sleep"),
                false,
            ),
            (
                "name prefix only",
                Req::get("/").from("spiffe://cluster.local/ns/default/sa/sleepy"),
                false,
            ),
        ],
    );
    let e = errs(&[ap(
        "p",
        "rules: [{from: [{source: {serviceAccounts: [a], principals: [b]}}]}]",
    )]);
    assert_error(
        &e,
        "p",
        "spec.rules[0].from[0].source.serviceAccounts",
        "cannot set serviceAccounts with namespaces or principals",
    );
    for (bad, msg) in [("'a*'", "wildcard"), ("a/b/c", "expected format")] {
        let e = errs(&[ap(
            "p",
            &format!("rules: [{{from: [{{source: {{serviceAccounts: [{bad}]}}}}]}}]"),
        )]);
        assert_error(
            &e,
            "p",
            "spec.rules[0].from[0].source.serviceAccounts[0]",
            msg,
        );
    }
}

#[test]
fn request_principals_need_a_token() {
    let token = json!({"iss": "https://issuer.example.com", "sub": "alice", "aud": ["a", "b"], "azp": "web"});
    matches_table(
        "{from: [{source: {requestPrincipals: ['*']}}]}",
        &[
            ("token", Req::get("/").claims(token.clone()), true),
            ("no token", Req::get("/"), false),
        ],
    );
    matches_table(
        "{from: [{source: {notRequestPrincipals: ['*']}}]}",
        &[
            ("no token", Req::get("/"), true),
            ("token", Req::get("/").claims(token.clone()), false),
        ],
    );
    matches_table(
        "{from: [{source: {requestPrincipals: [https://issuer.example.com/alice]}}]}",
        &[
            (
                "split at last slash",
                Req::get("/").claims(token.clone()),
                true,
            ),
            (
                "other subject",
                Req::get("/").claims(json!({"iss": "https://issuer.example.com", "sub": "bob"})),
                false,
            ),
            ("no token", Req::get("/"), false),
        ],
    );
    matches_table(
        "{from: [{source: {requestPrincipals: ['*/alice', 'https://other.example.com/*']}}]}",
        &[
            (
                "any issuer, subject alice",
                Req::get("/").claims(token.clone()),
                true,
            ),
            (
                "issuer, any subject",
                Req::get("/").claims(json!({"iss": "https://other.example.com", "sub": "x"})),
                true,
            ),
            (
                "neither",
                Req::get("/").claims(json!({"iss": "https://x", "sub": "bob"})),
                false,
            ),
        ],
    );
    // Without verified claims, `request_principal` (`iss/sub`) is used.
    let s =
        allow_rule("{from: [{source: {requestPrincipals: [https://issuer.example.com/alice]}}]}");
    let mut r = Req::get("/");
    r.request_principal = Some("https://issuer.example.com/alice".into());
    assert!(allowed(&s, &r));
}

#[test]
fn ip_blocks_match_source_ip_cidr_or_single_address() {
    matches_table(
        "{from: [{source: {ipBlocks: [10.1.0.0/16, 192.168.1.7, 'fd00::/8'], notIpBlocks: [10.1.2.0/24]}}]}",
        &[
            ("in cidr", Req::get("/"), true),
            ("excluded", Req::get("/").src("10.1.2.3"), false),
            ("single", Req::get("/").src("192.168.1.7"), true),
            ("single other", Req::get("/").src("192.168.1.8"), false),
            ("ipv6", Req::get("/").src("fd00::1"), true),
            (
                "ipv4-mapped ipv6",
                Req::get("/").src("::ffff:10.1.0.9"),
                true,
            ),
            (
                "remote ip is not source ip",
                Req::get("/").src("8.8.8.8").remote("10.1.0.1"),
                false,
            ),
        ],
    );
}

#[test]
fn remote_ip_blocks_match_remote_ip() {
    matches_table(
        "{from: [{source: {remoteIpBlocks: [203.0.113.0/24]}}]}",
        &[
            ("remote in", Req::get("/").remote("203.0.113.9"), true),
            (
                "source in, remote out",
                Req::get("/").src("203.0.113.9"),
                false,
            ),
        ],
    );
}

#[test]
fn bad_cidr_is_an_error_naming_the_field() {
    let e = errs(&[ap(
        "p",
        "rules: [{from: [{source: {ipBlocks: [10.0.0.0/8, 10.0.0.0/33]}}]}]",
    )]);
    assert_error(
        &e,
        "p",
        "spec.rules[0].from[0].source.ipBlocks[1]",
        "bad CIDR range",
    );
    let e = errs(&[ap(
        "p",
        "rules: [{when: [{key: source.ip, notValues: [not-an-ip]}]}]",
    )]);
    assert_error(
        &e,
        "p",
        "spec.rules[0].when[0].notValues[0]",
        "bad IP address",
    );
}

// --- 1.6 when keys --------------------------------------------------------------------------

#[test]
fn when_keys_read_the_documented_attributes() {
    let token = json!({
        "iss": "https://issuer.example.com", "sub": "alice", "aud": ["api", "web"], "azp": "spa",
        "groups": ["dev", "ops"], "nested": {"level": "gold", "n": 3}
    });
    let with_token = Req::get("/").claims(token);
    let cases: &[(&str, &str, Req, bool)] = &[
        (
            "request.headers[x-a]",
            "a",
            Req::get("/").header("x-a", "a"),
            true,
        ),
        ("request.headers[x-a]", "a", Req::get("/"), false),
        (
            "request.headers[:authority]",
            "reviews:*",
            Req::get("/"),
            true,
        ),
        ("request.headers[:method]", "GET", Req::get("/"), true),
        ("source.ip", "10.1.0.0/16", Req::get("/"), true),
        ("source.ip", "10.2.0.0/16", Req::get("/"), false),
        ("remote.ip", "10.1.0.5", Req::get("/"), true),
        ("source.namespace", "default", Req::get("/"), true),
        (
            "source.namespace",
            "default",
            Req::get("/").from(ATTACKER),
            false,
        ),
        (
            "source.principal",
            "cluster.local/ns/default/sa/sleep",
            Req::get("/"),
            true,
        ),
        (
            "source.serviceAccount",
            "default/sleep",
            Req::get("/"),
            true,
        ),
        (
            "request.auth.principal",
            "https://issuer.example.com/alice",
            with_token.clone(),
            true,
        ),
        ("request.auth.principal", "*", Req::get("/"), false),
        ("request.auth.audiences", "web", with_token.clone(), true),
        (
            "request.auth.audiences",
            "mobile",
            with_token.clone(),
            false,
        ),
        ("request.auth.presenter", "spa", with_token.clone(), true),
        (
            "request.auth.claims[groups]",
            "ops",
            with_token.clone(),
            true,
        ),
        (
            "request.auth.claims[groups]",
            "admin",
            with_token.clone(),
            false,
        ),
        (
            "request.auth.claims[nested][level]",
            "gold",
            with_token.clone(),
            true,
        ),
        (
            "request.auth.claims[nested][n]",
            "3",
            with_token.clone(),
            false,
        ),
        (
            "request.auth.claims[missing]",
            "*",
            with_token.clone(),
            false,
        ),
        ("destination.ip", "10.0.0.10", Req::get("/"), true),
        ("destination.ip", "10.0.0.0/30", Req::get("/"), false),
        ("destination.port", "9080", Req::get("/"), true),
        ("destination.port", "80", Req::get("/"), false),
        // The waypoint's inner connection has no TLS: the SNI is empty.
        ("connection.sni", "*", Req::get("/"), false),
    ];
    for (key, value, req, want) in cases {
        let s = allow_rule(&format!(
            "{{when: [{{key: '{key}', values: ['{value}']}}]}}"
        ));
        assert_eq!(allowed(&s, req), *want, "{key} = {value}");
    }
    let s = allow_rule("{when: [{key: request.auth.audiences, values: [api]}]}");
    assert!(allowed(
        &s,
        &Req::get("/").claims(json!({"iss": "i", "sub": "s", "aud": "api"}))
    ));
}

#[test]
fn unsupported_when_keys_are_errors() {
    for (key, msg) in [
        ("request.foo", "unknown attribute"),
        ("source.trustDomain", "unknown attribute"),
        (
            "destination.namespace",
            "replaced by the metadata.namespace",
        ),
        (
            "destination.labels[app]",
            "replaced by the workload selector",
        ),
        ("destination.user", "only supported in v1alpha1"),
        (
            "experimental.envoy.filters.a.b[c]",
            "not supported by this waypoint",
        ),
        ("request.headers", "should have format a[b]"),
        ("request.headers[]", "should have format a[b]"),
        ("request.headers[:path]", "not supported"),
        ("request.auth.claims", "should have format a[b]"),
    ] {
        let e = errs(&[ap(
            "p",
            &format!("rules: [{{when: [{{key: '{key}', values: [x]}}]}}]"),
        )]);
        assert_error(&e, "p", "spec.rules[0].when[0].key", msg);
    }
    let e = errs(&[ap("p", "rules: [{when: [{key: source.ip}]}]")]);
    assert_error(
        &e,
        "p",
        "spec.rules[0].when[0]",
        "at least one of `values` or `notValues`",
    );
    let e = errs(&[ap(
        "p",
        "rules: [{when: [{key: destination.port, values: ['70000']}]}]",
    )]);
    assert_error(&e, "p", "spec.rules[0].when[0].values[0]", "bad port");
}

// --- 1.7 HTTP-only fields on TCP ------------------------------------------------------------

#[test]
fn http_only_fields_drop_allow_rules_on_tcp() {
    for rule in [
        "{to: [{operation: {methods: [GET]}}]}",
        "{to: [{operation: {ports: ['5432'], paths: ['*']}}]}",
        "{to: [{operation: {notHosts: [x]}}]}",
        "{from: [{source: {requestPrincipals: ['*']}}]}",
        "{from: [{source: {namespaces: [default]}}, {source: {notRequestPrincipals: ['*']}}]}",
        "{when: [{key: 'request.headers[x]', notValues: ['y']}]}",
        "{when: [{key: 'request.auth.claims[a]', values: [b]}]}",
    ] {
        let s = set(&[ap(
            "p",
            &format!("rules: [{rule}, {{to: [{{operation: {{ports: ['1']}}}}]}}]"),
        )]);
        assert!(!allowed(&s, &Req::tcp()), "ALLOW {rule} must not match TCP");
        assert_eq!(
            eval(&s, &Req::tcp()).details,
            "rbac_access_denied_matched_policy[none]"
        );
    }
    // Rules without HTTP fields still allow TCP.
    let s = allow_rule(
        "{from: [{source: {namespaces: [default]}}], to: [{operation: {ports: ['5432']}}]}",
    );
    assert!(allowed(&s, &Req::tcp()));
}

#[test]
fn http_only_fields_ignored_by_deny_on_tcp() {
    let cases: &[(&str, bool)] = &[
        // "a DENY on methods: [POST] without ports denies all TCP traffic"
        ("{to: [{operation: {methods: [POST]}}]}", true),
        (
            "{to: [{operation: {methods: [POST], ports: ['5432']}}]}",
            true,
        ),
        (
            "{to: [{operation: {methods: [POST], ports: ['80']}}]}",
            false,
        ),
        ("{from: [{source: {requestPrincipals: [a/b]}}]}", true),
        (
            "{from: [{source: {notRequestPrincipals: ['*'], namespaces: [other]}}]}",
            false,
        ),
        (
            "{when: [{key: 'request.headers[x]', values: ['y']}, {key: source.namespace, values: [default]}]}",
            true,
        ),
    ];
    for (rule, denied) in cases {
        let s = deny_rule(rule);
        assert_eq!(!allowed(&s, &Req::tcp()), *denied, "DENY {rule} on TCP");
    }
    // The same rules on HTTP still need their HTTP fields.
    assert!(allowed(&deny_rule(cases[0].0), &Req::get("/")));
}

#[test]
fn audit_ignores_http_only_fields_on_tcp() {
    let s = set(&[ap(
        "a",
        "action: AUDIT, rules: [{to: [{operation: {methods: [POST]}}]}]",
    )]);
    let d = eval(&s, &Req::tcp());
    assert!(d.allowed);
    assert_eq!(d.audit.as_deref(), Some("ns[default]-policy[a]-rule[0]"));
}

// --- 1.9 bypass pitfalls: same behaviour as Istio ---------------------------------------

#[test]
fn exact_host_policies_miss_host_with_port_as_in_istio() {
    let s = deny_rule("{to: [{operation: {hosts: [reviews]}}]}");
    assert!(!allowed(&s, &Req::get("/").host("reviews")));
    assert!(allowed(&s, &Req::get("/").host("reviews:9080")));
}

// --- 1.10 principal format, trust domains ----------------------------------------------------

#[test]
fn principals_in_cluster_local_follow_the_local_trust_domain() {
    let opts = CompileOptions {
        trust_domain: "example.org".into(),
        ..CompileOptions::default()
    };
    let s = build_with(
        &opts,
        &[ap(
            "p",
            "rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/sleep, 'other.td/ns/default/sa/x']}}]}]",
        )],
    )
    .expect("compiles");
    let s = reviews(&s);
    table(
        &s,
        &[
            (
                "local trust domain",
                Req::get("/").from("spiffe://example.org/ns/default/sa/sleep"),
                (true, Some(R0)),
            ),
            (
                "cluster.local literal is replaced",
                Req::get("/"),
                DENY_NONE,
            ),
            (
                "foreign trust domain kept as written",
                Req::get("/").from("spiffe://other.td/ns/default/sa/x"),
                (true, Some(R0)),
            ),
        ],
    );
}

#[test]
fn trust_domain_aliases_expand_principals() {
    let opts = CompileOptions {
        trust_domain: "new.td".into(),
        trust_domain_aliases: vec!["old.td".into()],
        ..CompileOptions::default()
    };
    let s = build_with(
        &opts,
        &[ap(
            "p",
            "rules: [{from: [{source: {principals: [old.td/ns/default/sa/sleep, '*/ns/x/sa/y', 'a/b']}}]}]",
        )],
    )
    .expect("compiles");
    let s = reviews(&s);
    for (p, want) in [
        ("spiffe://new.td/ns/default/sa/sleep", true),
        ("spiffe://old.td/ns/default/sa/sleep", true),
        ("spiffe://cluster.local/ns/default/sa/sleep", false),
        // `*` trust domain: kept, suffix match on any trust domain.
        ("spiffe://anything/ns/x/sa/y", true),
        // Not 5 segments: kept as written.
        ("spiffe://a/b", true),
    ] {
        assert_eq!(allowed(&s, &Req::get("/").from(p)), want, "{p}");
    }
}

// --- 1.11 attachment ------------------------------------------------------------------------

#[test]
fn selector_policies_are_ignored_with_a_warning() {
    let s = snap(&[
        ap_raw(
            "default",
            "sel",
            "",
            "{selector: {matchLabels: {app: reviews}}}",
        ),
        ap_raw("default", "nsw", "", "{}"),
    ]);
    assert!(reviews(&s).is_empty());
    assert!(s.authz_policies().is_empty());
    assert!(
        s.warnings.iter().any(|w| w
            == "AuthorizationPolicy default/sel uses a selector; waypoints ignore selector-based policies (attach it with targetRefs to the Gateway or Service)"),
        "{:?}",
        s.warnings
    );
    assert!(
        s.warnings
            .iter()
            .any(|w| w.contains("default/nsw has no targetRefs")),
        "{:?}",
        s.warnings
    );
    // An allow-nothing without targetRefs does not protect the waypoint (istio/istio#58838).
    assert!(allowed(&reviews(&s), &Req::get("/")));
}

#[test]
fn service_attached_policy_applies_only_to_that_service() {
    let s = snap(&[ap_raw(
        "default",
        "p",
        "",
        "{targetRefs: [{kind: Service, group: '', name: reviews}], rules: [{to: [{operation: {methods: [GET]}}]}]}",
    )]);
    let post = Req::get("/").method("POST");
    assert!(!allowed(&s.authz_for("default", "reviews"), &post));
    assert!(allowed(&s.authz_for("default", "ratings"), &post));
    assert!(allowed(&s.authz_for("other", "reviews"), &post));
    let ratings = match s.lookup_vip("10.0.0.11:9080".parse().expect("addr")) {
        crate::VipLookup::Bound(sp) => sp,
        other => panic!("{other:?}"),
    };
    assert!(ratings.authz.is_empty());
}

#[test]
fn gateway_and_service_policies_merge_for_the_service() {
    let s = snap(&[
        ap(
            "gw-allow",
            "rules: [{to: [{operation: {methods: [GET, POST]}}]}]",
        ),
        ap_raw(
            "default",
            "svc-deny",
            "",
            "{targetRef: {kind: Service, name: reviews}, action: DENY, rules: [{to: [{operation: {methods: [POST]}}]}]}",
        ),
    ]);
    let post = Req::get("/").method("POST");
    table(
        &s.authz_for("default", "reviews"),
        &[
            (
                "POST denied by the service policy",
                post.clone(),
                (false, Some("ns[default]-policy[svc-deny]-rule[0]")),
            ),
            (
                "PUT denied by the waypoint allow",
                Req::get("/").method("PUT"),
                DENY_NONE,
            ),
        ],
    );
    assert!(allowed(&s.authz_for("default", "ratings"), &post));
    assert_eq!(s.authz_policies().len(), 2);
}

#[test]
fn gateway_target_applies_only_from_the_gateways_namespace() {
    let s = snap(&[
        ap_raw("other", "p", "", &format!("{{{GW_REF}, rules: []}}")),
        ap_raw(
            "default",
            "q",
            "",
            "{targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: other-waypoint}], rules: []}",
        ),
    ]);
    assert!(reviews(&s).is_empty());
}

#[test]
fn gateway_class_target_applies_only_from_the_root_namespace() {
    let class_ref = "{targetRefs: [{group: gateway.networking.k8s.io, kind: GatewayClass, name: istio-waypoint}], rules: []}";
    let s = snap(&[ap_raw("istio-system", "mesh-deny", "", class_ref)]);
    assert!(!allowed(&reviews(&s), &Req::get("/")));
    assert!(!allowed(&s.authz_for("default", "ratings"), &Req::get("/")));
    let s = snap(&[ap_raw("default", "not-root", "", class_ref)]);
    assert!(allowed(&reviews(&s), &Req::get("/")));
    assert!(
        s.warnings.iter().any(|w| w.contains("root namespace")),
        "{:?}",
        s.warnings
    );
    let opts = CompileOptions {
        root_namespace: "mesh-root".into(),
        ..CompileOptions::default()
    };
    let s = build_with(&opts, &[ap_raw("mesh-root", "m", "", class_ref)]).expect("compiles");
    assert!(!allowed(&reviews(&s), &Req::get("/")));
}

#[test]
fn invalid_target_refs_are_errors() {
    let cases = [
        (
            "{targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint, namespace: other}]}",
            "spec.targetRefs[0].namespace",
            "cross namespace",
        ),
        (
            "{targetRefs: [{kind: Gateway, name: waypoint}]}",
            "spec.targetRefs[0].kind",
            "targetRef must be to one of",
        ),
        (
            "{targetRefs: [{kind: Service}]}",
            "spec.targetRefs[0].name",
            "must be set",
        ),
        (
            "{selector: {matchLabels: {a: b}}, targetRefs: [{kind: Service, name: reviews}]}",
            "spec.selector",
            "only one of",
        ),
    ];
    for (spec, field, msg) in cases {
        let e = errs(&[ap_raw("default", "p", "", spec)]);
        assert_error(&e, "p", field, msg);
    }
    let many: Vec<String> = (0..17)
        .map(|i| format!("{{kind: Service, name: s{i}}}"))
        .collect();
    let e = errs(&[ap_raw(
        "default",
        "p",
        "",
        &format!("{{targetRefs: [{}]}}", many.join(", ")),
    )]);
    assert_error(&e, "p", "spec.targetRefs", "at most 16");
}

// --- 1.12 denial response -------------------------------------------------------------------

#[test]
fn denial_details_name_the_rule_or_none() {
    let s = set(&[
        ap("allow", "rules: [{to: [{operation: {paths: [/ok]}}]}]"),
        ap(
            "deny",
            "action: DENY, rules: [{to: [{operation: {paths: [/bad]}}]}]",
        ),
    ]);
    let cases = [
        ("/ok", true, ""),
        (
            "/bad",
            false,
            "rbac_access_denied_matched_policy[ns[default]-policy[deny]-rule[0]]",
        ),
        ("/other", false, "rbac_access_denied_matched_policy[none]"),
    ];
    for (path, allow, details) in cases {
        let d = eval(&s, &Req::get(path));
        assert_eq!((d.allowed, d.details.as_str()), (allow, details), "{path}");
    }
}

// --- 1.13 AUDIT -----------------------------------------------------------------------------

#[test]
fn audit_never_changes_the_decision() {
    let audit = ap(
        "audit",
        "action: AUDIT, rules: [{to: [{operation: {paths: [/a/*]}}]}]",
    );
    let with_allow = set(&[
        audit.clone(),
        ap("allow", "rules: [{to: [{operation: {paths: [/a/ok]}}]}]"),
    ]);
    let alone = set(&[audit]);
    let id = Some("ns[default]-policy[audit]-rule[0]");
    for (s, path, allow, audited) in [
        (&alone, "/a/x", true, id),
        (&alone, "/b", true, None),
        (&with_allow, "/a/ok", true, id),
        (&with_allow, "/a/x", false, id),
        (&with_allow, "/b", false, None),
    ] {
        let d = eval(s, &Req::get(path));
        assert_eq!((d.allowed, d.audit.as_deref()), (allow, audited), "{path}");
    }
}

// --- dry run --------------------------------------------------------------------------------

#[test]
fn dry_run_audit_has_no_effect() {
    let s = set(&[ap_raw(
        "default",
        "a",
        ", annotations: {istio.io/dry-run: 'true'}",
        &format!("{{{GW_REF}, action: AUDIT, rules: [{{}}]}}"),
    )]);
    let d = eval(&s, &Req::get("/"));
    assert!(
        d.allowed && d.audit.is_none() && d.dry_run.is_none(),
        "{d:?}"
    );
}

#[test]
fn dry_run_never_enforces() {
    let dry = ", annotations: {istio.io/dry-run: 'true'}";
    let s = set(&[
        ap_raw(
            "default",
            "dry-deny",
            dry,
            &format!(
                "{{{GW_REF}, action: DENY, rules: [{{to: [{{operation: {{methods: [POST]}}}}]}}]}}"
            ),
        ),
        ap_raw(
            "default",
            "dry-allow",
            dry,
            &format!("{{{GW_REF}, rules: [{{to: [{{operation: {{paths: [/only]}}}}]}}]}}"),
        ),
    ]);
    let cases = [
        (
            Req::get("/only"),
            Some(DryRun {
                allowed: true,
                matched_policy: Some("ns[default]-policy[dry-allow]-rule[0]".into()),
            }),
        ),
        (
            Req::get("/x"),
            Some(DryRun {
                allowed: false,
                matched_policy: None,
            }),
        ),
        (
            Req::get("/only").method("POST"),
            Some(DryRun {
                allowed: false,
                matched_policy: Some("ns[default]-policy[dry-deny]-rule[0]".into()),
            }),
        ),
    ];
    for (req, dry_run) in cases {
        let d = eval(&s, &req);
        assert!(d.allowed, "dry-run policies never deny: {d:?}");
        assert_eq!(d.matched_policy, None);
        assert_eq!(d.dry_run, dry_run, "{req:?}");
    }
    // Without dry-run policies there is no dry-run result.
    assert_eq!(eval(&set(&[]), &Req::get("/")).dry_run, None);
    // An enforced DENY stops the chain before the dry-run ALLOW rules are reached.
    let s = set(&[
        ap("deny", "action: DENY, rules: [{}]"),
        ap_raw(
            "default",
            "dry-allow",
            dry,
            &format!("{{{GW_REF}, rules: [{{}}]}}"),
        ),
    ]);
    let d = eval(&s, &Req::get("/"));
    assert!(!d.allowed);
    assert_eq!(d.dry_run, None);
}

#[test]
fn invalid_dry_run_annotation_is_enforced_with_a_warning() {
    let s = snap(&[ap_raw(
        "default",
        "p",
        ", annotations: {istio.io/dry-run: 'yes'}",
        &format!("{{{GW_REF}, rules: []}}"),
    )]);
    assert!(!allowed(&reviews(&s), &Req::get("/")));
    assert!(
        s.warnings.iter().any(|w| w.contains("istio.io/dry-run")),
        "{:?}",
        s.warnings
    );
}

// --- 1.14 CUSTOM ----------------------------------------------------------------------------

#[test]
fn custom_policy_validation_follows_istio() {
    let e = errs(&[ap("c", "action: CUSTOM, rules: [{}]")]);
    assert_error(&e, "c", "spec.provider.name", "must not be empty");
    let e = errs(&[ap(
        "c",
        "action: CUSTOM, provider: {name: x}, rules: [{from: [{source: {principals: [a]}}]}]",
    )]);
    assert_error(
        &e,
        "c",
        "spec.rules[0].from[0].source.principals",
        "not supported with CUSTOM",
    );
    let e = errs(&[ap(
        "c",
        "action: CUSTOM, provider: {name: x}, rules: [{when: [{key: request.auth.principal, values: [a]}]}]",
    )]);
    assert_error(
        &e,
        "c",
        "spec.rules[0].when[0].key",
        "not supported with CUSTOM",
    );
    let e = errs(&[ap("a", "provider: {name: x}, rules: [{}]")]);
    assert_error(&e, "a", "spec.provider", "non CUSTOM action");
}

#[test]
fn custom_dry_run_is_still_enforced_as_in_istio() {
    let s = set(&[ap_raw(
        "default",
        "c",
        ", annotations: {istio.io/dry-run: 'true'}",
        &format!("{{{GW_REF}, action: CUSTOM, provider: {{name: x}}, rules: [{{}}]}}"),
    )]);
    assert!(!s.policies()[0].dry_run);
    assert!(!allowed(&s, &Req::get("/")));
}

// --- validation -----------------------------------------------------------------------------

#[test]
fn validation_errors_name_the_policy_and_field() {
    let cases = [
        (
            "action: MAYBE, rules: [{}]",
            "spec.action",
            "invalid action",
        ),
        (
            "rules: [{from: []}]",
            "spec.rules[0].from",
            "must not be empty",
        ),
        ("rules: [{to: []}]", "spec.rules[0].to", "must not be empty"),
        (
            "rules: [{from: [{}]}]",
            "spec.rules[0].from[0].source",
            "is required",
        ),
        (
            "rules: [{from: [{source: {}}]}]",
            "spec.rules[0].from[0].source",
            "must not be empty",
        ),
        (
            "rules: [{to: [{}]}]",
            "spec.rules[0].to[0].operation",
            "is required",
        ),
        (
            "rules: [{to: [{operation: {}}]}]",
            "spec.rules[0].to[0].operation",
            "must not be empty",
        ),
        (
            "rules: [{to: [{operation: {methods: ['']}}]}]",
            "spec.rules[0].to[0].operation.methods[0]",
            "empty value",
        ),
        (
            "rules: [{to: [{operation: {ports: ['80', '+80']}}]}]",
            "spec.rules[0].to[0].operation.ports[1]",
            "bad port",
        ),
        (
            "rules: [{to: [{operation: {notPorts: ['65536']}}]}]",
            "spec.rules[0].to[0].operation.notPorts[0]",
            "bad port",
        ),
        (
            "rules: [{to: [{operation: {paths: [api/v1]}}]}]",
            "spec.rules[0].to[0].operation.paths[0]",
            "must start with '/'",
        ),
        (
            "rules: [{to: [{operation: {paths: ['/a/{**}/{*}']}}]}]",
            "spec.rules[0].to[0].operation.paths[0]",
            "not the last operator",
        ),
        (
            "rules: [{to: [{operation: {paths: ['/a/{x}']}}]}]",
            "spec.rules[0].to[0].operation.paths[0]",
            "beyond a supported path template",
        ),
        (
            "rules: [{to: [{operation: {notPaths: ['/a/*/{*}']}}]}]",
            "spec.rules[0].to[0].operation.notPaths[0]",
            "invalid string literal",
        ),
        (
            "rules: [{to: [{operation: {paths: ['/a//{*}']}}]}]",
            "spec.rules[0].to[0].operation.paths[0]",
            "invalid string literal",
        ),
        (
            "rules: [{from: [{source: {namespaces: ['a(b']}}]}]",
            "spec.rules[0].from[0].source.namespaces[0]",
            "invalid regular expression",
        ),
        (
            "rules: [{when: [{key: '', values: [a]}]}]",
            "spec.rules[0].when[0].key",
            "must not be empty",
        ),
    ];
    for (body, field, msg) in cases {
        let e = errs(&[ap("p", body)]);
        assert_error(&e, "p", field, msg);
    }
}

#[test]
fn all_errors_are_reported_together() {
    let e = errs(&[
        ap("a", "rules: [{to: [{operation: {ports: [x]}}]}]"),
        ap("b", "action: DENY"),
        ap_raw(
            "default",
            "c",
            "",
            "{targetRefs: [{kind: Pod, name: x}], action: NOPE}",
        ),
    ]);
    assert_error(
        &e,
        "a",
        "spec.rules[0].to[0].operation.ports[0]",
        "bad port",
    );
    assert_error(&e, "b", "spec.rules", "DENY action");
    assert_error(
        &e,
        "c",
        "spec.targetRefs[0].kind",
        "targetRef must be to one of",
    );
    assert_error(&e, "c", "spec.action", "invalid action");
}

#[test]
fn deny_with_only_http_attributes_warns_about_tcp() {
    let s = snap(&[ap(
        "d",
        "action: DENY, rules: [{to: [{operation: {methods: [POST]}}]}]",
    )]);
    assert!(
        s.warnings
            .iter()
            .any(|w| w.contains("default/d") && w.contains("deny all traffic to TCP ports")),
        "{:?}",
        s.warnings
    );
}

#[test]
fn v1beta1_is_accepted_and_unknown_kind_warnings_do_not_fire() {
    let text = format!(
        "{BASE}---\napiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: default}}\nspec: {{{GW_REF}}}\n"
    );
    let loaded = parse_manifests(&text, "t.yaml").expect("parses");
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let s = compile(&loaded, &CompileOptions::default()).expect("compiles");
    assert!(!allowed(&reviews(&s), &Req::get("/")));
}

#[test]
fn duplicate_policy_is_an_error() {
    let p = ap("p", "rules: [{}]");
    let e = errs(&[p.clone(), p]);
    assert_error(&e, "p", "metadata.name", "defined more than once");
}

// --- properties -----------------------------------------------------------------------------

/// A DENY rule from a small grammar covering every field kind.
fn deny_rule_strategy() -> impl Strategy<Value = String> {
    let from = prop::sample::select(vec![
        "",
        "from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}]",
        "from: [{source: {notPrincipals: ['cluster.local/ns/other/*']}}]",
        "from: [{source: {namespaces: [other]}}]",
        "from: [{source: {requestPrincipals: ['*']}}]",
        "from: [{source: {ipBlocks: [10.1.0.0/16]}}]",
        "from: [{source: {notIpBlocks: [10.1.0.0/16]}}]",
    ]);
    let to = prop::sample::select(vec![
        "",
        "to: [{operation: {methods: [POST]}}]",
        "to: [{operation: {notMethods: [GET]}}]",
        "to: [{operation: {paths: ['/a/*']}}]",
        "to: [{operation: {paths: ['/{*}']}}]",
        "to: [{operation: {ports: ['8080']}}]",
        "to: [{operation: {hosts: ['*.evil']}}]",
    ]);
    let when = prop::sample::select(vec![
        "",
        "when: [{key: 'request.headers[x-a]', values: ['*']}]",
        "when: [{key: source.namespace, notValues: [default]}]",
        "when: [{key: destination.port, values: ['5432']}]",
    ]);
    (from, to, when).prop_map(|(f, t, w)| {
        let parts: Vec<&str> = [f, t, w].into_iter().filter(|p| !p.is_empty()).collect();
        format!("{{{}}}", parts.join(", "))
    })
}

fn request_strategy() -> impl Strategy<Value = Req> {
    (
        prop::sample::select(vec![SLEEP, ATTACKER, ""]),
        prop::sample::select(vec!["GET", "POST", "PUT"]),
        prop::sample::select(vec!["/", "/a/b", "/b", "/a/b/c"]),
        prop::sample::select(vec!["10.1.0.5", "10.2.0.5"]),
        prop::sample::select(vec![9080u16, 8080, 5432]),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(p, m, path, src, port, http, header)| {
            let mut r = Req::get(path).from(p).method(m).src(src).port(port);
            r.http = http;
            if header {
                r = r.header("x-a", "1");
            }
            r
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Adding a DENY rule that does not match a request never changes an allow.
    #[test]
    fn non_matching_deny_rule_never_changes_an_allow(
        rule in deny_rule_strategy(),
        req in request_strategy(),
        allow in prop::sample::select(vec![
            "",
            "rules: [{}]",
            "rules: [{from: [{source: {namespaces: [default]}}], to: [{operation: {methods: [GET]}}]}]",
        ]),
    ) {
        let deny_only = deny_rule(&rule);
        prop_assume!(allowed(&deny_only, &req));
        let mut docs = vec![ap("deny", &format!("action: DENY, rules: [{rule}]"))];
        if !allow.is_empty() {
            docs.push(ap("allow", allow));
        }
        let with_deny = set(&docs);
        let without_deny = set(&docs[1..]);
        let before = eval(&without_deny, &req);
        prop_assume!(before.allowed);
        prop_assert_eq!(eval(&with_deny, &req), before);
    }

    /// Any string in any value position compiles or fails with errors, never panics, and the
    /// compiled policy evaluates without panicking.
    #[test]
    fn arbitrary_values_never_panic(v in "[ -~]{0,12}", req in request_strategy()) {
        let v = v.replace(['\\', '\''], "");
        for rule in [
            format!("{{to: [{{operation: {{paths: ['{v}'], hosts: ['{v}'], methods: ['{v}']}}}}]}}"),
            format!("{{from: [{{source: {{principals: ['{v}'], namespaces: ['{v}']}}}}]}}"),
            format!("{{from: [{{source: {{requestPrincipals: ['{v}']}}}}]}}"),
            format!("{{when: [{{key: 'request.headers[x-a]', values: ['{v}']}}]}}"),
            format!("{{when: [{{key: '{v}', values: ['{v}']}}]}}"),
            format!("{{when: [{{key: 'request.auth.claims{v}', values: ['{v}']}}]}}"),
        ] {
            let text = format!("{BASE}---\n{}", ap("p", &format!("rules: [{rule}]")));
            if let Ok(loaded) = parse_manifests(&text, "t.yaml")
                && let Ok(s) = compile(&loaded, &CompileOptions::default())
            {
                let _ = eval(&reviews(&s), &req);
            }
        }
    }
}
