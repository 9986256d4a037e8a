//! Fault injection at the soft backend's device boundary.
//!
//! A hardware module fails in ways the software keystore never does: the
//! token is pulled, the serial line drops, the device answers garbage. To
//! rehearse those failures end to end, every [`SoftHsm`](super::SoftHsm)
//! operation that would touch a device first passes through
//! `FaultInjector::check`. When a fault is armed the operation fails with
//! an I/O error (EIO) on the keystore, and the module reports
//! [`Status::NotReady`](crate::Status::NotReady), exactly as a backend with
//! a dead device would. Disarming it lets the module recover without a
//! restart.
//!
//! Faults are armed from code ([`FaultInjector::fail_next`],
//! [`FaultInjector::fail_all`]) or, for drills on a running service, by the
//! existence of a file named in [`FAULT_FILE_ENV`]. Nothing is armed unless
//! one of those is used; the cost is then one atomic load per operation.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::Error;

/// Environment variable naming a file whose existence makes every
/// operation fail (`touch` it to pull the "device", remove it to put the
/// device back).
pub const FAULT_FILE_ENV: &str = "OTP_SOFTHSM_FAULT_FILE";

/// EIO, the errno of a failing device read on Linux.
const EIO: i32 = 5;

/// `remaining` value meaning "fail until cleared".
const ALWAYS: u64 = u64::MAX;

/// A switch shared between a module and whoever injects its faults.
#[derive(Clone, Debug, Default)]
pub struct FaultInjector {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Operations still to fail: 0 = none, [`ALWAYS`] = all.
    remaining: AtomicU64,
    /// Operations failed so far.
    injected: AtomicU64,
    /// Fail while this file exists.
    file: Option<PathBuf>,
}

impl FaultInjector {
    /// An injector armed by the file named in [`FAULT_FILE_ENV`], if set.
    #[must_use]
    pub fn from_env() -> Self {
        match std::env::var_os(FAULT_FILE_ENV) {
            Some(p) if !p.is_empty() => {
                let file = PathBuf::from(p);
                tracing::warn!(file = %file.display(), "fault injection enabled: the security module fails while this file exists");
                Self { inner: Arc::new(Inner { file: Some(file), ..Inner::default() }) }
            }
            _ => Self::default(),
        }
    }

    /// Fail the next `n` operations.
    pub fn fail_next(&self, n: u64) {
        self.inner.remaining.store(n.min(ALWAYS - 1), Ordering::SeqCst);
    }

    /// Fail every operation until [`FaultInjector::clear`].
    pub fn fail_all(&self) {
        self.inner.remaining.store(ALWAYS, Ordering::SeqCst);
    }

    /// Stop failing (a fault file, if any, still counts).
    pub fn clear(&self) {
        self.inner.remaining.store(0, Ordering::SeqCst);
    }

    /// How many operations have been failed.
    #[must_use]
    pub fn injected(&self) -> u64 {
        self.inner.injected.load(Ordering::Relaxed)
    }

    /// Is a fault armed right now? Does not consume a counted fault.
    #[must_use]
    pub fn armed(&self) -> bool {
        self.inner.remaining.load(Ordering::SeqCst) != 0 || self.file_present()
    }

    fn file_present(&self) -> bool {
        self.inner.file.as_deref().is_some_and(Path::exists)
    }

    /// Called before each device operation: an I/O error on `path` when a
    /// fault is armed.
    pub(crate) fn check(&self, path: &Path) -> Result<(), Error> {
        let take = self.inner.remaining.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
            0 => None,
            ALWAYS => Some(ALWAYS),
            n => Some(n - 1),
        });
        if take.is_ok() || self.file_present() {
            self.inner.injected.fetch_add(1, Ordering::Relaxed);
            return Err(Error::io(path, std::io::Error::from_raw_os_error(EIO)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_faults_run_out_and_persistent_ones_do_not() {
        let f = FaultInjector::default();
        let p = Path::new("ks");
        assert!(f.check(p).is_ok());
        f.fail_next(2);
        assert!(f.armed());
        assert!(f.check(p).is_err());
        assert!(f.check(p).is_err());
        assert!(f.check(p).is_ok());
        assert!(!f.armed());
        f.fail_all();
        for _ in 0..10 {
            assert!(f.check(p).unwrap_err().is_backend_failure());
        }
        f.clear();
        assert!(f.check(p).is_ok());
        assert_eq!(f.injected(), 12);
    }

    #[test]
    fn a_fault_file_fails_operations_while_it_exists() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pull-the-device");
        let f = FaultInjector { inner: Arc::new(Inner { file: Some(file.clone()), ..Inner::default() }) };
        assert!(f.check(&file).is_ok());
        std::fs::write(&file, b"").unwrap();
        assert!(f.armed());
        let e = f.check(&file).unwrap_err();
        assert!(e.to_string().contains("Input/output error"), "{e}");
        std::fs::remove_file(&file).unwrap();
        assert!(f.check(&file).is_ok());
    }
}
