//! Istio's standard metrics as a waypoint reports them ([`metrics`]) and diagnostics logging
//! ([`logging`]), distributed tracing ([`trace`]).
//! The access-log record itself belongs to the request path (`request::log`).

pub mod authz;
pub mod logging;
pub mod metrics;
pub mod trace;
