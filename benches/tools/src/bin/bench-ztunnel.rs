//! A destination-ztunnel stand-in for the `hbone2` bench scenario: terminates HBONE (mTLS +
//! HTTP/2 CONNECT) with this project's server and forwards each tunnel to
//! `127.0.0.1:<port of the CONNECT authority>`, as ztunnel inbound forwards to the pod.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use hbone::server::{ServerSettings, ServerStats, ServerTls, TunnelRequest};
use hbone::tls::CertBundle;
use http::StatusCode;

#[derive(Parser)]
struct Args {
    /// Listen address.
    #[arg(long)]
    listen: SocketAddr,
    /// Certificate chain (PEM) the ztunnel presents.
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    /// Mesh root (PEM).
    #[arg(long)]
    root: PathBuf,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
}

async fn forward(req: TunnelRequest) {
    let port = req
        .authority
        .as_deref()
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or(0);
    match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
        Ok(mut pod) => {
            let _ = pod.set_nodelay(true);
            if let Ok(mut tunnel) = req.accept() {
                let _ = tokio::io::copy_bidirectional(&mut tunnel, &mut pod).await;
            }
        }
        Err(_) => req.reject(StatusCode::SERVICE_UNAVAILABLE, ""),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let certs = CertBundle::from_pem(
        &std::fs::read(&args.cert)?,
        &std::fs::read(&args.key)?,
        &std::fs::read(&args.root)?,
    )?;
    let tls = ServerTls {
        config: hbone::tls::server_config(&certs, &args.trust_domain)?,
        identity: Some(certs.identity.clone()),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen).await?;
        let (_trigger, watcher) = hbone::drain::channel();
        hbone::server::serve(
            listener,
            Arc::new(move || tls.clone()),
            Arc::new(ServerSettings::default()),
            Arc::new(ServerStats::default()),
            forward,
            watcher,
        )
        .await;
        anyhow::Ok(())
    })
}
