//! Drain: a trigger and cloneable watchers (ztunnel src/drain.rs). Listeners stop accepting,
//! HBONE connections send GOAWAY and let streams in flight finish, then the process exits.

use tokio::sync::watch;

/// Starts the drain. Dropping it also starts the drain.
#[derive(Debug)]
pub struct DrainTrigger(watch::Sender<bool>);

/// Observes the drain; cheap to clone.
#[derive(Debug, Clone)]
pub struct DrainWatcher(watch::Receiver<bool>);

/// A new trigger/watcher pair.
pub fn channel() -> (DrainTrigger, DrainWatcher) {
    let (tx, rx) = watch::channel(false);
    (DrainTrigger(tx), DrainWatcher(rx))
}

impl DrainTrigger {
    /// Begin draining: every watcher's [`DrainWatcher::signaled`] completes.
    pub fn start(&self) {
        let _ = self.0.send(true);
    }

    /// How many watchers are still alive (connections and listeners holding one).
    pub fn watchers(&self) -> usize {
        self.0.receiver_count()
    }

    /// Wait until every watcher is dropped (all connections finished).
    pub async fn closed(&self) {
        self.0.closed().await
    }
}

impl DrainWatcher {
    /// Completes once draining has started (or the trigger is gone).
    pub async fn signaled(&mut self) {
        let _ = self.0.wait_for(|d| *d).await;
    }

    pub fn is_draining(&self) -> bool {
        *self.0.borrow()
    }
}
