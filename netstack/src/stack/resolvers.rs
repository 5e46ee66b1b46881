//! The threads that ask the host's resolver for the guest's DNS queries.
//!
//! They start with the stack, before any frame arrives, so each is confined as `dns` from the
//! start (`getaddrinfo` reads /etc and may load NSS modules) while the netstack thread itself
//! never starts a thread or opens a file.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use mio::Waker;

use super::{Resolved, Resolver};

/// How many lookups run at once; more wait their turn (and time out as SERVFAIL).
pub(super) const THREADS: usize = 8;

/// Where lookups run.
pub(super) enum Resolvers {
    /// On `THREADS` resolver threads.
    Pool(mpsc::Sender<(u64, String)>),
    /// On the stack's own thread: for fuzzing, whose resolver does not block.
    Inline,
}

impl Resolvers {
    /// Starts the resolver threads; each sends its answers to `answers` and wakes the stack.
    pub(super) fn start(
        resolver: &Resolver,
        answers: &mpsc::Sender<Resolved>,
        waker: &Arc<Waker>,
        in_flight: &Arc<AtomicU64>,
        seccomp: msb_confine::Seccomp,
    ) -> io::Result<Resolvers> {
        let (jobs, queue) = mpsc::channel::<(u64, String)>();
        let queue = Arc::new(Mutex::new(queue));
        for _ in 0..THREADS {
            let (queue, resolver, answers, waker, in_flight) = (
                queue.clone(),
                resolver.clone(),
                answers.clone(),
                waker.clone(),
                in_flight.clone(),
            );
            std::thread::Builder::new()
                .name("netstack-dns".into())
                .spawn(move || {
                    if let Err(e) = msb_confine::enter(msb_confine::ThreadKind::Dns, seccomp) {
                        tracing::error!("netstack resolver: {e}");
                        return;
                    }
                    loop {
                        let job = queue.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        let Ok((id, name)) = job else { return };
                        let r = resolver(&name);
                        in_flight.fetch_sub(1, Ordering::Relaxed);
                        let _ = answers.send((id, r));
                        let _ = waker.wake();
                    }
                })?;
        }
        Ok(Resolvers::Pool(jobs))
    }
}
