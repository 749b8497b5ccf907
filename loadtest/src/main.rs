//! The sluice load generator. A stub until the loadtest issue builds it; the benchmark today is
//! `../shared/bench/run.sh` (see the README).

fn main() {
    eprintln!("sluice-loadtest: not built yet; see README.md, \"Benchmarks\"");
    std::process::exit(2);
}
