//! gRPC messages of a stream, counted as they pass (Envoy's `grpc_stats` filter, which istiod
//! puts in every waypoint HTTP chain with `emit_filter_state`, and from which Istio's stats
//! filter reports `istio_request_messages_total` / `istio_response_messages_total`).
//!
//! A message is counted when its 5-byte length prefix begins (Envoy's `FrameInspector`), so
//! a message cut short still counts; the parser keeps 5 bytes and a length, nothing else.

use std::sync::atomic::{AtomicU64, Ordering};

/// Messages seen each way, shared by the two bodies and the access-log record.
#[derive(Debug, Default)]
pub struct GrpcMessages {
    requests: AtomicU64,
    responses: AtomicU64,
}

impl GrpcMessages {
    pub fn counts(&self) -> (u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.responses.load(Ordering::Relaxed),
        )
    }
}

/// Which way a [`FrameCounter`] counts.
#[derive(Debug, Clone, Copy)]
pub enum Direction {
    Request,
    Response,
}

/// Finds message boundaries in one direction's byte stream.
#[derive(Debug)]
pub struct FrameCounter {
    direction: Direction,
    header: [u8; 5],
    have: u8,
    /// Bytes of the current message's payload still to come.
    remaining: u64,
}

impl FrameCounter {
    pub fn new(direction: Direction) -> FrameCounter {
        FrameCounter {
            direction,
            header: [0; 5],
            have: 0,
            remaining: 0,
        }
    }

    /// Count the messages that begin in `data`, adding them to `to`.
    pub fn feed(&mut self, mut data: &[u8], to: &GrpcMessages) {
        let mut started = 0;
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(data.len() as u64);
                self.remaining -= n;
                data = &data[n as usize..];
                continue;
            }
            if self.have == 0 {
                started += 1;
            }
            let take = (5 - self.have as usize).min(data.len());
            self.header[self.have as usize..self.have as usize + take]
                .copy_from_slice(&data[..take]);
            self.have += take as u8;
            data = &data[take..];
            if self.have == 5 {
                let [_, a, b, c, d] = self.header;
                self.remaining = u64::from(u32::from_be_bytes([a, b, c, d]));
                self.have = 0;
            }
        }
        if started > 0 {
            let counter = match self.direction {
                Direction::Request => &to.requests,
                Direction::Response => &to.responses,
            };
            counter.fetch_add(started, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(payload: &[u8]) -> Vec<u8> {
        let mut m = vec![0];
        m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        m.extend_from_slice(payload);
        m
    }

    #[test]
    fn messages_are_counted_across_any_split() {
        let mut stream = Vec::new();
        for p in [&b"hello"[..], b"", &[7u8; 300][..], b"x"] {
            stream.extend(message(p));
        }
        for chunk in [1, 2, 3, 5, 6, 7, 64, stream.len()] {
            let to = GrpcMessages::default();
            let mut c = FrameCounter::new(Direction::Response);
            for part in stream.chunks(chunk) {
                c.feed(part, &to);
            }
            assert_eq!(to.counts(), (0, 4), "chunks of {chunk}");
        }
        // A message cut short still counted, as Envoy's frame inspector does.
        let to = GrpcMessages::default();
        let mut c = FrameCounter::new(Direction::Request);
        c.feed(&message(b"abcdef")[..7], &to);
        assert_eq!(to.counts(), (1, 0));
    }
}
