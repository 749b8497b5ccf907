//! Power of two random choices: draw two distinct backends, keep the cheaper. O(1), and it
//! avoids the herd a global "least loaded" pick causes when many calls decide at once.

use std::sync::Arc;

use super::Backend;

pub(super) fn pick(backends: &[Arc<Backend>], cost: impl Fn(&Backend) -> f64) -> Option<usize> {
    match backends.len() {
        0 => None,
        1 => Some(0),
        n => {
            let a = fastrand::usize(..n);
            // A second draw from the other n-1, so the two are always distinct.
            let b = (a + 1 + fastrand::usize(..n - 1)) % n;
            Some(if cost(&backends[b]) < cost(&backends[a]) {
                b
            } else {
                a
            })
        }
    }
}
