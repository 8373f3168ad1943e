//! The control plane's own thread: `--kube` watches (kube-rs decoding every watch event),
//! endpoint refreshes and compiles run on a tokio runtime of their own, on a thread (and
//! blocking threads) at a lower CPU priority than the workers, so a burst of Kubernetes
//! events never sits in front of requests on a worker. Envoy does the same split: xDS is
//! handled on its main thread, requests on its workers.
//!
//! Why a lower priority and not only another thread: the waypoint is often given one CPU
//! (benches/kube.sh pins it), and two equal threads on one CPU take turns in slices of
//! milliseconds; at nice [`NICE`] the kernel lets a worker that wakes up preempt the control
//! thread, while the control thread still gets a share of a CPU kept busy by requests
//! (about 10% against one worker at nice 0), so a policy change under full load still
//! applies within a bounded time.

use std::future::Future;
use std::sync::OnceLock;

use tokio::task::JoinHandle;

/// The control threads' nice value.
pub const NICE: i32 = 10;

static HANDLE: OnceLock<tokio::runtime::Handle> = OnceLock::new();

/// The control runtime, started on first use (a thread named `control`, and the runtime's
/// blocking threads, all at [`NICE`]).
fn handle() -> &'static tokio::runtime::Handle {
    HANDLE.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("control-blocking")
            .on_thread_start(lower_priority)
            .build()
            .expect("the control runtime starts (it only needs a thread and timers)");
        let handle = rt.handle().clone();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                lower_priority();
                // Runs the control tasks for the life of the process.
                rt.block_on(std::future::pending::<()>());
            })
            .expect("the control thread starts");
        handle
    })
}

/// Run `fut` on the control runtime; the handle may be awaited or aborted from anywhere.
pub fn spawn<F>(fut: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    handle().spawn(fut)
}

/// Lower the calling thread's priority to [`NICE`] (on Linux a thread's nice value is its
/// own). Best effort: a failure leaves the thread at the process's priority.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: setpriority(2) takes plain integers and touches no memory of ours;
        // `who = 0` with PRIO_PROCESS is the calling thread on Linux.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, NICE) };
        if rc != 0 {
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                "could not lower the control thread's priority"
            );
        }
    }
}
