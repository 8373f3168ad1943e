//! Phase 6b, the upstream call: the one place that owns attempts, retries, timeouts and
//! back-off (Envoy's router with istiod's retry policy): least-request endpoint choice
//! avoiding hosts already tried, a pooled or new connection, the route timeout
//! (`timeouts.request`, else `--upstream-response-timeout`) for response headers and the
//! per-try timeout (`timeouts.backendRequest`), both from the end of the request; retriable failures (connect failure, refused
//! stream, gRPC unavailable/cancelled, listed status codes) retried after Envoy's jittered
//! exponential back-off until the budget is spent.

use std::net::SocketAddr;
use std::sync::Arc;

use http::Response;
use hyper::body::Incoming;
use tokio::time::Instant;

use super::backend::Target;
use super::body::LoadGuard;
use super::ctx::RequestCtx;
use super::error::ProxyError;
use super::forward::{Outbound, rebuild};
use super::headers::GRPC_STATUS;
use crate::upstream::balance::{Outcome, choose, report};
use crate::upstream::{BodyProgress, PoolReturn, RetryBuffer};

/// Envoy's retry back-off ceiling: 10 x the base interval.
const BACKOFF_MAX_FACTOR: u32 = 10;

/// The upstream's response, and what the respond phase needs with it.
pub(super) struct Answer {
    pub(super) resp: Response<Incoming>,
    pub(super) pool: Option<PoolReturn>,
    pub(super) load: LoadGuard,
    pub(super) service_time_ms: u64,
    /// Only the route's `timeouts.request` covers the body, as Envoy's route timeout does;
    /// `--upstream-response-timeout` bounds the wait for response headers and never cuts a
    /// body that keeps flowing (SSE, gRPC streams, downloads).
    pub(super) route_deadline: Option<Instant>,
}

pub(super) async fn call(
    ctx: &mut RequestCtx,
    out: Outbound,
    target: &Target,
    received: &Arc<BodyProgress>,
) -> Result<Answer, ProxyError> {
    let Outbound {
        req: mut upstream_req,
        proto,
        policy,
        retry_buf,
        head,
        mirror: _mirror,
    } = out;
    let (cluster, rule) = (&target.cluster, &target.rule);
    let max_attempts = policy.as_ref().map_or(1, |p| p.retries.saturating_add(1));
    let retry_codes: &[u16] = policy.as_ref().map_or(&[], |p| &p.codes);

    let upstream_started = Instant::now();
    // The route's request timeout (HTTPRoute `timeouts.request`), else this waypoint's
    // default response timeout (300 s; Istio's default is none): a backend that never
    // answers is released with 504 UT. Both run from the end of the request (Timers).
    let route_timeout = rule.as_ref().and_then(|r| r.request_timeout);
    let timers = Timers {
        received,
        started: upstream_started,
        global: route_timeout.or(ctx.shared.limits.upstream_response_timeout),
    };
    let per_try = rule.as_ref().and_then(|r| r.per_try_timeout);
    let mut tried: Vec<SocketAddr> = Vec::with_capacity(max_attempts as usize);
    let mut attempts = Attempts::new(max_attempts, cluster.traffic.clone());
    // DestinationRule `http2MaxRequests` (Envoy's `max_requests` circuit breaker): counted
    // until the response body ends; over it, 503 `UO` at once.
    let mut slot = match &cluster.traffic {
        Some(t) => Some(t.request_slot().ok_or(ProxyError::Overflow)?),
        None => None,
    };
    let conn_opts = conn_options(target);
    let hash = hash_key(ctx, cluster, &upstream_req);
    let retry_backoff = policy.as_ref().map(|p| p.backoff);
    loop {
        let endpoints = cluster.endpoints();
        let Some(endpoint) = choose(cluster, &endpoints, &tried, rand::random::<u64>(), hash)
        else {
            return Err(ProxyError::NoHealthyUpstream);
        };
        let addr = endpoint.addr;
        attempts.start();
        log_endpoint(ctx, endpoint);
        let checkout = match timers
            .run(
                ctx.shared
                    .upstreams
                    .checkout(endpoint, proto, conn_opts.clone()),
                None,
            )
            .await?
        {
            Ok(c) => c,
            Err(failure) => {
                if !matches!(failure, crate::upstream::UpstreamFailure::Overflow) {
                    report(cluster, endpoint, Outcome::LocalFailure);
                }
                tried.push(addr);
                if failure.retriable() && policy.is_some() && attempts.may_retry() {
                    if !back_off(&timers, retry_backoff, attempts.count).await {
                        return Err(ProxyError::Timeout { per_try: false });
                    }
                    continue;
                }
                return Err(upstream_error(failure, policy.is_some(), &attempts));
            }
        };
        ctx.record().upstream_local_address = Some(match checkout.local_addr {
            Some(a) => a.to_string(),
            None => "envoy://internal_client_address/".to_string(),
        });
        endpoint.load.inc();
        let mut load = LoadGuard(endpoint.load.clone(), None);
        let try_timer = per_try.map(|d| (Instant::now(), d));
        let sent = timers.run(checkout.send(upstream_req), try_timer).await?;
        match sent {
            Ok((resp, pool)) => {
                report(cluster, endpoint, Outcome::Status(resp.status().as_u16()));
                let retriable = retriable_response(&resp, retry_codes) && policy.is_some();
                if retriable
                    && attempts.may_retry()
                    && let (Some(head), Some(body)) =
                        (&head, retry_buf.as_ref().and_then(RetryBuffer::replay))
                {
                    // Envoy retries a retriable response and throws it away.
                    drop((resp, pool, load));
                    tried.push(addr);
                    upstream_req = rebuild(head, body);
                    if !back_off(&timers, retry_backoff, attempts.count).await {
                        return Err(ProxyError::Timeout { per_try: false });
                    }
                    continue;
                }
                if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS && ctx.upgrade.is_none() {
                    // A 101 to a request that asked for no upgrade cannot be forwarded.
                    return Err(ProxyError::Upstream {
                        failure: crate::upstream::UpstreamFailure::Protocol,
                        retried: attempts.count > 1,
                        retry_limit: false,
                    });
                }
                if retriable {
                    // The last response is forwarded, flagged as the retry limit (envoy-observed 2d).
                    ctx.record()
                        .response_flags
                        .set(accesslog::ResponseFlag::URX);
                }
                load.1 = slot.take();
                return Ok(Answer {
                    resp,
                    pool,
                    load,
                    service_time_ms: upstream_started.elapsed().as_millis() as u64,
                    // A response before the request ended (rare): its timer starts now.
                    route_deadline: route_timeout.map(|d| {
                        received
                            .completed_at()
                            .unwrap_or_else(Instant::now)
                            .max(upstream_started)
                            + d
                    }),
                });
            }
            Err(e) => {
                drop(load);
                if e.request.is_none() || !e.reused {
                    report(cluster, endpoint, Outcome::LocalFailure);
                }
                let retrying = policy.is_some();
                match after_send_failure(e, retrying, &mut attempts, &head, &retry_buf, received)? {
                    Again::Resend(r) => {
                        upstream_req = r;
                        continue;
                    }
                    Again::Retry(r) => upstream_req = r,
                }
                tried.push(addr);
                if !back_off(&timers, retry_backoff, attempts.count).await {
                    return Err(ProxyError::Timeout { per_try: false });
                }
            }
        }
    }
}

/// The connection options of the target's cluster, with the server name a DYNAMIC_DNS
/// request resolved (its SNI) and the further addresses its name resolved to.
fn conn_options(target: &Target) -> crate::upstream::ConnOptions {
    let mut conn_opts = crate::upstream::ConnOptions::of(&target.cluster);
    if let (Some(name), Some((_, server))) = (&target.server_name, conn_opts.tls.as_mut()) {
        *server = name.clone();
    }
    conn_opts.more_addrs = target.more_addrs.clone();
    conn_opts
}

/// DestinationRule `consistentHash`: the request's key (a generated cookie is queued on the
/// response), or `None`.
fn hash_key<B>(
    ctx: &mut RequestCtx,
    cluster: &policy::Cluster,
    req: &http::Request<B>,
) -> Option<u64> {
    let Some(policy::traffic::LbPolicy::ConsistentHash(h)) =
        cluster.traffic.as_ref().map(|t| &t.lb)
    else {
        return None;
    };
    let source = ctx
        .record()
        .downstream_remote_address
        .as_deref()
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .map(|a| a.ip());
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let (key, set_cookie) = crate::upstream::balance::hash_key(h, req.headers(), &path, source);
    if let Some(v) = set_cookie.and_then(|c| http::HeaderValue::from_str(&c).ok()) {
        ctx.response_headers.push((http::header::SET_COOKIE, v));
    }
    key
}

/// The attempt's endpoint in the log (Istio renders HBONE endpoints as
/// `envoy://connect_originate/<ip>:<port>`).
fn log_endpoint(ctx: &mut RequestCtx, endpoint: &policy::Endpoint) {
    ctx.log.set_endpoint(endpoint);
    let addr = endpoint.addr;
    ctx.record().upstream_host = Some(if endpoint.tunnel.is_some() {
        format!("envoy://connect_originate/{addr}")
    } else {
        addr.to_string()
    });
}

/// What to send next after a failed send.
enum Again {
    /// Not sent on a reused connection: again, without spending a retry.
    Resend(http::Request<crate::upstream::RequestBody>),
    /// A retry (after the back-off).
    Retry(http::Request<crate::upstream::RequestBody>),
}

/// After a send failed: send again (a resend or a retry), or the error the request ends with.
fn after_send_failure(
    e: crate::upstream::SendError,
    retrying: bool,
    attempts: &mut Attempts,
    head: &Option<http::Request<()>>,
    retry_buf: &Option<RetryBuffer>,
    received: &BodyProgress,
) -> Result<Again, ProxyError> {
    let can_retry = e.failure.retriable() && retrying && attempts.may_retry();
    match e.request {
        // Not sent on a *reused* connection the upstream had just closed: try again on a
        // fresh connection, without spending a retry. (A fresh connection that fails is a
        // real failure: Envoy does not retry it.)
        Some(r) if e.reused && attempts.resend_unsent() => Ok(Again::Resend(r)),
        Some(r) if can_retry => Ok(Again::Retry(r)),
        // The request went out: only a body we still hold whole can go again.
        None if can_retry
            && let (Some(head), Some(body)) =
                (head, retry_buf.as_ref().and_then(RetryBuffer::replay)) =>
        {
            Ok(Again::Retry(rebuild(head, body)))
        }
        _ if received.idle_timed_out() => Err(ProxyError::StreamIdleTimeout),
        // The client's body broke its framing mid-request: Envoy's codec answers that (400
        // `http1.codec_error`), not the upstream reset it caused.
        _ if received.failed() => Err(ProxyError::Codec {
            status: http::StatusCode::BAD_REQUEST,
            details: "http1.codec_error",
        }),
        _ => Err(upstream_error(e.failure, retrying, attempts)),
    }
}

/// The error a request ends with when its last attempt failed upstream: `URX` when the route
/// retries and the failure was retriable (its retries ran out), retried or not.
fn upstream_error(
    failure: crate::upstream::UpstreamFailure,
    retrying: bool,
    attempts: &Attempts,
) -> ProxyError {
    ProxyError::Upstream {
        retry_limit: failure.retriable() && retrying,
        retried: attempts.count > 1,
        failure,
    }
}

/// The attempts of one request against the route's retry budget. Every attempt counts,
/// whatever failed before it, except a resend of a request that never left: one that was
/// not sent on a pooled connection the upstream had just closed goes again on a fresh
/// connection without spending a retry, at most [`Attempts::FREE_RESENDS`] times per request.
#[derive(Debug)]
struct Attempts {
    /// Attempts started that count against the budget.
    count: u32,
    max: u32,
    free_resends: u32,
    /// The next attempt is a free resend.
    resend: bool,
    /// The cluster's DestinationRule, for its `maxRetries` circuit breaker.
    breaker: Option<std::sync::Arc<policy::traffic::TrafficPolicy>>,
    /// The retry in flight, counted against `maxRetries`.
    retry_slot: Option<policy::traffic::Slot>,
}

impl Attempts {
    const FREE_RESENDS: u32 = 2;

    fn new(max: u32, breaker: Option<std::sync::Arc<policy::traffic::TrafficPolicy>>) -> Attempts {
        Attempts {
            count: 0,
            max,
            free_resends: 0,
            resend: false,
            breaker,
            retry_slot: None,
        }
    }

    /// An attempt begins.
    fn start(&mut self) {
        if !std::mem::take(&mut self.resend) {
            self.count += 1;
        }
    }

    /// Another attempt fits in the budget, and in the cluster's `maxRetries` (Envoy's
    /// `max_retries` circuit breaker: over it, the retry is not made).
    fn may_retry(&mut self) -> bool {
        if self.count >= self.max {
            return false;
        }
        match &self.breaker {
            None => true,
            Some(t) => {
                self.retry_slot = None;
                self.retry_slot = t.retry_slot();
                self.retry_slot.is_some()
            }
        }
    }

    /// The last attempt's request never left: resend it for free if the allowance lasts.
    fn resend_unsent(&mut self) -> bool {
        if self.free_resends >= Self::FREE_RESENDS {
            return false;
        }
        self.free_resends += 1;
        self.resend = true;
        true
    }
}

/// Envoy's retry back-off before retry `n` (1-based): a random wait in
/// `[0, base * 2^(n-1))`, the window capped at 10 x base (`BACKOFF_MAX_FACTOR`). `false` when
/// the route timeout expires first.
async fn back_off(timers: &Timers<'_>, base: Option<std::time::Duration>, n: u32) -> bool {
    let base = base.unwrap_or_default();
    let cap = base * BACKOFF_MAX_FACTOR;
    let window = (base * 2u32.saturating_pow(n.saturating_sub(1))).min(cap);
    let ms = window.as_millis() as u64;
    let wait = std::time::Duration::from_millis(if ms == 0 {
        0
    } else {
        rand::random::<u64>() % ms
    });
    timers.run(tokio::time::sleep(wait), None).await.is_ok()
}

/// The route's and each try's timeouts, armed where Envoy's router arms them: once the whole
/// request has been read (router.cc `onRequestComplete`; a bodiless request at once), and
/// never before the call (or the try) started. A slow upload is therefore never cut by a
/// route timeout; a stalled one is bounded by the stream idle timeout instead.
struct Timers<'a> {
    received: &'a BodyProgress,
    started: Instant,
    /// The route's `timeouts.request`, else `--upstream-response-timeout`.
    global: Option<std::time::Duration>,
}

impl Timers<'_> {
    async fn expiry(&self, from: Instant, d: std::time::Duration) {
        let done = self.received.complete().await;
        tokio::time::sleep_until(done.max(from) + d).await;
    }

    /// Run `f` until the route timeout or, with `per_try` (the try's start and timeout), the
    /// try's: 504 `UT` with the details of whichever expired.
    async fn run<F: std::future::Future>(
        &self,
        f: F,
        per_try: Option<(Instant, std::time::Duration)>,
    ) -> Result<F::Output, ProxyError> {
        let global = async {
            match self.global {
                Some(d) => self.expiry(self.started, d).await,
                None => std::future::pending().await,
            }
        };
        let per_try = async {
            match per_try {
                Some((from, d)) => self.expiry(from, d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            r = f => Ok(r),
            () = per_try => Err(ProxyError::Timeout { per_try: true }),
            () = global => Err(ProxyError::Timeout { per_try: false }),
        }
    }
}

/// Istio's `retry_on` on a response: `retriable-status-codes` (the route's `codes`; none by
/// default since Istio 1.24) and, for gRPC, `unavailable` (14) and `cancelled` (1) in a
/// trailers-only response's headers.
fn retriable_response(resp: &Response<Incoming>, codes: &[u16]) -> bool {
    if codes.contains(&resp.status().as_u16()) {
        return true;
    }
    matches!(
        resp.headers().get(&GRPC_STATUS).map(|v| v.as_bytes()),
        Some(b"14") | Some(b"1")
    )
}

#[cfg(test)]
mod tests {
    use super::Attempts;

    /// The sequence of the bug this accounting fixes: a request not sent on a stale pooled
    /// connection is resent for free, then the endpoint refuses every connection. The old
    /// loop stopped counting after the free resend (a dying endpoint was retried every few
    /// milliseconds until the route deadline); every later attempt must count, so Istio's
    /// default budget (2 retries) ends after three counted attempts.
    #[test]
    fn every_attempt_after_a_free_resend_counts() {
        let mut a = Attempts::new(3, None);
        a.start(); // pooled connection: request came back unsent
        assert!(a.resend_unsent());
        let mut counted_failures = 0;
        loop {
            a.start(); // fresh connection: refused
            counted_failures += 1;
            assert!(counted_failures <= 3, "attempts never ran out: {a:?}");
            if !a.may_retry() {
                break;
            }
        }
        assert_eq!(a.count, 3);
        assert_eq!(counted_failures, 3);
    }

    #[test]
    fn free_resends_are_bounded() {
        let mut a = Attempts::new(1, None);
        a.start();
        assert!(a.resend_unsent());
        a.start();
        assert!(a.resend_unsent());
        a.start();
        assert!(
            !a.resend_unsent(),
            "a third free resend must not be granted"
        );
        assert_eq!(a.count, 1);
        assert!(!a.may_retry());
    }
}
