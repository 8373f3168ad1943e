//! An HBONE stream with bytes already read (while sniffing, or read ahead by hyper) put back
//! in front.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use hbone::H2Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub struct Rewind {
    pub(super) prefix: Bytes,
    pub inner: H2Stream,
}

impl Rewind {
    pub(super) fn new(inner: H2Stream) -> Rewind {
        Rewind {
            prefix: Bytes::new(),
            inner,
        }
    }

    pub(super) fn rewind(&mut self, prefix: Bytes) {
        self.prefix = prefix;
    }

    /// Put `bytes` back in front of whatever is still unread.
    pub(super) fn unread(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        // Copied: `bytes` may be a view into a larger buffer (hyper's read buffer) that a
        // parked tunnel must not keep alive.
        let mut joined = bytes::BytesMut::with_capacity(bytes.len() + self.prefix.len());
        joined.extend_from_slice(&bytes);
        joined.extend_from_slice(&self.prefix);
        self.prefix = joined.freeze();
    }

    /// Ready when bytes can be read (`Ok(true)`) or at end of stream (`Ok(false)`).
    pub(super) fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if !self.prefix.is_empty() {
            return Poll::Ready(Ok(true));
        }
        self.inner.poll_fill(cx)
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
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

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
