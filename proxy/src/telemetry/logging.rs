//! Runtime control of the diagnostics filter (admin `/logging`, like Envoy's admin endpoint):
//! the binary installs a reloadable `EnvFilter` and registers its handle here.

use std::sync::{Mutex, OnceLock};

use tracing_subscriber::EnvFilter;
use tracing_subscriber::reload::Handle;

type FilterHandle = Handle<EnvFilter, tracing_subscriber::Registry>;

static HANDLE: OnceLock<(FilterHandle, Mutex<String>)> = OnceLock::new();

/// Install a stderr subscriber whose filter (initially `initial`) can be changed at runtime.
pub fn init(initial: &str, ansi: bool) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = EnvFilter::try_new(initial).unwrap_or_else(|_| EnvFilter::new("info"));
    let (layer, handle) = tracing_subscriber::reload::Layer::new(filter);
    let _ = tracing_subscriber::registry()
        .with(layer)
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(ansi)
                .with_writer(std::io::stderr),
        )
        .try_init();
    let _ = HANDLE.set((handle, Mutex::new(initial.to_string())));
}

/// The current filter directive, if runtime control is available.
pub fn current() -> Option<String> {
    HANDLE
        .get()
        .and_then(|(_, s)| s.lock().ok().map(|s| s.clone()))
}

/// Replace the filter (`info`, `debug`, `proxy=debug,hbone=trace`, ...).
pub fn set(directive: &str) -> Result<(), String> {
    let (handle, current) = HANDLE
        .get()
        .ok_or_else(|| "log level control is not available in this process".to_string())?;
    let filter =
        EnvFilter::try_new(directive).map_err(|e| format!("invalid filter {directive:?}: {e}"))?;
    handle.reload(filter).map_err(|e| e.to_string())?;
    if let Ok(mut c) = current.lock() {
        *c = directive.to_string();
    }
    Ok(())
}
