//! The start of a request body read before the upstream call, then sent ahead of the rest:
//! Envoy's ext_authz filter with `with_request_body` (Istio `includeRequestBodyInCheck`)
//! holds the body in the stream's decoder buffer until the check is answered, and the router
//! then sends that buffer followed by whatever the client still sends. Bounded by the
//! provider's `maxRequestBytes` (plus at most one frame).

use std::collections::VecDeque;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::BodyProgress;

/// Frames already read from the client, in order (data, and trailers if the body ended
/// with them).
#[derive(Default)]
pub struct BodyPrefix {
    pub(super) frames: VecDeque<Frame<Bytes>>,
    len: usize,
}

/// Why reading the prefix stopped short.
#[derive(Debug)]
pub enum PrefixError {
    /// The client sent nothing for the stream idle timeout.
    Idle,
    /// The body broke its framing (or the stream was reset).
    Failed,
}

impl BodyPrefix {
    /// Data bytes held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first `max` data bytes, as Envoy copies them into the check
    /// (`CheckRequestUtils::setRequestBody`: `min(buffer length, max_request_bytes)`).
    pub fn head(&self, max: usize) -> Bytes {
        let mut out = BytesMut::with_capacity(self.len.min(max));
        for d in self.frames.iter().filter_map(Frame::data_ref) {
            let room = max - out.len();
            if room == 0 {
                break;
            }
            out.extend_from_slice(&d[..d.len().min(room)]);
        }
        out.freeze()
    }

    /// Read frames from `body` until it ends or at least `stop_at` data bytes are held,
    /// counting them in `progress` (`%BYTES_RECEIVED%`; the body that follows counts the
    /// rest). `idle`: the stream idle timeout between frames.
    pub async fn read(
        body: &mut Incoming,
        progress: &BodyProgress,
        stop_at: usize,
        idle: Option<Duration>,
    ) -> Result<BodyPrefix, PrefixError> {
        let mut prefix = BodyPrefix::default();
        while prefix.len < stop_at && !body.is_end_stream() {
            let next = body.frame();
            let frame = match idle {
                Some(t) => match tokio::time::timeout(t, next).await {
                    Ok(f) => f,
                    Err(_) => {
                        progress.mark_idle_timed_out();
                        return Err(PrefixError::Idle);
                    }
                },
                None => next.await,
            };
            match frame {
                None => break,
                Some(Err(_)) => {
                    progress.mark_failed();
                    return Err(PrefixError::Failed);
                }
                Some(Ok(frame)) => {
                    if let Some(d) = frame.data_ref() {
                        prefix.len += d.len();
                        progress.add(d.len() as u64);
                    }
                    prefix.frames.push_back(frame);
                }
            }
        }
        if body.is_end_stream() {
            progress.mark_complete();
        }
        Ok(prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_takes_the_first_bytes_across_frames() {
        let mut p = BodyPrefix::default();
        for chunk in ["0123456789", "abcdefghij"] {
            p.len += chunk.len();
            p.frames.push_back(Frame::data(Bytes::from(chunk)));
        }
        assert_eq!(p.head(16), "0123456789abcdef");
        assert_eq!(p.head(100), "0123456789abcdefghij");
        assert_eq!(p.head(0), "");
        assert_eq!(p.len(), 20);
    }
}
