//! Least request, as Envoy does it: power of two choices over in-flight streams per weight,
//! ignoring latency.

use super::Backend;

pub(super) fn cost(backend: &Backend) -> f64 {
    (backend.in_flight() as f64 + 1.0) / backend.weight() as f64
}
