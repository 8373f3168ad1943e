//! The real `waypoint` binary, driven as users and Kubernetes drive it: `check`, `certs`,
//! `run` (readiness, a request over HBONE, SIGHUP reload, SIGTERM drain) and `demo`.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{BIN, dev_certs, sleep_client_tls, start_run};

fn examples_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

#[test]
fn check_accepts_every_bundled_example() {
    // Each file or directory under examples/ is one complete configuration.
    for entry in std::fs::read_dir(examples_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() || path.extension().is_some_and(|e| e == "yaml") {
            let out = Command::new(BIN)
                .arg("check")
                .arg("--config")
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}{}",
                path.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn check_names_every_invalid_resource_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let bad = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: default}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default, labels: {istio.io/use-waypoint: waypoint}}
spec: {clusterIP: 10.0.0.10, ports: [{name: http, port: 9080}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: broken, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: "no-slash"}}]
    backendRefs: [{name: reviews, port: 9080}]
  - matches: [{path: {type: RegularExpression, value: "(unclosed"}}]
    backendRefs: [{name: reviews, port: 9080}]
"#;
    std::fs::write(dir.path().join("bad.yaml"), bad).unwrap();
    let out = Command::new(BIN)
        .arg("check")
        .arg("--config")
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "invalid config must fail: {text}");
    assert!(
        text.contains("HTTPRoute default/broken: spec.rules[0].matches[0].path.value"),
        "{text}"
    );
    assert!(
        text.contains("HTTPRoute default/broken: spec.rules[1].matches[0].path.value"),
        "{text}"
    );
    assert!(text.contains("2 problem(s) found"), "{text}");

    // A YAML syntax error names the file.
    std::fs::write(
        dir.path().join("bad.yaml"),
        "kind: Service\nmetadata: [unclosed\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("check")
        .arg("--config")
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(text.contains("bad.yaml"), "{text}");
}

fn wait_line(rx: &std::sync::mpsc::Receiver<String>, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("no stderr line containing {needle:?}"));
        if line.contains(needle) {
            return line;
        }
    }
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn run_serves_reloads_on_sighup_and_drains_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dev_certs(dir.path());
    let config_dir = dir.path().join("config");
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::copy(
        examples_dir().join("bookinfo.yaml"),
        config_dir.join("bookinfo.yaml"),
    )
    .unwrap();

    let mut wp = start_run(&config_dir, &certs, &["--drain-timeout", "2s"], &[]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Readiness.
        let (status, _) = http_get(wp.ready, "/healthz/ready").await;
        assert_eq!(status, 200);
        // A CONNECT over real mTLS as the dev `sleep` identity: reviews has no backend running
        // here, so the waypoint answers 503 after Envoy-style retries (the tunnel works).
        let tls = sleep_client_tls(&certs);
        let conn = hbone::client::Connection::connect(wp.hbone, tls, &Default::default())
            .await
            .unwrap();
        let mut http = proxy::cli::client::TunnelHttp::open(&conn, "10.0.0.11:9080")
            .await
            .unwrap();
        let r = http.get("ratings:9080", "/").await.unwrap();
        assert_eq!(r.status, 503);
    });

    // SIGHUP with a broken config keeps the last good one.
    std::fs::write(config_dir.join("broken.yaml"), "kind: HTTPRoute\nmetadata: {name: x}\nspec: {rules: [{matches: [{path: {type: Exact, value: nope}}]}]}\n").unwrap();
    signal(&wp.child, "HUP");
    wait_line(&wp.stderr, "keeping the last good configuration");
    rt.block_on(async {
        assert_eq!(http_get(wp.ready, "/healthz/ready").await.0, 200);
    });
    // SIGHUP with a fixed config reloads.
    std::fs::remove_file(config_dir.join("broken.yaml")).unwrap();
    signal(&wp.child, "HUP");
    wait_line(&wp.stderr, "configuration reloaded");

    // SIGTERM: drain and exit 0.
    signal(&wp.child, "TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = wp.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "waypoint did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn run_refuses_to_start_with_an_invalid_config_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dev_certs(dir.path());
    std::fs::write(dir.path().join("c.yaml"), "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {clusterIP: not-an-ip, ports: [{port: 80}]}\n").unwrap();
    let out = Command::new(BIN)
        .arg("run")
        .arg("--config")
        .arg(dir.path().join("c.yaml"))
        .arg("--certs")
        .arg(&certs)
        .args([
            "--hbone-addr",
            "127.0.0.1:0",
            "--ready-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Service default/s"), "{err}");
    assert!(err.contains("clusterIP"), "{err}");
}

#[test]
fn demo_prints_access_log_lines_and_exits() {
    let out = Command::new(BIN)
        .args(["demo", "--requests", "20"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed: {stderr}");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {l}"))
        })
        .collect();
    // 20 reviews + 2 ratings + the two lines of the refused unknown VIP.
    assert_eq!(lines.len(), 24, "{lines:?}");
    let reviews: Vec<_> = lines
        .iter()
        .filter(|l| l["route_name"] == "reviews-split")
        .collect();
    assert_eq!(reviews.len(), 20);
    assert!(reviews.iter().all(|l| l["response_code"] == 200));
    assert!(stderr.contains("demo summary"), "{stderr}");
}

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, out)
}

/// A mesh for the operator commands: reviews (bound, with a route and an ALLOW policy),
/// ratings (bound, no endpoints), legacy (opted out), elsewhere (bound to another waypoint),
/// plain (no label in an unlabelled namespace).
const OPS_MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/use-waypoint: waypoint}}
---
apiVersion: v1
kind: Namespace
metadata: {name: other}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: default, labels: {istio.io/waypoint-for: service}}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec: {clusterIP: 10.0.0.10, ports: [{name: http, port: 9080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: reviews-1, namespace: default, labels: {kubernetes.io/service-name: reviews}}
addressType: IPv4
endpoints: [{addresses: ["10.1.0.1"]}]
ports: [{name: http, port: 9080}]
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: default}
spec: {clusterIP: 10.0.0.11, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: legacy, namespace: default, labels: {istio.io/use-waypoint: none}}
spec: {clusterIP: 10.0.0.20, ports: [{name: tcp-db, port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: elsewhere, namespace: default, labels: {istio.io/use-waypoint: east}}
spec: {clusterIP: 10.0.0.21, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: other}
spec: {clusterIP: 10.0.0.22, ports: [{port: 8080}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules:
  - name: canary
    matches: [{path: {type: PathPrefix, value: /reviews}, headers: [{name: x-env, value: canary}]}]
    backendRefs: [{name: reviews, port: 9080}]
  - name: posts
    matches: [{path: {type: PathPrefix, value: /reviews}, method: POST}]
    backendRefs: [{name: reviews, port: 9080}]
  - name: main
    matches: [{path: {type: PathPrefix, value: /reviews}}]
    backendRefs: [{name: reviews, port: 9080, weight: 3}, {name: ratings, port: 9080, weight: 1}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-sleep, namespace: default}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews}]
  action: ALLOW
  rules: [{from: [{source: {principals: ["cluster.local/ns/default/sa/sleep"]}}]}]
"#;

fn ops_dir(extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("mesh.yaml"),
        format!("{OPS_MESH}---\n{extra}"),
    )
    .unwrap();
    dir
}

fn run_cmd(args: &[&str], dir: &Path) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(&args[..1])
        .arg("--config")
        .arg(dir)
        .args(&args[1..])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";

#[test]
fn explain_shows_the_chosen_rule_and_why_the_others_failed() {
    let dir = ops_dir("");
    let (ok, out, err) = run_cmd(
        &[
            "explain",
            "--from",
            SLEEP,
            "--to",
            "10.0.0.10:9080",
            "/reviews/1",
        ],
        dir.path(),
    );
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("binding: bound here (decided by: namespace label)"),
        "{out}"
    );
    assert!(
        out.contains(
            "rule canary (PathPrefix /reviews, header x-env=canary): no: header x-env is absent"
        ),
        "{out}"
    );
    assert!(
        out.contains("rule posts (PathPrefix /reviews, method POST): no: method GET is not POST"),
        "{out}"
    );
    assert!(
        out.contains("rule main (PathPrefix /reviews): MATCHED (chosen)"),
        "{out}"
    );
    assert!(out.contains("weight 3 (75.0%): inbound-vip|9080|http|reviews.default.svc.cluster.local endpoints [10.1.0.1:9080]"), "{out}");
    assert!(out.contains("ALLOW default/allow-sleep:"), "{out}");
    assert!(
        out.contains("ns[default]-policy[allow-sleep]-rule[0]: matched"),
        "{out}"
    );
    assert!(out.contains("75.0%: proxied to inbound-vip|9080|http|reviews.default.svc.cluster.local endpoints [10.1.0.1:9080]"), "{out}");
    assert!(
        out.contains("25.0%: 503 UH \"no healthy upstream\""),
        "{out}"
    );

    // The header makes the canary rule win; the others would match but lose on precedence.
    let (ok, out, _) = run_cmd(
        &[
            "explain",
            "--from",
            SLEEP,
            "--to",
            "10.0.0.10:9080",
            "-H",
            "X-Env: canary",
            "/reviews",
        ],
        dir.path(),
    );
    assert!(ok);
    assert!(
        out.contains("rule canary (PathPrefix /reviews, header x-env=canary): MATCHED (chosen)"),
        "{out}"
    );
    assert!(
        out.contains(
            "rule main (PathPrefix /reviews): would match, but a higher-precedence entry won"
        ),
        "{out}"
    );
}

#[test]
fn explain_gives_403_for_a_denied_principal_and_404_without_a_rule() {
    let dir = ops_dir("");
    let other = "spiffe://cluster.local/ns/default/sa/other";
    let (ok, out, _) = run_cmd(
        &[
            "explain",
            "--from",
            other,
            "--to",
            "10.0.0.10:9080",
            "/reviews",
        ],
        dir.path(),
    );
    assert!(ok, "{out}");
    assert!(
        out.contains(
            "ns[default]-policy[allow-sleep]-rule[0]: not matched: no `from` source matches"
        ),
        "{out}"
    );
    assert!(
        out.contains("decision: denied (no ALLOW policy matched)"),
        "{out}"
    );
    assert!(
        out.contains(
            "result: 403 \"RBAC: access denied\" (details rbac_access_denied_matched_policy[none])"
        ),
        "{out}"
    );

    let (ok, out, _) = run_cmd(
        &[
            "explain",
            "--from",
            SLEEP,
            "--to",
            "10.0.0.10:9080",
            "-X",
            "DELETE",
            "/other",
        ],
        dir.path(),
    );
    assert!(ok, "{out}");
    assert!(out.contains("no rule matches"), "{out}");
    assert!(
        out.contains("result: 404 NR (details route_not_found)"),
        "{out}"
    );

    // Not bound: the CONNECT itself is refused, and the reason names the label.
    let (ok, out, _) = run_cmd(
        &["explain", "--from", SLEEP, "--to", "10.0.0.20:5432", "/"],
        dir.path(),
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("binding: opted out (decided by: service label)"),
        "{out}"
    );
    assert!(out.contains("result: 503"), "{out}");
}

#[test]
fn services_lists_every_service_with_its_binding_and_the_label_that_decided() {
    let dir = ops_dir("");
    let (ok, out, err) = run_cmd(&["services"], dir.path());
    assert!(ok, "{out}{err}");
    let row = |name: &str| {
        out.lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|| panic!("no row for {name}: {out}"))
    };
    assert!(out.starts_with("NAMESPACE"), "{out}");
    assert_eq!(
        row("reviews"),
        "default reviews 10.0.0.10 9080/http default/waypoint namespace label bound here"
    );
    assert_eq!(
        row("legacy"),
        "default legacy 10.0.0.20 5432/tcp none service label opted out"
    );
    assert_eq!(
        row("elsewhere"),
        "default elsewhere 10.0.0.21 80/http default/east service label bound to another waypoint"
    );
    assert_eq!(
        row("plain"),
        "other plain 10.0.0.22 8080/unknown - none no waypoint"
    );
}

#[test]
fn telemetry_with_invalid_cel_is_a_config_error_and_selector_telemetry_is_warned() {
    let bad = r#"apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: broken, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]
  accessLogging: [{filter: {expression: "response.code >= "}}]
"#;
    let dir = ops_dir(bad);
    let (ok, out, _) = run_cmd(&["check"], dir.path());
    assert!(!ok, "{out}");
    assert!(
        out.contains("error: Telemetry default/broken: spec.accessLogging[0].filter.expression: invalid CEL expression"),
        "{out}"
    );

    let selector = r#"apiVersion: telemetry.istio.io/v1alpha1
kind: Telemetry
metadata: {name: by-selector, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  accessLogging: [{disabled: true}]
"#;
    let dir = ops_dir(selector);
    let (ok, out, _) = run_cmd(&["check"], dir.path());
    assert!(ok, "{out}");
    assert!(
        out.contains("warning: Telemetry default/by-selector uses a selector; waypoints ignore selector-based policies"),
        "{out}"
    );
}

#[test]
fn the_deployment_manifest_drains_within_its_grace_period_and_has_hpa_pdb_and_requests() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/waypoint.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let number_after = |key: &str| -> u64 {
        let at = text.find(key).unwrap_or_else(|| panic!("{key} missing")) + key.len();
        text[at..]
            .trim_start_matches([' ', ':', '"', ','])
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap()
    };
    let grace = number_after("terminationGracePeriodSeconds:");
    let drain = number_after("\"--drain-timeout\"");
    assert!(
        grace > drain,
        "grace {grace}s must exceed the drain deadline {drain}s"
    );
    assert!(text.contains("kind: HorizontalPodAutoscaler"));
    assert!(text.contains("kind: PodDisruptionBudget"));
    assert!(text.contains("requests: {cpu: 100m, memory: 128Mi}"));
    assert!(
        text.contains("scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: waypoint}")
    );
}

/// `waypoint check` reports every problem of every document: a document that fails to
/// deserialize does not hide the errors of the others, and a misspelled field of a policy is
/// a warning with its path (`kubectl apply --validate=strict` style).
#[test]
fn check_reports_every_document_and_warns_on_unknown_fields() {
    let dir = tempfile::tempdir().unwrap();
    let text = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: default}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default, labels: {istio.io/use-waypoint: waypoint}}
spec: {clusterIP: 10.0.0.10, ports: "not-a-list"}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-sleep, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]
  action: ALLOW
  rules:
  - from: [{source: {principles: ["cluster.local/ns/default/sa/sleep"]}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: broken, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules:
  - matches: [{path: {type: RegularExpression, value: "(unclosed"}}]
"#;
    std::fs::write(dir.path().join("bad.yaml"), text).unwrap();
    let out = Command::new(BIN)
        .arg("check")
        .arg("--config")
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("error: Service default/reviews: spec: invalid type"),
        "{stdout}"
    );
    assert!(
        stdout.contains("error: HTTPRoute default/broken: spec.rules[0].matches[0].path.value"),
        "the type error above must not hide this one: {stdout}"
    );
    let warning = stdout
        .lines()
        .find(|l| l.starts_with("warning: ") && l.contains("principles"))
        .unwrap_or_else(|| panic!("no unknown-field warning: {stdout}"));
    assert!(
        warning.ends_with(
            "AuthorizationPolicy default/allow-sleep: spec.rules[0].from[0].source.principles: unknown field, ignored"
        ),
        "{warning}"
    );
}

#[test]
fn explain_shows_the_destination_rule_of_the_chosen_cluster() {
    let dir = ops_dir(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews, namespace: default}\nspec:\n  host: reviews\n  trafficPolicy:\n    loadBalancer: {consistentHash: {httpHeaderName: x-user}}\n    connectionPool: {http: {http2MaxRequests: 10}}\n    outlierDetection: {consecutiveGatewayErrors: 3}\n",
    );
    let (ok, out, err) = run_cmd(
        &[
            "explain",
            "--from",
            SLEEP,
            "--to",
            "10.0.0.10:9080",
            "/reviews/1",
        ],
        dir.path(),
    );
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("traffic policy: DestinationRule default/reviews, consistent hash by header x-user, max requests 10, outlier detection (5xx 5, gateway errors 3, ejection 30s, max 10%)"),
        "{out}"
    );
}

#[test]
fn check_warns_about_custom_providers_the_mesh_config_does_not_define() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    std::fs::create_dir(&config).unwrap();
    let text = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: default}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: known, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]
  action: CUSTOM
  provider: {name: opa}
  rules: [{to: [{operation: {paths: [/admin]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: typo, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]
  action: CUSTOM
  provider: {name: opa-typo}
  rules: [{to: [{operation: {paths: [/x]}}]}]
"#;
    std::fs::write(config.join("policies.yaml"), text).unwrap();
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh,
        "extensionProviders:\n- name: opa\n  envoyExtAuthzGrpc: {service: opa.default.svc.cluster.local, port: 9191}\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("check")
        .arg("--config")
        .arg(&config)
        .arg("--mesh-config")
        .arg(&mesh)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("warning: AuthorizationPolicy default/typo: spec.provider.name: \"opa-typo\" is not defined in the mesh config's extensionProviders"),
        "{stdout}"
    );
    assert!(!stdout.contains("default/known: spec.provider"), "{stdout}");
}
