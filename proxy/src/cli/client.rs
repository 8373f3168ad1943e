//! A small HBONE HTTP client: opens a CONNECT tunnel on an [`hbone::client::Connection`] and
//! speaks HTTP/1.1 (keep-alive) inside it, as an application behind ztunnel would. Used by the
//! demo, the integration tests and the benchmark load generator.

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

/// A response read to the end.
#[derive(Debug, Clone)]
pub struct FullResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl FullResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// HTTP/1.1 over one tunnel.
pub struct TunnelHttp {
    sender: http1::SendRequest<Full<Bytes>>,
}

impl TunnelHttp {
    /// Open a tunnel to `authority` (e.g. `10.0.0.10:9080`) and start HTTP/1.1 in it.
    pub async fn open(
        conn: &hbone::client::Connection,
        authority: &str,
    ) -> anyhow::Result<TunnelHttp> {
        let stream = conn.open(authority, HeaderMap::new()).await?;
        let (sender, driver) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = driver.await;
        });
        Ok(TunnelHttp { sender })
    }

    /// Send a request and read the whole response.
    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> anyhow::Result<FullResponse> {
        self.sender.ready().await?;
        let resp: Response<hyper::body::Incoming> = self.sender.send_request(req).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(FullResponse {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// `GET path` with `Host: host`.
    pub async fn get(&mut self, host: &str, path: &str) -> anyhow::Result<FullResponse> {
        let req = Request::builder()
            .uri(path)
            .header(http::header::HOST, host)
            .body(Full::new(Bytes::new()))?;
        self.send(req).await
    }
}
