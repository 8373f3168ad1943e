//! [`FrameGuard`]: watches the HTTP/2 frames a peer sends (headers only, as they stream by
//! under the h2 codec) and cuts a connection that floods. h2 bounds the memory of PING and
//! SETTINGS handling but never closes the connection, so a flooder could keep a core busy
//! forever; this closes it once it exceeds Envoy's HTTP/2 abuse limits:
//! - PING and SETTINGS (not ACKs): a per-second budget (100 each);
//! - frames with an empty payload and no END_STREAM (DATA, HEADERS, CONTINUATION): at most 1
//!   in a row (Envoy `max_consecutive_inbound_frames_with_empty_payload: 1`);
//! - PRIORITY: at most 100 per stream opened, plus 100 (Envoy
//!   `max_inbound_priority_frames_per_stream: 100`);
//! - WINDOW_UPDATE: at most 10 per DATA frame sent to the peer, plus 10 (Envoy
//!   `max_inbound_window_update_frames_per_data_frame_sent: 10`); outbound frame headers are
//!   parsed the same way to count them.
//!
//! Cost: one 9-byte frame header parsed per frame each way, payloads skipped by length.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

const PREFACE_LEN: usize = 24;
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;
const ACK: u8 = 0x1;
const END_STREAM: u8 = 0x1;

/// Envoy's HTTP/2 abuse limits (`Http2ProtocolOptions` defaults).
const MAX_CONSECUTIVE_EMPTY_FRAMES: u32 = 1;
const MAX_PRIORITY_PER_STREAM: u64 = 100;
const MAX_WINDOW_UPDATES_PER_DATA_SENT: u64 = 10;

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

/// The I/O under h2 on the server side, with the flood check on the read half (and the
/// count of DATA frames sent on the write half).
pub struct FrameGuard<IO> {
    inner: IO,
    watch: FrameWatch,
    /// Frame boundaries of what we write (no preface on the server's side).
    out: FrameCursor,
}

/// Tracks frame boundaries in a byte stream: yields each frame's (type, flags, length).
#[derive(Default)]
struct FrameCursor {
    header: [u8; 9],
    header_len: usize,
    payload_left: usize,
}

impl FrameCursor {
    /// Feed bytes; `on_frame` gets each complete frame header's (type, flags, payload length).
    fn feed(&mut self, mut data: &[u8], mut on_frame: impl FnMut(u8, u8, usize)) {
        while !data.is_empty() {
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
                let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
                self.payload_left = len;
                on_frame(h[3], h[4], len);
            }
        }
    }
}

/// Frame-boundary tracking and counters (separate from the I/O so a read buffer can be
/// inspected in place).
struct FrameWatch {
    limits: FloodLimits,
    /// Bytes of the client preface still to skip.
    preface_left: usize,
    cursor: FrameCursor,
    window_start: Instant,
    consecutive_empty: u32,
    streams_opened: u64,
    priority_frames: u64,
    window_updates: u64,
    /// DATA frames we sent (counted on the write half).
    data_sent: u64,
    pings: u32,
    settings: u32,
    tripped: Option<&'static str>,
}

impl<IO> FrameGuard<IO> {
    pub fn new(inner: IO, limits: FloodLimits) -> FrameGuard<IO> {
        FrameGuard {
            inner,
            watch: FrameWatch::new(limits),
            out: FrameCursor::default(),
        }
    }

    /// Count the DATA frames in bytes just written.
    fn wrote(&mut self, bytes: &[u8]) {
        let sent = &mut self.watch.data_sent;
        self.out.feed(bytes, |kind, _, _| {
            if kind == DATA {
                *sent += 1;
            }
        });
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
            cursor: FrameCursor::default(),
            window_start: Instant::now(),
            consecutive_empty: 0,
            streams_opened: 0,
            priority_frames: 0,
            window_updates: 0,
            data_sent: 0,
            pings: 0,
            settings: 0,
            tripped: None,
        }
    }

    fn observe(&mut self, mut data: &[u8]) {
        if self.preface_left > 0 {
            let n = self.preface_left.min(data.len());
            self.preface_left -= n;
            data = &data[n..];
        }
        let mut cursor = std::mem::take(&mut self.cursor);
        cursor.feed(data, |kind, flags, len| self.frame(kind, flags, len));
        self.cursor = cursor;
    }

    /// One inbound frame header.
    fn frame(&mut self, kind: u8, flags: u8, len: usize) {
        // Empty DATA/HEADERS/CONTINUATION without END_STREAM do nothing but cost work.
        if matches!(kind, DATA | HEADERS | CONTINUATION) && len == 0 && flags & END_STREAM == 0 {
            self.consecutive_empty += 1;
            if self.consecutive_empty > MAX_CONSECUTIVE_EMPTY_FRAMES {
                self.tripped = Some("empty frame flood");
            }
        } else if len > 0 {
            self.consecutive_empty = 0;
        }
        match kind {
            HEADERS => self.streams_opened += 1,
            PRIORITY => {
                self.priority_frames += 1;
                if self.priority_frames > MAX_PRIORITY_PER_STREAM * (1 + self.streams_opened) {
                    self.tripped = Some("PRIORITY flood");
                }
            }
            WINDOW_UPDATE => {
                self.window_updates += 1;
                if self.window_updates > MAX_WINDOW_UPDATES_PER_DATA_SENT * (1 + self.data_sent) {
                    self.tripped = Some("WINDOW_UPDATE flood");
                }
            }
            _ => {}
        }
        if flags & ACK == 0 && matches!(kind, PING | SETTINGS) {
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
            } else {
                self.settings += 1;
                if self.settings > self.limits.settings_per_second {
                    self.tripped = Some("SETTINGS flood");
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
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            this.wrote(&buf[..*n]);
        }
        r
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
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r {
            let mut left = *n;
            for b in bufs {
                if left == 0 {
                    break;
                }
                let take = left.min(b.len());
                this.wrote(&b[..take]);
                left -= take;
            }
        }
        r
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

    fn guard() -> FrameGuard<()> {
        let mut g = FrameGuard::new((), FloodLimits::default());
        g.observe(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        g
    }

    #[test]
    fn consecutive_empty_frames_trip_after_envoys_limit() {
        let mut g = guard();
        // Empty frames broken up by frames with payload, or ending a stream, are fine.
        for _ in 0..50 {
            g.observe(&frame(DATA, 0, 0));
            g.observe(&frame(DATA, 0, 10));
            g.observe(&frame(DATA, END_STREAM, 0));
        }
        assert_eq!(g.tripped(), None);
        g.observe(&frame(DATA, 0, 0));
        g.observe(&frame(HEADERS, 0, 0));
        assert_eq!(g.tripped(), Some("empty frame flood"));
    }

    #[test]
    fn priority_frames_are_bounded_per_stream() {
        let mut g = guard();
        g.observe(&frame(HEADERS, 0x4, 10));
        for _ in 0..200 {
            g.observe(&frame(PRIORITY, 0, 5));
        }
        assert_eq!(g.tripped(), None, "100 per stream opened, plus 100");
        g.observe(&frame(PRIORITY, 0, 5));
        assert_eq!(g.tripped(), Some("PRIORITY flood"));
    }

    #[test]
    fn window_updates_are_bounded_by_data_sent() {
        let mut g = guard();
        // The server's own writes: SETTINGS, then 3 DATA frames, split oddly.
        let mut out = frame(SETTINGS, 0, 6);
        for _ in 0..3 {
            out.extend(frame(DATA, 0, 100));
        }
        for chunk in out.chunks(5) {
            g.wrote(chunk);
        }
        for _ in 0..40 {
            g.observe(&frame(WINDOW_UPDATE, 0, 4));
        }
        assert_eq!(g.tripped(), None, "10 per DATA frame sent, plus 10");
        g.observe(&frame(WINDOW_UPDATE, 0, 4));
        assert_eq!(g.tripped(), Some("WINDOW_UPDATE flood"));
    }
}
