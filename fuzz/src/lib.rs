//! Fuzzing on stable Rust: one runner for every fuzz target's property, short in `cargo test`, as long as `THREADLINE_FUZZ_SECS` says otherwise.
//!
//! A target is a proptest property. By default it runs proptest's usual number of cases
//! (`PROPTEST_CASES`, 256 unless set), which is the short run CI does. With
//! `THREADLINE_FUZZ_SECS=<n>` every target keeps drawing fresh random cases, in rounds,
//! until `n` seconds have passed. Either way it prints one line to stderr,
//! `fuzz <name>: <cases> cases in <secs> s`, which is what docs/reliability.md records
//! (run with `--nocapture` to see it). A failing case, a panic included, fails the
//! test with proptest's shrunk input.

use std::fmt::Debug;
use std::time::{Duration, Instant};

pub use proptest;
use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};

/// The environment variable that turns every target into a timed run (seconds).
pub const ENV: &str = "THREADLINE_FUZZ_SECS";

/// The timed budget, when `THREADLINE_FUZZ_SECS` is set to a positive number.
pub fn budget() -> Option<Duration> {
    std::env::var(ENV)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|&s| s > 0)
        .map(Duration::from_secs)
}

/// Runs the property `test` over `strategy`: the default number of cases, or rounds of
/// fresh cases until the budget is spent. Panics (fails the test) on a failing case.
pub fn run<S>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S: Strategy,
    S::Value: Debug,
{
    run_with(name, Config::default(), strategy, test);
}

/// As [`run`], with a base config (for targets whose cases are slow: fewer per round).
pub fn run_with<S>(
    name: &str,
    config: Config,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S: Strategy,
    S::Value: Debug,
{
    let started = Instant::now();
    let budget = budget();
    let round = Config {
        failure_persistence: None,
        ..config
    };
    let mut cases: u64 = 0;
    loop {
        let mut runner = TestRunner::new(round.clone());
        match runner.run(&strategy, &test) {
            Ok(()) => cases += u64::from(round.cases),
            Err(TestError::Fail(reason, input)) => {
                panic!("fuzz {name}: {reason}; minimal failing input: {input:?}")
            }
            Err(TestError::Abort(reason)) => panic!("fuzz {name}: aborted: {reason}"),
        }
        match budget {
            Some(b) if started.elapsed() < b => continue,
            _ => break,
        }
    }
    eprintln!(
        "fuzz {name}: {cases} cases in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Arbitrary JSON (null, booleans, integers, floats, short strings, and arrays and
/// objects nesting them three deep), with object keys drawn half from `keys` (the
/// field names the code under test looks for) and half at random.
pub fn json_value(
    keys: &'static [&'static str],
) -> proptest::strategy::BoxedStrategy<serde_json::Value> {
    use proptest::prelude::*;
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::json!(f)),
        ".{0,16}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, move |inner| {
        let random = "[a-z_]{1,10}".boxed();
        let key = if keys.is_empty() {
            random
        } else {
            prop_oneof![
                proptest::sample::select(keys).prop_map(str::to_owned),
                random
            ]
            .boxed()
        };
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            proptest::collection::btree_map(key, inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
    .boxed()
}
