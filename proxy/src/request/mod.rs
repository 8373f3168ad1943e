//! The HTTP request path inside a tunnel: a short list of named phases over one
//! [`RequestCtx`] ([`run_phases`]), each phase a function in its own file. Ordering rules
//! live here and only here:
//!
//! 1. **accept** (`RequestCtx::new`): the access-log record starts, `x-request-id` is
//!    generated when absent (Envoy's UUID request-id extension; an incoming one is kept).
//! 2. **validate**: overload sheds with 503 `OM`; HTTP/1.0 is refused with 426 (Istio's
//!    default, protocol.md 2.6); heads over 60 KiB get 431; what Envoy's HTTP/1 codec refuses
//!    gets its answer ([`codec`]); the path is normalized as Istio's default `BASE` mode does
//!    before routing.
//! 3. **route**: the Service comes from the tunnel's CONNECT authority (never from `Host`,
//!    protocol.md 2.6); its HTTPRoutes pick a rule, or the implicit `default` route applies.
//!    No rule matches: 404 `NR` (answered in phase 5). An `Upgrade` other than `websocket` or
//!    `h2c` is refused here (403 `upgrade_failed`), before any filter, as Envoy's HCM does.
//!    Then **trace** (3b): Telemetry `tracing` decides whether the request is traced
//!    (`x-request-id` may get Envoy's trace reason), the headers carrying our span wait for
//!    phase 6, and a sampled request's span is finished with its log record.
//! 4. **authz**: the waypoint's security filters in istiod's order (protocol.md 2.8), each
//!    on the policies attached to this waypoint or Service, all before "no route" is
//!    answered (Envoy's HTTP filters run before its router):
//!    - 4a **ext_authz**: a matching CUSTOM AuthorizationPolicy calls its MeshConfig
//!      `envoyExtAuthzHttp` provider ([`crate::upstream::extauthz`]); denied: the authorizer's status
//!      and body, `UAEX`; unreachable: 403 `UAEX` unless `failOpen`; a provider that cannot
//!      be used: 403 `RBAC: access denied` as Istio's bad-CUSTOM deny rules.
//!    - 4b **jwt_authn**: RequestAuthentication (`policy::authn`, keys from
//!      [`crate::config::jwks`]); no token passes, a bad one gets 401 (403 for the audience) with
//!      Envoy's body and `www-authenticate`.
//!    - 4c **RBAC**: AUDIT, DENY, ALLOW on the tunnel's peer identity and the verified JWT
//!      (`request.auth.*`, `requestPrincipals`); denial: 403 `RBAC: access denied`.
//! 5. **backend**: a `RequestRedirect` rule answers here (Envoy route redirect); else a
//!    weighted backendRef is drawn; unresolvable: 500 `NC`; all weights zero: 500; no ready
//!    endpoint: 503 `UH`. A `DYNAMIC_DNS` cluster's endpoint is what the `Host` resolves to
//!    (5b, Envoy's dynamic forward proxy; 503 `DF` when it does not resolve).
//! 6. **upstream**: filters (backendRef then rule header modifiers, `URLRewrite`), mirrors
//!    (fire and forget), least-request endpoint, pooled connection, request headers rewritten
//!    as Envoy does; the route's retry policy (Istio's default: 2 retries on connect failure,
//!    refused stream, gRPC unavailable/cancelled, listed codes; other hosts preferred; bodies
//!    replayed only from the 64 KiB buffer), route and per-try timeouts (504 `UT`).
//! 7. **respond**: `ResponseHeaderModifier`s, `server: istio-envoy`,
//!    `x-envoy-upstream-service-time`; the body streams
//!    through and the log record is emitted when it ends (or the client leaves: `DC`).
//!
//! Any phase may short-circuit with a [`ProxyError`]; [`RequestCtx::local_reply`] is the one
//! place that turns it into a response.
//!
//! Files: `ctx` (1 and the local reply), `validate` (2), `route` (3), `authorize` (4),
//! `trace` (3b), `backend` (5), `forward` and `call` (6: the request as it goes upstream; the one function
//! that owns attempts, retries, timeouts and back-off), `respond` (7), `mirror`, `headers`;
//! beside them what a request carries: `conn` (its tunnel and inner connection), `body`
//! (response body, log at its end), `log` (the access-log record), `error` (failures ->
//! replies), `codec` (what Envoy's HTTP/1 codec refuses), `upgrade` (WebSockets).

pub mod body;
pub mod codec;
pub mod conn;
pub mod error;
pub mod grpc_messages;
pub mod log;
pub mod upgrade;

mod authorize;
mod backend;
mod call;
mod ctx;
mod forward;
mod headers;
mod mirror;
mod respond;
mod route;
mod trace;
mod validate;

use std::convert::Infallible;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;

use body::ResponseBody;
use conn::{InnerCounters, TunnelCtx};
pub use ctx::{RequestCtx, xff_client};
use error::ProxyError;
pub use forward::RETRY_BUFFER_LIMIT;
pub use headers::websocket_upgrade;

use crate::upstream::BodyProgress;

/// hyper service entry point for one request inside a tunnel.
pub async fn handle(
    t: Arc<TunnelCtx>,
    mut req: Request<Incoming>,
    conn: Arc<InnerCounters>,
) -> Result<Response<ResponseBody>, Infallible> {
    let received = Arc::new(BodyProgress::default());
    let ctx = RequestCtx::new(&t, &mut req, received.clone());
    match run_phases(&t, ctx, req, received, conn).await {
        Ok(resp) => Ok(resp),
        Err((ctx, err)) => Ok(ctx.local_reply(err)),
    }
}

/// A phase either produces the response or hands the ctx back with the error.
type PhaseResult = Result<Response<ResponseBody>, (RequestCtx, ProxyError)>;

/// The request path, phase by phase (see the module docs).
async fn run_phases(
    t: &TunnelCtx,
    mut ctx: RequestCtx,
    mut req: Request<Incoming>,
    received: Arc<BodyProgress>,
    conn: Arc<InnerCounters>,
) -> PhaseResult {
    // A phase's error ends the request with the context, for the one local reply.
    macro_rules! phase {
        ($e:expr) => {
            match $e {
                Ok(v) => v,
                Err(e) => return Err((ctx, e)),
            }
        };
    }
    phase!(validate::admit(&mut ctx));
    let normalized = phase!(validate::validate(&mut ctx, &mut req, &conn));
    // One snapshot per request.
    let snapshot = ctx.shared.snapshot.load_full();
    let service = route::service_of(&mut ctx, t, &snapshot, &req);
    let routed = route::route(&mut ctx, &service, &req, &normalized);
    trace::start(&mut ctx, t, &service, &routed, &mut req);
    phase!(route::check_upgrade(&mut ctx, &req, &conn));
    let held = if !service.authz.is_empty() || !service.authn.is_empty() {
        let authorized = authorize::authorize(
            &mut ctx,
            t,
            &mut req,
            &received,
            &normalized,
            &service,
            &snapshot,
        );
        phase!(authorized.await)
    } else {
        None
    };
    let target = phase!(backend::backend(&mut ctx, t, &req, &normalized, routed));
    let target = if target.cluster.dynamic_dns.is_some() {
        phase!(backend::resolve_host(&ctx, target, &req).await)
    } else {
        target
    };
    let outbound = forward::forward(&ctx, req, held, &target, &normalized, &received);
    let answer = phase!(call::call(&mut ctx, outbound, &target, &received).await);
    Ok(respond::respond(ctx, answer, &target))
}
