//! The per-cluster retry budget.

use std::sync::atomic::{AtomicU64, Ordering};

/// Keeps retries under `ratio` of requests: each request deposits `ratio` of a token, each
/// retry withdraws one. A small starting balance lets a quiet cluster still retry.
#[derive(Debug)]
pub struct RetryBudget {
    /// Milli-tokens.
    balance: AtomicU64,
    deposit: u64,
}

/// The starting balance: 10 retries.
const RETRY_BUDGET_FLOOR: u64 = 10_000;
/// Deposits stop at 100 retries' worth, so a long quiet spell does not bank a retry storm.
const RETRY_BUDGET_CAP: u64 = 100_000;

impl RetryBudget {
    pub fn new(ratio: f64) -> RetryBudget {
        RetryBudget {
            balance: AtomicU64::new(RETRY_BUDGET_FLOOR),
            deposit: (ratio * 1000.0) as u64,
        }
    }

    pub fn on_request(&self) {
        if self.deposit > 0 && self.balance.load(Ordering::Relaxed) < RETRY_BUDGET_CAP {
            self.balance.fetch_add(self.deposit, Ordering::Relaxed);
        }
    }

    /// Gives back a retry taken but not used.
    pub fn refund(&self) {
        self.balance.fetch_add(1000, Ordering::Relaxed);
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn try_withdraw(&self) -> bool {
        self.balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                b.checked_sub(1000)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_budget_runs_out_and_refills() {
        let budget = RetryBudget::new(0.5);
        let mut granted = 0;
        while budget.try_withdraw() {
            granted += 1;
        }
        assert_eq!(granted, 10);
        budget.on_request();
        budget.on_request();
        assert!(budget.try_withdraw());
        assert!(!budget.try_withdraw());
    }
}
