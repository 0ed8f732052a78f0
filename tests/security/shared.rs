//! Deployments shared by the tests of one table: each case is a test of its own (so a
//! failure names its case, and the others still run), while the worker, the registry and
//! the keys they need start once per test binary.
//!
//! A deployment lives in a `static`, which is never dropped: its processes are started on a
//! thread of their own that lives as long as the process, through `setpriv --pdeathsig KILL`
//! (`Stack::spawn_shared_worker`, `TestRegistry::start_shared`), so they die with the test
//! process however it ends. Its NATS streams are removed by the next run
//! (`Stack::remove_stale`). Cases share it: each uses request ids, and where it counts
//! (quota, replay records) tenants, of its own.

use std::future::Future;
use std::sync::OnceLock;

/// The value in `cell`, built by `build` on the first call (concurrent callers wait for it).
/// `build` runs on a thread that then parks for the rest of the process, on a runtime of
/// its own that is dropped once it returns (so the value must hold no NATS client).
pub fn once<T, F, Fut>(cell: &'static OnceLock<T>, build: F) -> &'static T
where
    T: Send + Sync + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
{
    cell.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("shared-deployment".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap();
                let value = runtime.block_on(build());
                drop(runtime);
                let _ = tx.send(value);
                // The processes started above get SIGKILL when this thread ends.
                loop {
                    std::thread::park();
                }
            })
            .unwrap();
        rx.recv()
            .expect("the shared deployment was not built: see the panic above")
    })
}
