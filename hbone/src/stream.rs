//! [`H2Stream`]: one HTTP/2 CONNECT stream as a byte stream (`AsyncRead + AsyncWrite`), so the
//! tunnelled bytes can be served by hyper or copied to a TCP socket (ztunnel src/proxy/h2.rs,
//! agentgateway `RWStream`).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest single DATA write we queue at once; h2 splits it into frames of the peer's
/// max frame size. Bounding it bounds the per-tunnel send buffer.
const MAX_WRITE: usize = 256 * 1024;

/// A CONNECT stream's two halves as one duplex byte stream.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Unread remainder of the last DATA frame.
    pending: Bytes,
    /// Bytes received/sent on this stream (tunnel payload only), for logs and metrics.
    pub bytes_received: u64,
    pub bytes_sent: u64,
    write_closed: bool,
    /// The connection's count of streams the peer reset (rapid-reset budget).
    peer_resets: Option<Arc<AtomicU32>>,
    /// A pooled connection's stream count, released when this stream is dropped.
    pool_slot: Option<Arc<std::sync::atomic::AtomicUsize>>,
}

impl Drop for H2Stream {
    fn drop(&mut self) {
        if let Some(slot) = self.pool_slot.take() {
            slot.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> H2Stream {
        H2Stream {
            send,
            recv,
            pending: Bytes::new(),
            bytes_received: 0,
            bytes_sent: 0,
            write_closed: false,
            peer_resets: None,
            pool_slot: None,
        }
    }

    /// Decrement `slot` when this stream is dropped (pool accounting).
    pub fn release_on_drop(mut self, slot: Arc<std::sync::atomic::AtomicUsize>) -> H2Stream {
        self.pool_slot = Some(slot);
        self
    }

    /// Count peer resets of this stream in `counter` (shared by the connection).
    pub fn count_resets_in(mut self, counter: Arc<AtomicU32>) -> H2Stream {
        self.peer_resets = Some(counter);
        self
    }

    /// Abort the stream with RST_STREAM (used when the far side failed mid-stream, so the
    /// peer sees an error rather than a clean end).
    pub fn reset(&mut self, reason: h2::Reason) {
        self.send.send_reset(reason);
    }
}

fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    let kind = match e.reason() {
        Some(h2::Reason::NO_ERROR) | Some(h2::Reason::CANCEL) => io::ErrorKind::ConnectionReset,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match ready!(this.poll_fill(cx)) {
            Ok(true) => {}
            Ok(false) => return Poll::Ready(Ok(())),
            Err(e) => return Poll::Ready(Err(e)),
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        if this.pending.is_empty() {
            // An empty `Bytes` split off h2's read buffer still pins that whole buffer; an
            // idle tunnel must not hold the connection's receive buffer alive.
            this.pending = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl H2Stream {
    /// Wait until bytes can be read without consuming them: `Ok(true)` when some are
    /// buffered, `Ok(false)` at end of stream. Lets an idle tunnel wait for its next
    /// request holding nothing but the stream (no reader buffer of its own).
    pub fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if !self.pending.is_empty() {
            return Poll::Ready(Ok(true));
        }
        loop {
            match ready!(self.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(false)),
                Some(Ok(data)) => {
                    // Give the flow-control credit back as soon as we own the bytes: memory is
                    // bounded by the stream window (4 MiB) either way.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    self.bytes_received += data.len() as u64;
                    if !data.is_empty() {
                        self.pending = data;
                        return Poll::Ready(Ok(true));
                    }
                }
                Some(Err(e)) => {
                    if e.reason() == Some(h2::Reason::NO_ERROR) {
                        return Poll::Ready(Ok(false));
                    }
                    if e.is_reset()
                        && e.is_remote()
                        && let Some(c) = &self.peer_resets
                    {
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                    return Poll::Ready(Err(h2_to_io(e)));
                }
            }
        }
    }
}

impl H2Stream {
    /// Queue up to `len` bytes (at most [`MAX_WRITE`], at most what flow control grants) as
    /// one DATA write; `take(n)` yields the first `n` of them as one buffer.
    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        len: usize,
        take: impl FnOnce(usize) -> Bytes,
    ) -> Poll<io::Result<usize>> {
        if len == 0 {
            return Poll::Ready(Ok(0));
        }
        if self.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let want = len.min(MAX_WRITE);
        self.send.reserve_capacity(want);
        let granted = loop {
            match ready!(self.send.poll_capacity(cx)) {
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                Some(Ok(0)) => continue,
                Some(Ok(n)) => break n,
            }
        };
        let n = granted.min(want);
        self.send.send_data(take(n), false).map_err(h2_to_io)?;
        self.bytes_sent += n as u64;
        Poll::Ready(Ok(n))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_send(cx, buf.len(), |n| Bytes::copy_from_slice(&buf[..n]))
    }

    /// Vectored, so hyper queues a response's head and body chunks as they are (its
    /// `WriteStrategy::Queue`) instead of first flattening them into its own buffer and
    /// shifting that buffer after each partial write: the body is copied once, here, into
    /// the DATA frame's buffer (the 1 MiB response profile spent half its memmove time in
    /// the flattening).
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum();
        self.poll_send(cx, len, |n| {
            let mut data = bytes::BytesMut::with_capacity(n);
            for b in bufs {
                let take = (n - data.len()).min(b.len());
                data.extend_from_slice(&b[..take]);
                if data.len() == n {
                    break;
                }
            }
            data.freeze()
        })
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 writes queued frames from the connection task; nothing to flush per stream.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.write_closed {
            this.write_closed = true;
            // END_STREAM on an empty DATA frame: the half-close of the tunnel.
            if let Err(e) = this.send.send_data(Bytes::new(), true) {
                return Poll::Ready(Err(h2_to_io(e)));
            }
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Vectored writes (hyper's queued head and body chunks) arrive whole and in order,
    /// across partial writes bounded by MAX_WRITE and by flow control.
    #[tokio::test]
    async fn vectored_writes_arrive_whole_and_in_order() {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(server_io).await.unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            let send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            let mut s = H2Stream::new(send, req.into_body());
            assert!(s.is_write_vectored());
            let big = vec![7u8; MAX_WRITE + 44_000];
            let parts: [&[u8]; 4] = [b"head\r\n", b"", b"body", &big];
            let mut written = 0;
            let total: usize = parts.iter().map(|p| p.len()).sum();
            while written < total {
                // The slices not yet written, the first one cut where the last write ended.
                let mut skip = written;
                let mut left = Vec::new();
                for p in parts {
                    if skip >= p.len() {
                        skip -= p.len();
                        continue;
                    }
                    left.push(std::io::IoSlice::new(&p[skip..]));
                    skip = 0;
                }
                let n = s.write_vectored(&left).await.unwrap();
                assert!(n > 0 && n <= MAX_WRITE, "one write of {n} bytes");
                written += n;
            }
            s.shutdown().await.unwrap();
            assert_eq!(s.bytes_sent, total as u64);
        });
        let (mut client, conn) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(conn);
        let req = http::Request::connect("10.0.0.1:80").body(()).unwrap();
        let (resp, send) = client.send_request(req, false).unwrap();
        let resp = resp.await.unwrap();
        let mut s = H2Stream::new(send, resp.into_body());
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        server.await.unwrap();
        let mut want = b"head\r\nbody".to_vec();
        want.extend(std::iter::repeat_n(7u8, MAX_WRITE + 44_000));
        assert_eq!(got.len(), want.len());
        assert!(got == want, "bytes differ");
    }
}
