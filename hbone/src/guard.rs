//! [`FrameGuard`]: watches the HTTP/2 frames a peer sends (headers only, as they stream by
//! under the h2 codec) and cuts a connection that floods control frames. h2 bounds the memory
//! of PING and SETTINGS handling but never closes the connection, so a flooder could keep a
//! core busy forever; this closes it once it exceeds a per-second budget. Cost: one 9-byte
//! frame header parsed per frame, payloads skipped by length.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

const PREFACE_LEN: usize = 24;
const PING: u8 = 0x6;
const SETTINGS: u8 = 0x4;
const ACK: u8 = 0x1;

/// Per-second budgets of control frames.
#[derive(Debug, Clone, Copy)]
pub struct FloodLimits {
    /// PING frames (not ACKs) a peer may send per second. ztunnel pings every 10 s.
    pub pings_per_second: u32,
    /// SETTINGS frames (not ACKs) a peer may send per second.
    pub settings_per_second: u32,
}

impl Default for FloodLimits {
    fn default() -> Self {
        FloodLimits {
            pings_per_second: 100,
            settings_per_second: 100,
        }
    }
}

/// The I/O under h2 on the server side, with the flood check on the read half.
pub struct FrameGuard<IO> {
    inner: IO,
    watch: FrameWatch,
}

/// Frame-boundary tracking and counters (separate from the I/O so a read buffer can be
/// inspected in place).
struct FrameWatch {
    limits: FloodLimits,
    /// Bytes of the client preface still to skip.
    preface_left: usize,
    /// Partial frame header being assembled.
    header: [u8; 9],
    header_len: usize,
    /// Payload bytes of the current frame still to skip.
    payload_left: usize,
    window_start: Instant,
    pings: u32,
    settings: u32,
    tripped: Option<&'static str>,
}

impl<IO> FrameGuard<IO> {
    pub fn new(inner: IO, limits: FloodLimits) -> FrameGuard<IO> {
        FrameGuard {
            inner,
            watch: FrameWatch::new(limits),
        }
    }

    pub fn get_ref(&self) -> &IO {
        &self.inner
    }

    /// Which flood closed the connection, if any.
    pub fn tripped(&self) -> Option<&'static str> {
        self.watch.tripped
    }

    #[cfg(test)]
    fn observe(&mut self, data: &[u8]) {
        self.watch.observe(data)
    }
}

impl FrameWatch {
    fn new(limits: FloodLimits) -> FrameWatch {
        FrameWatch {
            limits,
            preface_left: PREFACE_LEN,
            header: [0; 9],
            header_len: 0,
            payload_left: 0,
            window_start: Instant::now(),
            pings: 0,
            settings: 0,
            tripped: None,
        }
    }

    fn observe(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.preface_left > 0 {
                let n = self.preface_left.min(data.len());
                self.preface_left -= n;
                data = &data[n..];
                continue;
            }
            if self.payload_left > 0 {
                let n = self.payload_left.min(data.len());
                self.payload_left -= n;
                data = &data[n..];
                continue;
            }
            let n = (9 - self.header_len).min(data.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&data[..n]);
            self.header_len += n;
            data = &data[n..];
            if self.header_len == 9 {
                self.header_len = 0;
                let h = self.header;
                self.payload_left =
                    (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
                let (kind, flags) = (h[3], h[4]);
                if flags & ACK == 0 {
                    let now = Instant::now();
                    if now.duration_since(self.window_start) >= Duration::from_secs(1) {
                        self.window_start = now;
                        self.pings = 0;
                        self.settings = 0;
                    }
                    if kind == PING {
                        self.pings += 1;
                        if self.pings > self.limits.pings_per_second {
                            self.tripped = Some("PING flood");
                        }
                    } else if kind == SETTINGS {
                        self.settings += 1;
                        if self.settings > self.limits.settings_per_second {
                            self.tripped = Some("SETTINGS flood");
                        }
                    }
                }
            }
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for FrameGuard<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(why) = this.watch.tripped {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, why)));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            this.watch.observe(&buf.filled()[before..]);
            if let Some(why) = this.watch.tripped {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, why)));
            }
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for FrameGuard<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, len: usize) -> Vec<u8> {
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            flags,
            0,
            0,
            0,
            0,
        ];
        f.extend(std::iter::repeat_n(0u8, len));
        f
    }

    #[tokio::test]
    async fn counts_frames_across_arbitrary_chunking() {
        let mut g = FrameGuard::new(
            (),
            FloodLimits {
                pings_per_second: 3,
                settings_per_second: 100,
            },
        );
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend(frame(SETTINGS, 0, 6));
        bytes.extend(frame(0x0, 0, 1000)); // DATA with a payload that looks like frames
        for _ in 0..3 {
            bytes.extend(frame(PING, 0, 8));
            bytes.extend(frame(PING, ACK, 8));
        }
        for chunk in bytes.chunks(7) {
            g.observe(chunk);
        }
        assert_eq!(
            g.tripped(),
            None,
            "3 pings are within a budget of 3; ACKs do not count"
        );
        g.observe(&frame(PING, 0, 8));
        assert_eq!(g.tripped(), Some("PING flood"));
    }
}
