//! Operating the waypoint: the readiness, metrics and admin listeners ([`admin`]), and the
//! renderers of `waypoint explain` / `waypoint services` (also behind admin `/services`)
//! ([`inspect`]).

pub mod admin;
pub mod inspect;
