//! The fuzz targets' properties (fuzz/checks.rs) on stable, in every `.ci/run`: each target's
//! corpus (fuzz/corpus/TARGET: the seeds, and what `cargo fuzz` runs found) is replayed, then
//! mutations of it are tried for a bounded number of rounds. The long runs are cargo-fuzz's,
//! on nightly (docs/architecture.md, "Fuzzing").

#[path = "../fuzz/checks.rs"]
mod checks;

use std::path::Path;

/// Mutated inputs tried per target, on top of the corpus.
const ROUNDS: usize = 20_000;
/// Fewer for the listener: each input is a whole connection and a call after it.
const LISTENER_ROUNDS: usize = 10_000;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut inputs: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| std::fs::read(entry.unwrap().path()).unwrap())
        .collect();
    assert!(!inputs.is_empty(), "{} is empty", dir.display());
    inputs.sort();
    inputs
}

/// Bytes that mean something to one decoder or another.
const SPECIAL: &[u8] = b"\"{}[]:,;=\\$-\n 0aZ%";

/// One input made from the corpus: a byte changed, inserted or removed, a slice of another
/// input spliced in, or the input cut.
fn mutate(inputs: &[Vec<u8>], rng: &mut fastrand::Rng) -> Vec<u8> {
    let mut input = inputs[rng.usize(..inputs.len())].clone();
    for _ in 0..rng.usize(1..4) {
        let at = rng.usize(..=input.len());
        match rng.u8(..5) {
            0 if at < input.len() => input[at] = rng.u8(..),
            1 => input.insert(at, SPECIAL[rng.usize(..SPECIAL.len())]),
            2 if at < input.len() => {
                input.remove(at);
            }
            3 => {
                let other = &inputs[rng.usize(..inputs.len())];
                let from = rng.usize(..=other.len());
                let to = rng.usize(from..=other.len());
                input.splice(at..at, other[from..to].iter().copied());
            }
            _ => input.truncate(at),
        }
    }
    input
}

fn replay_and_mutate(target: &str, check: fn(&[u8])) {
    replay_and_mutate_rounds(target, check, ROUNDS);
}

fn replay_and_mutate_rounds(target: &str, check: fn(&[u8]), rounds: usize) {
    let inputs = corpus(target);
    for input in &inputs {
        check(input);
    }
    // Seeded: a failure here is the same failure on the next run.
    let mut rng = fastrand::Rng::with_seed(0x5111ce);
    for _ in 0..rounds {
        let input = mutate(&inputs, &mut rng);
        let result = std::panic::catch_unwind(|| check(&input));
        if let Err(panic) = result {
            let text = String::from_utf8_lossy(&input);
            eprintln!("{target}: this input broke a property: {input:?}\n{text}");
            std::panic::resume_unwind(panic);
        }
    }
}

#[test]
fn config() {
    replay_and_mutate("config", checks::config);
}

#[test]
fn etcd_value() {
    replay_and_mutate("etcd_value", checks::etcd_value);
}

#[test]
fn grpc_web() {
    replay_and_mutate("grpc_web", checks::grpc_web);
}

#[test]
fn grpc_timeout() {
    replay_and_mutate("grpc_timeout", checks::grpc_timeout);
}

#[test]
fn trace_ids() {
    replay_and_mutate("trace_ids", checks::trace_ids);
}

#[test]
fn xfcc() {
    replay_and_mutate("xfcc", checks::xfcc);
}

#[test]
fn listener() {
    replay_and_mutate_rounds("listener", checks::listener, LISTENER_ROUNDS);
}
