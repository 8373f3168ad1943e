//! (feature `testing`) An in-test Kubernetes API server for tests and benchmarks: it stands in for the real one, so it speaks what the real
//! one speaks (k8s.io/apiserver; API conventions "Efficient detection of changes"), failures
//! included:
//! - HTTPS; every request needs `Authorization: Bearer <token>` (401 Status otherwise).
//! - List: `GET /api/v1/<plural>`, `/apis/<group>/<version>/<plural>`, and the namespaced
//!   forms, with `limit`/`continue` pagination (one consistent resourceVersion for all pages), `fieldSelector` (`=`, `!=` on
//!   `metadata.name`, `metadata.namespace`, and a Secret's `type`), and the
//!   collection's `metadata.resourceVersion`. Items of built-in kinds carry no
//!   `apiVersion`/`kind` (as the real server's typed lists); custom resources do.
//! - Watch: `?watch=true&resourceVersion=N`: every change after N (ADDED, MODIFIED, DELETED),
//!   then live events, one JSON object per line; `BOOKMARK` events when asked for; an
//!   `ERROR` event with a 410 `Expired` Status when N is older than the compacted history.
//! - 403 `Forbidden` Status for kinds the test forbids, 404 `NotFound` for kinds whose CRD the
//!   test removes. Connections can be cut mid-watch and the server stopped and restarted on
//!   the same port.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fixture: a broken fixture is a failed test

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// (plural, group, version, kind, namespaced).
const KINDS: &[(&str, &str, &str, &str, bool)] = &[
    ("namespaces", "", "v1", "Namespace", false),
    ("services", "", "v1", "Service", true),
    ("pods", "", "v1", "Pod", true),
    ("configmaps", "", "v1", "ConfigMap", true),
    (
        "endpointslices",
        "discovery.k8s.io",
        "v1",
        "EndpointSlice",
        true,
    ),
    (
        "gateways",
        "gateway.networking.k8s.io",
        "v1",
        "Gateway",
        true,
    ),
    (
        "gatewayclasses",
        "gateway.networking.k8s.io",
        "v1",
        "GatewayClass",
        false,
    ),
    (
        "httproutes",
        "gateway.networking.k8s.io",
        "v1",
        "HTTPRoute",
        true,
    ),
    (
        "grpcroutes",
        "gateway.networking.k8s.io",
        "v1",
        "GRPCRoute",
        true,
    ),
    (
        "tcproutes",
        "gateway.networking.k8s.io",
        "v1alpha2",
        "TCPRoute",
        true,
    ),
    (
        "tlsroutes",
        "gateway.networking.k8s.io",
        "v1alpha2",
        "TLSRoute",
        true,
    ),
    (
        "referencegrants",
        "gateway.networking.k8s.io",
        "v1beta1",
        "ReferenceGrant",
        true,
    ),
    (
        "authorizationpolicies",
        "security.istio.io",
        "v1",
        "AuthorizationPolicy",
        true,
    ),
    (
        "requestauthentications",
        "security.istio.io",
        "v1",
        "RequestAuthentication",
        true,
    ),
    ("telemetries", "telemetry.istio.io", "v1", "Telemetry", true),
    (
        "destinationrules",
        "networking.istio.io",
        "v1",
        "DestinationRule",
        true,
    ),
    (
        "serviceentries",
        "networking.istio.io",
        "v1",
        "ServiceEntry",
        true,
    ),
    (
        "workloadentries",
        "networking.istio.io",
        "v1",
        "WorkloadEntry",
        true,
    ),
    ("secrets", "", "v1", "Secret", true),
];

fn kind_info(kind: &str) -> (&'static str, &'static str, &'static str, bool) {
    let k = KINDS.iter().find(|k| k.3 == kind).expect("known kind");
    (k.0, k.1, k.2, k.4)
}

#[derive(Default)]
struct Collection {
    objects: BTreeMap<(String, String), Value>,
    /// (resourceVersion, type, object) of every change, oldest first.
    history: Vec<(u64, &'static str, Value)>,
}

struct Watcher {
    plural: &'static str,
    namespace: Option<String>,
    name: FieldSelector,
    tx: mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// Watches from before this resourceVersion get 410 Gone.
    compacted: u64,
    collections: HashMap<&'static str, Collection>,
    forbidden: HashSet<&'static str>,
    absent: HashSet<&'static str>,
    watchers: Vec<Watcher>,
    /// Requests served, by "list <plural>" / "watch <plural>".
    requests: Vec<String>,
}

/// The running stand-in.
pub struct ApiServer {
    pub addr: SocketAddr,
    pub token: String,
    /// PEM of the CA that signed the server's certificate (for the kubeconfig).
    pub ca_pem: String,
    tls: Arc<rustls::ServerConfig>,
    state: Arc<Mutex<State>>,
    tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

impl ApiServer {
    pub async fn start() -> ApiServer {
        let pki = hbone::testing::Pki::new("kubernetes").unwrap();
        let tls = pki.server_tls_for_ip("127.0.0.1".parse().unwrap()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = ApiServer {
            addr,
            token: "test-token-waypoint".into(),
            ca_pem: pki.root_pem().to_string(),
            tls: Arc::new(tls),
            state: Arc::default(),
            tasks: Arc::default(),
        };
        server.serve(listener);
        server
    }

    fn serve(&self, listener: TcpListener) {
        let (tls, state, tasks, token) = (
            self.tls.clone(),
            self.state.clone(),
            self.tasks.clone(),
            self.token.clone(),
        );
        let accept_tasks = tasks.clone();
        let handle = tokio::spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, state, token) = (acceptor.clone(), state.clone(), token.clone());
                let conn = tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| {
                        let (state, token) = (state.clone(), token.clone());
                        async move { Ok::<_, std::convert::Infallible>(handle(&state, &token, req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
                accept_tasks.lock().unwrap().push(conn.abort_handle());
            }
        });
        tasks.lock().unwrap().push(handle.abort_handle());
    }

    /// Stop listening and cut every connection (an API server going down).
    pub fn stop(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
        self.state.lock().unwrap().watchers.clear();
    }

    /// Listen again on the same address, with the same objects (an API server restarting).
    pub async fn restart(&self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    /// Cut every connection mid-stream (watches included), keep listening.
    pub fn cut_connections(&self) {
        let mut tasks = self.tasks.lock().unwrap();
        // The first task is the accept loop: keep it.
        for t in tasks.drain(1..) {
            t.abort();
        }
        self.state.lock().unwrap().watchers.clear();
    }

    /// Compact the history and end every watch with a 410 `Expired` ERROR event, as etcd
    /// compaction does: clients must re-list.
    pub fn expire_watches(&self) {
        let mut s = self.state.lock().unwrap();
        s.compacted = s.rv + 1;
        let rv = s.rv;
        let status = json!({"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("too old resource version: {rv} ({})", rv + 1),
            "reason": "Expired", "code": 410}});
        for w in s.watchers.drain(..) {
            let _ = w.tx.send(line(&status));
        }
    }

    /// A BOOKMARK on every open watch (the real server sends one about once a minute).
    pub fn bookmark(&self) {
        let s = self.state.lock().unwrap();
        for w in &s.watchers {
            let (_, group, version, kind, _) = *KINDS.iter().find(|k| k.0 == w.plural).unwrap();
            let ev = json!({"type": "BOOKMARK", "object": {
                "kind": kind, "apiVersion": api_version(group, version),
                "metadata": {"resourceVersion": s.rv.to_string(),
                    "annotations": {"k8s.io/initial-events-end": "true"}}}});
            let _ = w.tx.send(line(&ev));
        }
    }

    pub fn forbid(&self, plural: &'static str, forbidden: bool) {
        let mut s = self.state.lock().unwrap();
        if forbidden {
            s.forbidden.insert(plural);
            // RBAC changes end running watches at their next request; cut them now.
            s.watchers.retain(|w| w.plural != plural);
        } else {
            s.forbidden.remove(plural);
        }
    }

    pub fn remove_crd(&self, plural: &'static str) {
        self.state.lock().unwrap().absent.insert(plural);
    }

    pub fn restore_crd(&self, plural: &'static str) {
        self.state.lock().unwrap().absent.remove(plural);
    }

    /// Requests seen so far ("list services", "watch services", ...).
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Create or replace an object (parsed from YAML or JSON); returns its resourceVersion.
    pub fn apply_yaml(&self, yaml: &str) -> u64 {
        let mut last = 0;
        for doc in yaml.split("\n---") {
            if doc.trim().is_empty() {
                continue;
            }
            let v: Value = serde_saphyr::from_str(doc).unwrap();
            last = self.apply(v);
        }
        last
    }

    pub fn apply(&self, mut obj: Value) -> u64 {
        let kind = obj["kind"].as_str().unwrap().to_string();
        let (plural, _, _, namespaced) = kind_info(&kind);
        let ns = if namespaced {
            obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string()
        } else {
            String::new()
        };
        let name = obj["metadata"]["name"].as_str().unwrap().to_string();
        let mut s = self.state.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        if namespaced {
            obj["metadata"]["namespace"] = json!(ns);
        }
        obj["metadata"]
            .as_object_mut()
            .unwrap()
            .entry("creationTimestamp")
            .or_insert(json!("2026-12-06T00:00:00Z"));
        let c = s.collections.entry(plural).or_default();
        let kind_of_event = if c.objects.contains_key(&(ns.clone(), name.clone())) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        c.objects.insert((ns, name), obj.clone());
        c.history.push((rv, kind_of_event, obj.clone()));
        notify(&mut s, plural, kind_of_event, &obj);
        rv
    }

    pub fn delete(&self, kind: &str, namespace: &str, name: &str) {
        let (plural, _, _, namespaced) = kind_info(kind);
        let ns = if namespaced { namespace } else { "" };
        let mut s = self.state.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        let c = s.collections.entry(plural).or_default();
        let Some(mut obj) = c.objects.remove(&(ns.to_string(), name.to_string())) else {
            return;
        };
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        c.history.push((rv, "DELETED", obj.clone()));
        notify(&mut s, plural, "DELETED", &obj);
    }

    /// A kubeconfig file for this server (`--kubeconfig`).
    pub fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        use base64::Engine as _;
        let path = dir.join("kubeconfig");
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://{}\n    certificate-authority-data: {ca}\nusers:\n- name: waypoint\n  user:\n    token: {}\ncontexts:\n- name: test\n  context: {{cluster: test, user: waypoint}}\ncurrent-context: test\n",
                self.addr, self.token
            ),
        )
        .unwrap();
        path
    }
}

fn api_version(group: &str, version: &str) -> String {
    if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    }
}

fn line(v: &Value) -> Bytes {
    let mut s = serde_json::to_vec(v).unwrap();
    s.push(b'\n');
    Bytes::from(s)
}

/// A `fieldSelector`: requirements `field=value`, `field==value` or `field!=value`, all of
/// which must hold (k8s.io/apimachinery `fields.ParseSelector`).
type FieldSelector = Vec<(String, bool, String)>;

/// Parse a `fieldSelector` for `plural`: `metadata.name` and `metadata.namespace` on every
/// kind, `type` on secrets (the fields the real server indexes for them); others are refused
/// as the real server refuses them (400 `field label not supported`).
fn field_selector(text: Option<&String>, plural: &str) -> Result<FieldSelector, String> {
    let mut out = Vec::new();
    for req in text
        .map(String::as_str)
        .unwrap_or("")
        .split(',')
        .filter(|r| !r.is_empty())
    {
        let (field, equal, value) = if let Some((f, v)) = req.split_once("!=") {
            (f, false, v)
        } else if let Some((f, v)) = req.split_once("==").or_else(|| req.split_once('=')) {
            (f, true, v)
        } else {
            return Err(format!(
                "invalid selector: '{req}'; can't understand '{req}'"
            ));
        };
        let known = matches!(field, "metadata.name" | "metadata.namespace")
            || (plural == "secrets" && field == "type");
        if !known {
            return Err(format!("field label not supported: {field}"));
        }
        out.push((field.to_string(), equal, value.to_string()));
    }
    Ok(out)
}

fn matches(obj: &Value, namespace: &Option<String>, selector: &FieldSelector) -> bool {
    namespace
        .as_ref()
        .is_none_or(|ns| obj["metadata"]["namespace"].as_str() == Some(ns))
        && selector.iter().all(|(field, equal, value)| {
            let actual = match field.as_str() {
                "metadata.name" => obj["metadata"]["name"].as_str().unwrap_or(""),
                "metadata.namespace" => obj["metadata"]["namespace"].as_str().unwrap_or(""),
                // A Secret without `type` is Opaque (the API server defaults it).
                _ => obj["type"].as_str().unwrap_or("Opaque"),
            };
            (actual == value) == *equal
        })
}

fn notify(s: &mut State, plural: &str, ty: &str, obj: &Value) {
    let ev = line(&json!({"type": ty, "object": obj}));
    s.watchers.retain(|w| {
        if w.plural != plural || !matches(obj, &w.namespace, &w.name) {
            return !w.tx.is_closed();
        }
        w.tx.send(ev.clone()).is_ok()
    });
}

fn status(code: StatusCode, reason: &str, message: String) -> Response<Body> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16()});
    let mut r = Response::new(Body::full(serde_json::to_vec(&body).unwrap()));
    *r.status_mut() = code;
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

/// Answer one request.
fn handle(state: &Mutex<State>, token: &str, req: Request<Incoming>) -> Response<Body> {
    let authorized = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {token}"));
    if !authorized {
        return status(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Unauthorized".into(),
        );
    }
    let path = req.uri().path().to_string();
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), percent_decode(v)))
        .collect();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    // /api/v1[/namespaces/<ns>]/<plural>  or  /apis/<g>/<v>[/namespaces/<ns>]/<plural>
    let (group, version, rest) = match parts.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return status(StatusCode::NOT_FOUND, "NotFound", "not found".into()),
    };
    let (namespace, plural) = match rest {
        [p] => (None, *p),
        ["namespaces", ns, p] => (Some(ns.to_string()), *p),
        _ => return status(StatusCode::NOT_FOUND, "NotFound", "not found".into()),
    };
    let Some(&(plural, _, _, kind, _)) = KINDS
        .iter()
        .find(|k| k.0 == plural && k.1 == group && k.2 == version)
    else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource".into(),
        );
    };
    let name = match field_selector(query.get("fieldSelector"), plural) {
        Ok(s) => s,
        Err(message) => return status(StatusCode::BAD_REQUEST, "BadRequest", message),
    };
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let mut s = state.lock().unwrap();
    s.requests
        .push(format!("{} {plural}", if watch { "watch" } else { "list" }));
    if s.absent.contains(plural) {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource".into(),
        );
    }
    if s.forbidden.contains(plural) {
        return status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!(
                "{plural}{} is forbidden: User \"system:serviceaccount:default:waypoint\" cannot {} resource \"{plural}\" in API group \"{group}\" at the cluster scope",
                if group.is_empty() {
                    String::new()
                } else {
                    format!(".{group}")
                },
                if watch { "watch" } else { "list" }
            ),
        );
    }
    let builtin = group.is_empty() || group == "discovery.k8s.io";
    if !watch {
        // A paginated list is one consistent read: every page carries the first page's
        // resourceVersion (in the continue token), so a watch from it replays whatever
        // changed while the pages were read.
        let (offset, list_rv) = query
            .get("continue")
            .and_then(|c| c.split_once(':'))
            .and_then(|(o, rv)| Some((o.parse().ok()?, rv.parse().ok()?)))
            .unwrap_or((0usize, s.rv));
        let limit: usize = query
            .get("limit")
            .and_then(|l| l.parse().ok())
            .filter(|l| *l > 0)
            .unwrap_or(usize::MAX);
        let c = s.collections.entry(plural).or_default();
        let mut page: Vec<Value> = c
            .objects
            .values()
            .filter(|o| matches(o, &namespace, &name))
            .skip(offset)
            .take(limit.saturating_add(1))
            .map(|o| {
                let mut o = o.clone();
                if builtin {
                    let m = o.as_object_mut().unwrap();
                    m.remove("kind");
                    m.remove("apiVersion");
                }
                o
            })
            .collect();
        let more = page.len() > limit;
        page.truncate(limit);
        let cont = if more {
            format!("{}:{list_rv}", offset + page.len())
        } else {
            String::new()
        };
        let (_, g, v, _, _) = *KINDS.iter().find(|k| k.0 == plural).unwrap();
        let body = json!({"kind": format!("{kind}List"), "apiVersion": api_version(g, v),
            "metadata": {"resourceVersion": list_rv.to_string(), "continue": cont},
            "items": page});
        let mut r = Response::new(Body::full(serde_json::to_vec(&body).unwrap()));
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        return r;
    }
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (tx, rx) = mpsc::unbounded_channel();
    if from != 0 && from < s.compacted {
        let _ = tx.send(line(&json!({"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("too old resource version: {from} ({})", s.compacted),
            "reason": "Expired", "code": 410}})));
    } else {
        let c = s.collections.entry(plural).or_default();
        for (rv, ty, obj) in &c.history {
            if *rv > from && matches(obj, &namespace, &name) {
                let _ = tx.send(line(&json!({"type": ty, "object": obj})));
            }
        }
        s.watchers.push(Watcher {
            plural,
            namespace,
            name,
            tx,
        });
    }
    let mut r = Response::new(Body::stream(rx));
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

fn percent_decode(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A whole body or a stream of watch lines.
pub enum Body {
    Full(Option<Bytes>),
    Stream(mpsc::UnboundedReceiver<Bytes>),
}

impl Body {
    fn full(v: Vec<u8>) -> Body {
        Body::Full(Some(Bytes::from(v)))
    }
    fn stream(rx: mpsc::UnboundedReceiver<Bytes>) -> Body {
        Body::Stream(rx)
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Stream(rx) => rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }
}
