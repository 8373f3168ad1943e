//! The `waypoint` binary: flags and environment -> [`proxy::Config`], signals -> reload/drain.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tracing::{error, info};

/// A drop-in, Envoy-compatible Istio ambient waypoint.
#[derive(Parser, Debug)]
#[command(name = "waypoint", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve HBONE traffic as the waypoint named by --gateway.
    Run(Box<RunArgs>),
    /// Validate configuration only: print every problem, exit non-zero if any.
    Check(CheckArgs),
    /// Self-contained demo: dev certificates, the bundled bookinfo config, local backends and a
    /// built-in HBONE client; prints the access log and exits.
    Demo(DemoArgs),
    /// Explain, offline, what the waypoint would do with one request: binding, route, backends,
    /// AuthorizationPolicies, and the reply.
    Explain(ExplainArgs),
    /// List every Service: VIPs, ports, the waypoint it uses and which label decided it.
    Services(CheckArgs),
    /// Write development certificates (a test root CA and SPIFFE workload certs) to a directory.
    Certs(CertsArgs),
    /// As the container of the waypoint Deployment istiod creates (`proxy waypoint ...`, the
    /// arguments of Istio's template; pilot-agent's own flags are accepted and ignored):
    /// `run --kube` with the Gateway from the pod's labels and the certificate from CA_ADDR.
    #[command(hide = true)]
    Proxy(PodArgs),
}

#[derive(Args, Debug)]
struct PodArgs {
    /// The proxy type (`waypoint`).
    kind: String,
    /// pilot-agent's flags (`--domain`, `--serviceCluster`, log levels): ignored.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    rest: Vec<String>,
}

#[derive(Args, Debug)]
struct ConfigArgs {
    /// File or directory of Kubernetes manifests (YAML, multi-document, JSON, or a List).
    /// Repeatable; in the environment, comma-separated.
    #[arg(
        long = "config",
        env = "WAYPOINT_CONFIG",
        value_delimiter = ',',
        required_unless_present = "kube"
    )]
    config: Vec<PathBuf>,
    /// Read every resource from the Kubernetes API (list and watch) instead of --config:
    /// the in-cluster service account, or --kubeconfig / KUBECONFIG.
    #[arg(long, env = "WAYPOINT_KUBE", conflicts_with = "config")]
    kube: bool,
    /// Kubeconfig file for --kube from outside the cluster (default: KUBECONFIG, then
    /// ~/.kube/config, then the in-cluster service account).
    #[arg(long, requires = "kube")]
    kubeconfig: Option<PathBuf>,
    /// Istio's namespace: the mesh config is its `istio` ConfigMap (--kube).
    #[arg(long, env = "WAYPOINT_ISTIO_NAMESPACE", default_value = "istio-system")]
    istio_namespace: String,
    /// A Pod label to keep from the API beyond the ones the waypoint always reads (Istio's,
    /// app/version, topology): a custom label a DestinationRule's `failoverPriority` names
    /// (--kube; repeatable or comma-separated).
    #[arg(
        long = "pod-label",
        env = "WAYPOINT_POD_LABEL_KEYS",
        value_delimiter = ','
    )]
    pod_label_keys: Vec<String>,
    /// Which Gateway resource this instance is, NAMESPACE/NAME.
    #[arg(long, env = "WAYPOINT_GATEWAY", default_value = "default/waypoint")]
    gateway: String,
    /// SPIFFE trust domain of the mesh.
    #[arg(long, env = "WAYPOINT_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Istio MeshConfig YAML (or the `istio` ConfigMap): extensionProviders for CUSTOM
    /// AuthorizationPolicies, rootNamespace, trustDomainAliases. Read at start.
    #[arg(long, env = "WAYPOINT_MESH_CONFIG")]
    mesh_config: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Directory with cert-chain.pem, key.pem, root-cert.pem (Istio's file-mounted names).
    #[arg(long, env = "WAYPOINT_CERTS", default_value = "/etc/certs")]
    certs: PathBuf,
    /// HBONE listener (mTLS + HTTP/2 CONNECT).
    #[arg(long, env = "WAYPOINT_HBONE_ADDR", default_value = "0.0.0.0:15008")]
    hbone_addr: SocketAddr,
    /// Readiness listener (GET /healthz/ready).
    #[arg(long, env = "WAYPOINT_READY_ADDR", default_value = "0.0.0.0:15021")]
    ready_addr: SocketAddr,
    /// Prometheus metrics listener (GET /stats/prometheus).
    #[arg(long, env = "WAYPOINT_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,
    /// A second Prometheus listener on Envoy's own stats port (`proxy waypoint` binds
    /// 0.0.0.0:15090 as istiod's template expects; `run` binds none unless given).
    #[arg(long, env = "WAYPOINT_ENVOY_PROM_ADDR")]
    envoy_prom_addr: Option<SocketAddr>,
    /// Admin listener (/config_dump, /clusters, /ready, /stats); keep it on localhost.
    #[arg(long, env = "WAYPOINT_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// How long requests in flight may take to finish after SIGTERM (e.g. 5s, 500ms).
    #[arg(long, env = "WAYPOINT_DRAIN_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Worker threads (default: one per CPU).
    #[arg(long, env = "WAYPOINT_WORKERS")]
    workers: Option<usize>,
    /// TLS handshake deadline for HBONE connections (e.g. 10s).
    #[arg(long, env = "WAYPOINT_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    handshake_timeout: Duration,
    /// A backend must start its response within this ("0s": wait forever, Istio's default).
    #[arg(long, env = "WAYPOINT_UPSTREAM_RESPONSE_TIMEOUT", default_value = "300s", value_parser = humantime::parse_duration)]
    upstream_response_timeout: Duration,
    /// A request body left without a byte this long gets 408 `stream timeout` (flag SI;
    /// Envoy's stream idle timeout default; "0s": wait forever, as Istio's waypoint).
    #[arg(long, env = "WAYPOINT_STREAM_IDLE_TIMEOUT", default_value = "300s", value_parser = humantime::parse_duration)]
    stream_idle_timeout: Duration,
    /// An HTTP/1.1 request head must arrive within this once it started (408 otherwise).
    #[arg(long, env = "WAYPOINT_REQUEST_HEADER_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    request_header_timeout: Duration,
    /// Idle inner HTTP connections are closed after this.
    #[arg(long, env = "WAYPOINT_IDLE_TIMEOUT", default_value = "1h", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// Requests in flight before new ones are shed with 503 (flag OM).
    #[arg(long, env = "WAYPOINT_MAX_REQUESTS", default_value_t = 100_000)]
    max_requests: usize,
    /// Take source workload metric labels from ztunnel's CONNECT `baggage` (Istio's
    /// AMBIENT_ENABLE_BAGGAGE; off by default: labels come from the peer identity only).
    #[arg(long, env = "AMBIENT_ENABLE_BAGGAGE", default_value_t = false)]
    ambient_enable_baggage: bool,
    /// Resident memory ceiling in MiB; above it new work is shed with 503 (0: none).
    #[arg(long, env = "WAYPOINT_MAX_MEMORY_MIB", default_value_t = 0)]
    max_memory_mib: u64,
    /// Port of the destination ztunnels' HBONE listener (ambient pods are reached over HBONE).
    #[arg(long, env = "WAYPOINT_HBONE_UPSTREAM_PORT", default_value_t = 15008)]
    hbone_upstream_port: u16,
    /// Upstream TCP connect timeout (Istio's connectTimeout default: 10s).
    #[arg(long, env = "WAYPOINT_CONNECT_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// istiod's CA, HOST:PORT: the certificate is requested from it (CSR with a key kept
    /// in memory) and renewed at half-life, instead of read from --certs.
    #[arg(long, env = "CA_ADDR")]
    ca_addr: Option<String>,
    /// Roots that istiod's serving certificate chains to (the mesh root).
    #[arg(
        long,
        env = "WAYPOINT_CA_ROOT",
        default_value = "/var/run/secrets/istio/root-cert.pem"
    )]
    ca_root: PathBuf,
    /// The projected service-account token (audience istio-ca), re-read on every CA call.
    #[arg(
        long,
        env = "WAYPOINT_CA_TOKEN",
        default_value = "/var/run/secrets/tokens/istio-token"
    )]
    ca_token: PathBuf,
    /// Our cluster's ID: sent to the CA (`ClusterID` metadata), and `source_cluster` of
    /// metrics for clients found in the Kubernetes API.
    #[arg(long, env = "ISTIO_META_CLUSTER_ID", default_value = "Kubernetes")]
    cluster_id: String,
    /// Our network (`topology.istio.io/network`): DestinationRule `failoverPriority` and
    /// Service `trafficDistribution` compare it with the endpoints'.
    #[arg(long, env = "ISTIO_META_NETWORK", default_value = "")]
    network: String,
    /// The node we run on (the `kubernetes.io/hostname` istiod gives us, for
    /// `failoverPriority` and `trafficDistribution: PreferSameNode`).
    #[arg(long, env = "ISTIO_META_NODE_NAME", default_value = "")]
    node_name: String,
    /// Our Pod's labels, the downward API file istiod's template mounts (`key="value"`
    /// lines), read when present: `failoverPriority` compares them with the endpoints'.
    #[arg(
        long,
        env = "WAYPOINT_POD_LABELS",
        default_value = "/etc/istio/pod/labels"
    )]
    pod_labels: PathBuf,
    /// Our service account (the identity asked of the CA); default: the Gateway's name.
    #[arg(long, env = "SERVICE_ACCOUNT")]
    service_account: Option<String>,
    /// Certificate lifetime asked of the CA (Istio's SECRET_TTL).
    #[arg(long, env = "SECRET_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    cert_ttl: Duration,
    /// Name server for ServiceEntry `resolution: DNS`, IP:PORT (repeatable); default: the
    /// ones in /etc/resolv.conf.
    #[arg(
        long = "dns-server",
        env = "WAYPOINT_DNS_SERVERS",
        value_delimiter = ','
    )]
    dns_servers: Vec<std::net::SocketAddr>,
    /// When a name is asked again after a negative answer or a TTL of 0 (MeshConfig
    /// dnsRefreshRate, Envoy's dns_refresh_rate); other answers are asked again at their TTL.
    #[arg(long, env = "WAYPOINT_DNS_REFRESH_RATE", default_value = "60s", value_parser = humantime::parse_duration)]
    dns_refresh_rate: Duration,
    /// This waypoint's locality, REGION/ZONE/SUBZONE (the node's topology labels): with a
    /// DestinationRule's outlierDetection, endpoints are used nearest first, as istiod's
    /// locality failover has Envoy do. Unset: no locality failover.
    #[arg(long, env = "WAYPOINT_LOCALITY")]
    locality: Option<String>,
}

#[derive(Args, Debug)]
struct CheckArgs {
    #[command(flatten)]
    config: ConfigArgs,
}

#[derive(Args, Debug)]
struct ExplainArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// The client's SPIFFE identity (spiffe://<td>/ns/<ns>/sa/<sa>).
    #[arg(long)]
    from: Option<String>,
    /// The address the client dials: Service VIP:port (the HBONE CONNECT authority).
    #[arg(long)]
    to: SocketAddr,
    /// Request method.
    #[arg(short = 'X', long = "request", default_value = "GET")]
    method: String,
    /// Request header `name:value` (repeatable). `host:` sets the authority.
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// Request path, with optional query.
    #[arg(default_value = "/")]
    path: String,
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// Requests to send to the reviews Service (split 90/10 between v1 and v2).
    #[arg(long, default_value_t = 20)]
    requests: usize,
}

#[derive(Args, Debug)]
struct CertsArgs {
    /// Output directory: the waypoint's cert-chain.pem/key.pem/root-cert.pem, plus
    /// sleep-cert.pem/sleep-key.pem for a test client.
    #[arg(long)]
    out: PathBuf,
    /// Namespace of the waypoint's identity.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// Service account of the waypoint's identity.
    #[arg(long, default_value = "waypoint")]
    service_account: String,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
}

fn init_tracing() {
    // Diagnostics go to stderr; stdout is reserved for access-log lines. The filter can be
    // changed at runtime through the admin `/logging` endpoint.
    let initial = std::env::var("WAYPOINT_LOG").unwrap_or_else(|_| "info".into());
    proxy::telemetry::logging::init(
        &initial,
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
    );
}

fn split_gateway(g: &str) -> Result<(String, String), String> {
    match g.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_string(), name.to_string()))
        }
        _ => Err(format!("--gateway must be NAMESPACE/NAME, got {g:?}")),
    }
}

fn base_config(args: &ConfigArgs) -> Result<proxy::Config, String> {
    let (ns, name) = split_gateway(&args.gateway)?;
    let mut config = proxy::Config {
        config_paths: args.config.clone(),
        gateway_namespace: ns.clone(),
        gateway_name: name,
        trust_domain: args.trust_domain.clone(),
        mesh_config: args.mesh_config.clone(),
        kube: args.kube.then(|| proxy::app::KubeSettings {
            kubeconfig: args.kubeconfig.clone(),
            discovery: discovery::Settings {
                istio_namespace: args.istio_namespace.clone(),
                pod_labels: args.pod_label_keys.clone(),
                secret_namespace: ns,
                ..Default::default()
            },
        }),
        ..proxy::Config::default()
    };
    config.load_mesh_config().map_err(|e| format!("{e:#}"))?;
    Ok(config)
}

fn runtime(workers: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        b.worker_threads(n.max(1));
    }
    b.enable_all().build()
}

// jemalloc with the waypoint's options (proxy/src/memory/mod.rs), unless a feature picks
// another allocator for benches/alloc.sh.
proxy::install_allocator!();

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match cli.command {
        Command::Check(args) => check(args),
        Command::Run(args) => run(*args),
        Command::Demo(args) => demo(args),
        Command::Certs(args) => certs(args),
        Command::Explain(args) => explain(args),
        Command::Services(args) => services(args),
        Command::Proxy(args) => pod(args),
    }
}

/// `waypoint proxy waypoint ...`: the container of istiod's waypoint Deployment, configured
/// by the template's environment (protocol.md 4.1, 9): POD_NAMESPACE, the Gateway's name from
/// the pod label `gateway.networking.k8s.io/gateway-name` (downward API file
/// `/etc/istio/pod/labels`), TRUST_DOMAIN, CA_ADDR, SERVICE_ACCOUNT, ISTIO_META_CLUSTER_ID;
/// the template's ports (15008 HBONE, 15021 readiness, 15020 metrics, 15090 Envoy's stats).
fn pod(args: PodArgs) -> ExitCode {
    if args.kind != "waypoint" {
        eprintln!(
            "error: `proxy {}`: this image runs only as a waypoint (`proxy waypoint`)",
            args.kind
        );
        return ExitCode::from(2);
    }
    let labels_file =
        std::env::var("WAYPOINT_POD_LABELS").unwrap_or_else(|_| "/etc/istio/pod/labels".into());
    let gateway = match std::fs::read_to_string(&labels_file) {
        Ok(text) => downward_label(&text, "gateway.networking.k8s.io/gateway-name"),
        Err(e) => {
            eprintln!("error: cannot read the pod labels {labels_file}: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(gateway) = gateway else {
        eprintln!(
            "error: {labels_file} has no gateway.networking.k8s.io/gateway-name label (is this istiod's waypoint Deployment?)"
        );
        return ExitCode::from(2);
    };
    let namespace = std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "default".into());
    let trust_domain = std::env::var("TRUST_DOMAIN").unwrap_or_else(|_| "cluster.local".into());
    let mut argv = vec![
        "waypoint".to_string(),
        "run".into(),
        "--kube".into(),
        "--gateway".into(),
        format!("{namespace}/{gateway}"),
        "--trust-domain".into(),
        trust_domain,
    ];
    if std::env::var_os("WAYPOINT_ENVOY_PROM_ADDR").is_none() {
        argv.extend(["--envoy-prom-addr".into(), "0.0.0.0:15090".into()]);
    }
    if std::env::var_os("SERVICE_ACCOUNT").is_none() {
        // istiod names the ServiceAccount after the Gateway unless annotated otherwise.
        argv.extend(["--service-account".into(), gateway.clone()]);
    }
    if std::env::var_os("CA_ADDR").is_none() {
        // pilot-agent's default (istiod in istio-system).
        argv.extend(["--ca-addr".into(), "istiod.istio-system.svc:15012".into()]);
    }
    info!(gateway = %format!("{namespace}/{gateway}"), "starting as istiod's waypoint pod");
    match Cli::try_parse_from(argv) {
        Ok(Cli {
            command: Command::Run(run_args),
        }) => run(*run_args),
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

/// A label from a downward-API labels file (`key="value"` per line, value quoted and
/// escaped as Go's strconv.Quote does).
fn downward_label(text: &str, key: &str) -> Option<String> {
    downward_labels(text).remove(key)
}

/// Every `key="value"` line of a downward API labels file.
fn downward_labels(text: &str) -> std::collections::BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| {
            let (k, v) = line.split_once('=')?;
            Some((
                k.trim().to_string(),
                v.trim().trim_matches('"').replace("\\\"", "\""),
            ))
        })
        .collect()
}

/// Load the configuration for an offline command; errors printed, exit code on failure.
fn offline_snapshot(args: &ConfigArgs) -> Result<(proxy::Config, policy::Snapshot), ExitCode> {
    let mut config = base_config(args).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })?;
    if config.kube.is_some() {
        let rt = runtime(Some(1)).map_err(|e| {
            eprintln!("error: cannot start the runtime: {e}");
            ExitCode::FAILURE
        })?;
        return match rt.block_on(proxy::config::kube::snapshot_once(
            &config,
            Duration::from_secs(15),
        )) {
            Ok((snapshot, mesh)) => {
                config.mesh = mesh;
                Ok((config, snapshot))
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                Err(ExitCode::FAILURE)
            }
        };
    }
    match proxy::app::load_snapshot(&config) {
        Ok(s) => Ok((config, s)),
        Err(errors) => {
            for e in &errors {
                eprintln!("error: {e}");
            }
            eprintln!("{} problem(s) found", errors.len());
            Err(ExitCode::FAILURE)
        }
    }
}

fn explain(args: ExplainArgs) -> ExitCode {
    let mut headers = http::HeaderMap::new();
    for h in &args.headers {
        let parsed = h.split_once(':').and_then(|(n, v)| {
            Some((
                http::HeaderName::from_bytes(n.trim().to_ascii_lowercase().as_bytes()).ok()?,
                http::HeaderValue::from_str(v.trim()).ok()?,
            ))
        });
        match parsed {
            Some((n, v)) => {
                headers.append(n, v);
            }
            None => {
                eprintln!("error: -H {h:?}: expected name:value");
                return ExitCode::from(2);
            }
        }
    }
    let method = match http::Method::from_bytes(args.method.as_bytes()) {
        Ok(m) => m,
        Err(_) => {
            eprintln!("error: -X {:?} is not an HTTP method", args.method);
            return ExitCode::from(2);
        }
    };
    if !args.path.starts_with('/') {
        eprintln!("error: the path must start with '/', got {:?}", args.path);
        return ExitCode::from(2);
    }
    let (config, snapshot) = match offline_snapshot(&args.config) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let req = proxy::ops::inspect::ExplainRequest {
        from: args.from,
        to: args.to,
        method,
        headers,
        path: args.path,
    };
    print!(
        "{}",
        proxy::ops::inspect::explain(&snapshot, &config.mesh, &req)
    );
    ExitCode::SUCCESS
}

fn services(args: CheckArgs) -> ExitCode {
    match offline_snapshot(&args.config) {
        Ok((_, snapshot)) => {
            print!("{}", proxy::ops::inspect::services_table(&snapshot));
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

fn check(args: CheckArgs) -> ExitCode {
    let config = match base_config(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let (result, errors, loader_warnings) = if config.kube.is_some() {
        // Everything the live cluster holds, compiled as a running waypoint would (objects in
        // error are named; see config/kube.rs for what is skipped and what is refused).
        match offline_snapshot(&args.config) {
            Ok((_, snapshot)) => (Ok(snapshot), Vec::new(), Vec::new()),
            Err(code) => return code,
        }
    } else {
        proxy::app::check_config(&config)
    };
    match result {
        Ok(snapshot) => {
            for w in &snapshot.warnings {
                println!("warning: {w}");
            }
            for w in custom_provider_warnings(&snapshot, &config.mesh) {
                println!("warning: {w}");
            }
            let services = snapshot.bound_services();
            println!(
                "ok: Gateway {}/{} serves {} Service port(s):",
                snapshot.gateway.namespace,
                snapshot.gateway.name,
                services.len()
            );
            for s in services {
                let routes = s.routes.as_ref().map(|r| r.len()).unwrap_or(0);
                println!(
                    "  {}  {}  ({:?}, {} route match(es))",
                    s.vip, s.cluster.name, s.protocol, routes
                );
            }
            ExitCode::SUCCESS
        }
        Err(()) => {
            for w in &loader_warnings {
                println!("warning: {w}");
            }
            for e in &errors {
                println!("error: {e}");
            }
            println!("{} problem(s) found", errors.len());
            ExitCode::FAILURE
        }
    }
}

/// CUSTOM AuthorizationPolicies whose provider the mesh config does not define as an
/// ext_authz provider: Istio denies the requests they match, so say so before deploying.
fn custom_provider_warnings(
    snapshot: &policy::Snapshot,
    mesh: &proxy::config::meshconfig::MeshConfig,
) -> Vec<String> {
    use proxy::config::meshconfig::ProviderKind;
    let mut out = Vec::new();
    for p in snapshot.authz_policies() {
        let Some(name) = &p.provider else { continue };
        let usable = matches!(
            mesh.provider(name).map(|x| &x.kind),
            Some(ProviderKind::ExtAuthzHttp(_)) | Some(ProviderKind::ExtAuthzGrpc(_))
        );
        if !usable {
            let what = match mesh.provider(name) {
                None => "is not defined in the mesh config's extensionProviders".to_string(),
                Some(_) => "is not an envoyExtAuthzHttp or envoyExtAuthzGrpc provider".to_string(),
            };
            out.push(format!(
                "AuthorizationPolicy {}/{}: spec.provider.name: {name:?} {what}; the requests it matches are denied (as Istio denies them)",
                p.namespace, p.name
            ));
        }
    }
    out
}

fn run(args: RunArgs) -> ExitCode {
    let mut config = match base_config(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    config.certs_dir = args.certs;
    config.hbone_addr = args.hbone_addr;
    config.ready_addr = args.ready_addr;
    config.metrics_addr = args.metrics_addr;
    config.envoy_prom_addr = args.envoy_prom_addr;
    config.admin_addr = args.admin_addr;
    config.drain_timeout = args.drain_timeout;
    config.server.handshake_timeout = args.handshake_timeout;
    config.upstream.connect_timeout = args.connect_timeout;
    config.upstream.hbone_port = args.hbone_upstream_port;
    config.limits.upstream_response_timeout =
        (!args.upstream_response_timeout.is_zero()).then_some(args.upstream_response_timeout);
    config.limits.stream_idle_timeout =
        (!args.stream_idle_timeout.is_zero()).then_some(args.stream_idle_timeout);
    config.limits.request_header_timeout = args.request_header_timeout;
    config.limits.idle_timeout = args.idle_timeout;
    config.limits.max_requests = args.max_requests;
    config.limits.metrics_baggage = args.ambient_enable_baggage;
    config.limits.max_memory =
        (args.max_memory_mib > 0).then_some(args.max_memory_mib * 1024 * 1024);
    config.cluster_id = args.cluster_id.clone();
    config.network = args.network.clone();
    config.node_name = args.node_name.clone();
    match std::fs::read_to_string(&args.pod_labels) {
        Ok(text) => config.labels = downward_labels(&text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            eprintln!(
                "error: cannot read the pod labels {}: {e}",
                args.pod_labels.display()
            );
            return ExitCode::from(2);
        }
    }
    config.dns.servers = args.dns_servers.clone();
    config.dns.refresh_rate = args.dns_refresh_rate;
    config.locality = args.locality.clone().filter(|l| !l.is_empty());
    // istiod's waypoint Deployment sets both (downward API).
    if let (Ok(ns), Ok(name)) = (std::env::var("POD_NAMESPACE"), std::env::var("POD_NAME"))
        && !ns.is_empty()
        && !name.is_empty()
    {
        config.own_pod = Some((ns, name));
    }
    if let Some(addr) = &args.ca_addr {
        let sa = args
            .service_account
            .clone()
            .unwrap_or_else(|| config.gateway_name.clone());
        config.ca = Some(identity::CaSettings {
            addr: addr.clone(),
            root_cert: args.ca_root.clone(),
            token: args.ca_token.clone(),
            cluster_id: args.cluster_id.clone(),
            identity: format!(
                "spiffe://{}/ns/{}/sa/{sa}",
                config.trust_domain, config.gateway_namespace
            ),
            ttl: args.cert_ttl,
            timeout: Duration::from_secs(10),
        });
    }
    let rt = match runtime(args.workers) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        // Handlers first: a SIGTERM that arrives as soon as the listeners are up (a pod
        // deleted while starting) must drain, not kill the process.
        let signals = match Signals::install() {
            Ok(s) => s,
            Err(e) => {
                error!("cannot install signal handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
        let running = match proxy::start(config, proxy::Inputs::default()).await {
            Ok(r) => r,
            Err(e) => {
                error!("{e:#}");
                return ExitCode::FAILURE;
            }
        };
        let logger = running.shared.access_log.clone();
        signals.wait(&running).await;
        info!("draining");
        let clean = running.shutdown().await;
        if let Some(l) = logger {
            l.flushed(Duration::from_secs(2)).await;
        }
        info!(clean, "stopped");
        ExitCode::SUCCESS
    })
}

/// SIGHUP reloads; SIGTERM or SIGINT starts the drain.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Until SIGTERM or SIGINT, reloading on every SIGHUP.
    async fn wait(mut self, running: &proxy::Running) {
        loop {
            tokio::select! {
                _ = self.term.recv() => return,
                _ = self.int.recv() => return,
                _ = self.hup.recv() => {
                    info!("SIGHUP: reloading configuration");
                    let _ = running.reload();
                }
            }
        }
    }
}

fn demo(args: DemoArgs) -> ExitCode {
    let rt = match runtime(None) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(proxy::cli::demo::run(proxy::cli::demo::DemoOptions {
        requests: args.requests,
        ..Default::default()
    })) {
        Ok(report) => {
            eprintln!("{}", report.summary());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn certs(args: CertsArgs) -> ExitCode {
    let result = (|| -> Result<(), hbone::Error> {
        let pki = hbone::testing::Pki::new(&args.trust_domain)?;
        pki.write_dir(&args.out, &args.namespace, &args.service_account)?;
        pki.write_named(&args.out, "sleep", "default", "sleep")?;
        Ok(())
    })();
    match result {
        Ok(()) => {
            println!(
                "wrote {}/{{cert-chain.pem,key.pem,root-cert.pem}} for spiffe://{}/ns/{}/sa/{} and sleep-cert.pem/sleep-key.pem for spiffe://{}/ns/default/sa/sleep",
                args.out.display(),
                args.trust_domain,
                args.namespace,
                args.service_account,
                args.trust_domain
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
