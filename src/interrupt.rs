//! SIGINT and SIGTERM as a request to stop cleanly, for the commands that write outputs.
//!
//! [`install`] blocks both signals in every thread and waits for them on one of its own. A
//! signal sets a flag and stops the child processes registered with [`Child`] (mmdebstrap
//! would otherwise stage on alone after a job runner's SIGTERM). Long work polls [`check`]
//! and returns an error, so temporary files are removed by the code that owns them, as on
//! any other failure; the binary then exits 128 + the signal number (130, 143). A second
//! signal ends the process at once.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;

static SIGNAL: AtomicI32 = AtomicI32::new(0);
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// The request to stop, as an error that long work returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("interrupted by {}", signal_name(*.0))]
pub struct Interrupted(pub i32);

pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

/// Turns SIGINT and SIGTERM into a flag for the rest of the process. Call it before any
/// other thread starts: threads inherit the blocked mask (child processes do not: the
/// standard library resets it when it spawns one).
pub fn install() -> std::io::Result<()> {
    // SAFETY: sigset_t is plain data initialised by sigemptyset; the calls only read it.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        set
    };
    std::thread::Builder::new().name("signals".into()).spawn(move || loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` lives in this closure; sigwait writes the signal number to `sig`.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            continue;
        }
        if SIGNAL.swap(sig, Ordering::SeqCst) != 0 {
            // Asked twice: stop now.
            std::process::exit(128 + sig);
        }
        for &pid in CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            // SAFETY: sending a signal has no memory effects; a pid that already exited
            // (and has not been reaped, as Child guarantees) is harmless to signal.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
    })?;
    Ok(())
}

/// The signal received, if any.
pub fn received() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Err once a stop was requested.
pub fn check() -> Result<(), Interrupted> {
    received().map_or(Ok(()), |s| Err(Interrupted(s)))
}

/// A child process that a stop request also stops, until dropped: drop it as soon as `wait`
/// returns, so a reaped pid is not signalled after the kernel reuses it.
pub struct Child(u32);

impl Child {
    pub fn register(pid: u32) -> Child {
        CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).push(pid);
        // A stop requested just before registering still reaches it.
        if received().is_some() {
            // SAFETY: as above.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
        Child(pid)
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).retain(|&p| p != self.0);
    }
}
