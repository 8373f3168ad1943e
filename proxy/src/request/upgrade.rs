//! WebSocket upgrades, as Envoy's waypoint carries them (istiod sets `upgrade_configs:
//! websocket` on every waypoint HTTP chain): the upgrade request goes through routing and
//! authorization like any request, is forwarded with `Connection: upgrade` / `Upgrade:
//! websocket`, and when the backend answers `101` the two connections are joined byte for
//! byte until both sides are done. Half-close is honoured (one direction ending shuts down the
//! other side's write half, the other direction goes on). The request is logged once, when the
//! session ends: code 101, the session's duration and bytes (Envoy counts upgraded bytes as
//! the stream's body bytes).
//!
//! hyper's HTTP/1.1 server is driven with `poll_without_shutdown` (idle tunnels park, see
//! listener/inner.rs), so upgrades are handled by hand: the request phases leave the backend's
//! pending upgrade in the inner connection's [`UpgradeSlot`], and the connection, once hyper
//! has written the 101, takes its socket back ([`bridge`]).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::request::body::LoadGuard;
use crate::request::log::PendingLog;

/// What the request phases hand over when the backend switched protocols.
pub struct PendingUpgrade {
    pub upstream: hyper::upgrade::OnUpgrade,
    pub log: PendingLog,
    pub load: LoadGuard,
}

/// Per inner connection: at most one upgrade waiting for hyper to finish writing the 101.
#[derive(Default)]
pub struct UpgradeSlot(Mutex<Option<Box<PendingUpgrade>>>);

impl std::fmt::Debug for UpgradeSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UpgradeSlot")
    }
}

impl UpgradeSlot {
    pub fn put(&self, p: PendingUpgrade) {
        if let Ok(mut g) = self.0.lock() {
            *g = Some(Box::new(p));
        }
    }

    pub fn take(&self) -> Option<Box<PendingUpgrade>> {
        self.0.lock().ok().and_then(|mut g| g.take())
    }
}

/// Join the client's connection (`down`, any bytes it sent after the request head already put
/// back in front) with the backend's upgraded connection until both directions end, or
/// nothing moves either way for `idle_timeout`. Logs the request when the session ends.
pub async fn bridge<D>(down: D, up: Box<PendingUpgrade>, idle_timeout: Duration)
where
    D: AsyncRead + AsyncWrite + Unpin,
{
    let PendingUpgrade {
        upstream,
        mut log,
        load,
    } = *up;
    let upgraded = match upstream.await {
        Ok(u) => u,
        Err(e) => {
            // The backend's connection ended before it could be taken over.
            tracing::debug!(error = %e, "upstream upgrade failed");
            if let Some(r) = log.record() {
                r.response_flags.set(accesslog::ResponseFlag::UC);
                r.response_code_details =
                    Some("upstream_reset_after_response_started{connection_termination}".into());
            }
            log.finish(0);
            return;
        }
    };
    let spliced = splice(down, TokioIo::new(upgraded), idle_timeout).await;
    if let Some(e) = &spliced.error {
        tracing::debug!(error = %e, "upgraded session ended with an error");
    }
    let (received, sent) = (spliced.from_down, spliced.from_up);
    drop(load);
    if spliced.idle
        && let Some(r) = log.record()
    {
        r.response_code_details = Some("stream_idle_timeout".into());
    }
    log.finish_with(received, sent);
}

/// How a [`splice`] ended.
#[derive(Debug)]
pub struct Spliced {
    /// Bytes read from the client side and written upstream.
    pub from_down: u64,
    /// Bytes read from the upstream side and written to the client.
    pub from_up: u64,
    /// Nothing moved either way for the idle timeout.
    pub idle: bool,
    /// The copy failed (a reset on either side).
    pub error: Option<io::Error>,
}

/// Copy bytes both ways until both directions have ended (one side's end shuts down the
/// other's write half: half-close), an error, or `idle_timeout` without a byte either way
/// (Envoy's tcp_proxy `idle_timeout`, 1 h by default, and the HCM's for upgraded streams).
pub async fn splice<D, U>(down: D, up: U, idle_timeout: Duration) -> Spliced
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Arc::new(Activity::new());
    let mut down = Counted::new(down, activity.clone());
    let mut up = Counted::new(up, activity.clone());
    let (idle, error) = {
        let copy = tokio::io::copy_bidirectional(&mut down, &mut up);
        tokio::pin!(copy);
        let timer = tokio::time::sleep(idle_timeout);
        tokio::pin!(timer);
        loop {
            tokio::select! {
                r = &mut copy => break (false, r.err()),
                _ = &mut timer => {
                    let quiet = activity.quiet_for();
                    if quiet >= idle_timeout {
                        break (true, None);
                    }
                    timer.as_mut().reset(Instant::now() + (idle_timeout - quiet));
                }
            }
        }
    };
    Spliced {
        from_down: down.read,
        from_up: up.read,
        idle,
        error,
    }
}

/// When bytes last moved either way.
struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        self.last_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn quiet_for(&self) -> Duration {
        self.epoch
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// A byte stream that counts what it reads and writes and records activity.
struct Counted<T> {
    inner: T,
    activity: Arc<Activity>,
    read: u64,
    written: u64,
}

impl<T> Counted<T> {
    fn new(inner: T, activity: Arc<Activity>) -> Counted<T> {
        Counted {
            inner,
            activity,
            read: 0,
            written: 0,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.read += n;
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r
            && *n > 0
        {
            self.written += *n as u64;
            self.activity.touch();
        }
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
}
