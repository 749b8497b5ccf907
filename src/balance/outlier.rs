//! Passive outlier detection: a backend that fails `consecutive_failures` attempts in a row is
//! ejected for `base_ejection_time` × the number of its ejections (at most 5 minutes), then
//! comes back on probation. Never more than `max_ejection_percent` of a cluster is ejected,
//! and at least one backend always stays.
//!
//! What counts as a failure is the proxy's call (`proxy/outcome.rs`): connect failures,
//! resets and lost connections, server-side failure codes from the backend, and deadlines
//! that pass while the backend holds the call.

use tracing::{info, warn};

use super::ewma::clock_ms;
use super::{Backend, Cluster};
use crate::config::{OutlierDetection, OutlierSettings};
use crate::sync::lock;

impl Cluster {
    /// Counts how one attempt on `backend` ended, and ejects the backend when that makes too
    /// many failures in a row.
    pub fn attempt_ended(&self, backend: &Backend, failed: bool) {
        let OutlierDetection::On(settings) = self.settings.outlier_detection else {
            return;
        };
        let base_ms = settings.base_ejection_time.0.as_millis() as u64;
        if !failed {
            if backend.count_success(clock_ms(), base_ms) {
                info!(cluster = %self.name, backend = %backend.address,
                    "backend back from ejection: it answered again");
            }
            return;
        }
        let failures = backend.count_failure();
        if failures >= settings.consecutive_failures.0 {
            self.try_eject(backend, &settings, base_ms, failures);
        }
    }

    /// Ejects `backend` unless that would take out more than `max_ejection_percent` of the
    /// cluster, or its last usable backend. Scans the set: only when a streak is complete.
    fn try_eject(&self, backend: &Backend, settings: &OutlierSettings, base_ms: u64, streak: u32) {
        // One ejection decision at a time, so two backends failing together cannot both pass
        // the max_ejection_percent check.
        let _deciding = lock(&self.ejecting);
        let now = clock_ms();
        if backend.is_ejected(now) {
            return;
        }
        let set = self.backends();
        let total = set.backends.len();
        let ejected = set.backends.iter().filter(|b| b.is_ejected(now)).count();
        let percent = settings.max_ejection_percent.0 as usize;
        if (ejected + 1) * 100 > percent * total || ejected + 1 >= total {
            // Once per streak, not once per failed call.
            if streak == settings.consecutive_failures.0 {
                warn!(cluster = %self.name, backend = %backend.address, ejected, total,
                    "backend fails call after call but stays: ejecting it would pass max_ejection_percent or leave no backend");
            }
            return;
        }
        let length = backend.eject(now, base_ms);
        warn!(cluster = %self.name, backend = %backend.address,
            failures = settings.consecutive_failures.0, ejected_for_ms = length,
            "backend ejected: failures in a row");
    }
}
