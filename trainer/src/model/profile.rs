//! Where a step's time goes: wall time per part (each op kind's forward and backward on the tape, and the
//! training step's other stages), collected only while switched on (`trainer bench --profile`). Off, a part
//! costs one relaxed atomic load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ON: AtomicBool = AtomicBool::new(false);
static PARTS: Mutex<Option<HashMap<String, Part>>> = Mutex::new(None);

/// The time spent in one part and how often it ran.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Part {
    pub seconds: f64,
    pub calls: u64,
}

/// Switches collection on or off (and clears what was collected).
pub fn enable(on: bool) {
    *PARTS.lock().unwrap_or_else(|e| e.into_inner()) = None;
    ON.store(on, Ordering::Relaxed);
}

pub fn is_on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Adds `elapsed` to part `name`.
pub fn add(name: &str, elapsed: Duration) {
    let mut parts = PARTS.lock().unwrap_or_else(|e| e.into_inner());
    let p = parts.get_or_insert_with(HashMap::new).entry(name.to_string()).or_default();
    p.seconds += elapsed.as_secs_f64();
    p.calls += 1;
}

/// Runs `f`, its wall time counted to part `name` while collection is on.
pub fn timed<R>(name: &str, f: impl FnOnce() -> R) -> R {
    if !is_on() {
        return f();
    }
    let start = Instant::now();
    let r = f();
    add(name, start.elapsed());
    r
}

/// What was collected since the last call (or `enable`), largest first; collection goes on.
pub fn take() -> Vec<(String, Part)> {
    let parts = PARTS.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_default();
    let mut v: Vec<(String, Part)> = parts.into_iter().collect();
    v.sort_by(|a, b| b.1.seconds.total_cmp(&a.1.seconds));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_counted_only_while_on() {
        // other tests may run tape ops meanwhile: look only at this test's own parts
        let find = |parts: &[(String, Part)], name: &str| parts.iter().find(|(n, _)| n == name).map(|p| p.1);
        enable(false);
        timed("profile-test-off", || ());
        assert_eq!(find(&take(), "profile-test-off"), None);
        enable(true);
        timed("profile-test-a", || std::thread::sleep(Duration::from_millis(2)));
        timed("profile-test-a", || ());
        let parts = take();
        enable(false);
        let a = find(&parts, "profile-test-a").unwrap();
        assert!(a.calls == 2 && a.seconds >= 0.002, "{a:?}");
        assert_eq!(find(&take(), "profile-test-a"), None);
    }
}
