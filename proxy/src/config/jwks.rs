//! Remote JSON Web Key Sets for RequestAuthentication `jwksUri` (and OpenID discovery when a
//! rule has neither `jwks` nor `jwksUri`): fetched in the background, cached by URI, refreshed
//! every 20 minutes (istiod's `PILOT_JWT_PUB_KEY_REFRESH_INTERVAL`), failures logged and
//! retried with backoff. Requests never wait for a fetch: a token whose keys are not
//! available yet is refused with `401 Jwks remote fetch is failed`, as Envoy answers when its
//! remote fetch fails; a request without a token never needs the keys. Such a request also
//! wakes the fetcher for an early retry (at most once a second).
//!
//! `http://` and `https://` URIs are fetched with a pooled hyper client; HTTPS servers are
//! verified against the operating system's roots (as istiod fetches public issuers' keys) plus
//! the mesh root from `root-cert.pem` (for issuers inside the mesh).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;
use hyper_util::rt::TokioExecutor;
use policy::{Jwks, JwksRef};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

/// Largest JWKS or discovery document accepted.
const MAX_DOCUMENT: usize = 1024 * 1024;

/// Timing of the fetcher.
#[derive(Debug, Clone)]
pub struct JwksSettings {
    /// How often a fetched key set is fetched again (istiod: 20 min).
    pub refresh: Duration,
    /// First retry delay after a failure; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// A request that needed missing keys wakes the fetcher no sooner than this after the
    /// previous attempt.
    pub min_retry: Duration,
}

impl Default for JwksSettings {
    fn default() -> Self {
        JwksSettings {
            refresh: Duration::from_secs(20 * 60),
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(5 * 60),
            min_retry: Duration::from_secs(1),
        }
    }
}

/// One fetched source.
struct Entry {
    keys: Arc<Mutex<Option<Arc<Jwks>>>>,
    kick: Arc<Notify>,
    task: JoinHandle<()>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The cache of remote key sets, one background task per source.
pub struct JwksCache {
    entries: Mutex<HashMap<JwksRef, Entry>>,
    /// Built on first use: loading and parsing the system's CA bundle costs memory and
    /// startup time that a waypoint without a remote `jwksUri` should not pay.
    client: std::sync::OnceLock<Client<Connector, Full<Bytes>>>,
    extra_roots: Vec<rustls_pki_types::CertificateDer<'static>>,
    settings: JwksSettings,
}

impl JwksCache {
    /// `extra_roots`: trust anchors beyond the operating system's (the mesh root).
    pub fn new(
        settings: JwksSettings,
        extra_roots: &[rustls_pki_types::CertificateDer<'static>],
    ) -> JwksCache {
        JwksCache {
            entries: Mutex::new(HashMap::new()),
            client: std::sync::OnceLock::new(),
            extra_roots: extra_roots.to_vec(),
            settings,
        }
    }

    fn client(&self) -> Client<Connector, Full<Bytes>> {
        self.client
            .get_or_init(|| {
                Client::builder(TokioExecutor::new()).build(https_connector(&self.extra_roots))
            })
            .clone()
    }

    /// Keep exactly `refs` fetched: start a task for each new one, stop the others (their keys
    /// are dropped). Must run inside the tokio runtime.
    pub fn sync(&self, refs: &[JwksRef]) {
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        entries.retain(|r, _| refs.contains(r));
        for r in refs {
            if entries.contains_key(r) {
                continue;
            }
            let keys = Arc::new(Mutex::new(None));
            let kick = Arc::new(Notify::new());
            let task = tokio::spawn(fetch_loop(
                self.client(),
                self.settings.clone(),
                r.clone(),
                keys.clone(),
                kick.clone(),
            ));
            entries.insert(r.clone(), Entry { keys, kick, task });
        }
    }

    /// The keys fetched for `r`, if any; when none, the fetcher is woken for an early retry.
    pub fn get(&self, r: &JwksRef) -> Option<Arc<Jwks>> {
        let entries = self.entries.lock().ok()?;
        let entry = entries.get(r)?;
        let keys = entry.keys.lock().ok().and_then(|k| k.clone());
        if keys.is_none() {
            entry.kick.notify_one();
        }
        keys
    }
}

/// HTTPS (or plain HTTP) connector on the aws-lc-rs provider with OS roots plus `extra_roots`.
fn https_connector(extra_roots: &[rustls_pki_types::CertificateDer<'static>]) -> Connector {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        warn!("loading the system's CA certificates: {e}");
    }
    let (added, _) = roots.add_parsable_certificates(native.certs);
    for r in extra_roots {
        let _ = roots.add(r.clone());
    }
    tracing::debug!(
        system_roots = added,
        mesh_roots = extra_roots.len(),
        "JWKS fetch trust anchors"
    );
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
        .unwrap_or_else(|_| {
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("invariant: TLS 1.3 is supported by aws-lc-rs")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth()
        });
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build()
}

async fn fetch_loop(
    client: Client<Connector, Full<Bytes>>,
    settings: JwksSettings,
    r: JwksRef,
    keys: Arc<Mutex<Option<Arc<Jwks>>>>,
    kick: Arc<Notify>,
) {
    let mut backoff = settings.initial_backoff;
    loop {
        let attempt = Instant::now();
        match fetch(&client, &r).await {
            Ok(jwks) => {
                info!(uri = %r.uri, keys = jwks.len(), "JWKS fetched");
                if let Ok(mut k) = keys.lock() {
                    *k = Some(Arc::new(jwks));
                }
                backoff = settings.initial_backoff;
                tokio::time::sleep(settings.refresh).await;
            }
            Err(e) => {
                // Keys fetched earlier stay in use (istiod keeps the last good key set).
                warn!(uri = %r.uri, retry_in = ?backoff, "JWKS fetch failed: {e:#}");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = async {
                        kick.notified().await;
                        tokio::time::sleep_until(attempt + settings.min_retry).await;
                    } => {}
                }
                backoff = (backoff * 2).min(settings.max_backoff);
            }
        }
    }
}

/// Fetch and parse one key set (through the discovery document when `r.discovery`).
async fn fetch(client: &Client<Connector, Full<Bytes>>, r: &JwksRef) -> anyhow::Result<Jwks> {
    let uri: String = if r.discovery {
        let doc = get(client, &r.uri, r.timeout).await?;
        let doc: serde_json::Value = serde_json::from_slice(&doc)
            .map_err(|e| anyhow::anyhow!("OpenID configuration is not JSON: {e}"))?;
        doc.get("jwks_uri")
            .and_then(|v| v.as_str())
            .ok_or_else(|| anyhow::anyhow!("OpenID configuration has no jwks_uri"))?
            .to_string()
    } else {
        r.uri.to_string()
    };
    let body = get(client, &uri, r.timeout).await?;
    let text = std::str::from_utf8(&body).map_err(|_| anyhow::anyhow!("JWKS is not UTF-8"))?;
    // Envoy treats a fetched set that does not parse as a failed fetch.
    Jwks::parse(text).map_err(|status| anyhow::anyhow!("{uri}: {status}"))
}

async fn get(
    client: &Client<Connector, Full<Bytes>>,
    uri: &str,
    timeout: Duration,
) -> anyhow::Result<Bytes> {
    let parsed: Uri = uri.parse()?;
    if !matches!(parsed.scheme_str(), Some("http" | "https")) {
        anyhow::bail!("{uri}: JWKS URIs must be http:// or https://");
    }
    let req = Request::get(parsed).body(Full::new(Bytes::new()))?;
    let fut = async {
        let resp = client.request(req).await?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_DOCUMENT)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the body: {e}"))?
            .to_bytes();
        anyhow::Ok((status, body))
    };
    let (status, body) = tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| anyhow::anyhow!("{uri}: timed out after {timeout:?}"))??;
    if status != StatusCode::OK {
        anyhow::bail!("{uri}: HTTP {status}");
    }
    Ok(body)
}
