//! Test-only pause points, so that a test can kill the process at an exact moment.
//!
//! `ES2_FAILPOINT=NAME[:DETAIL][@K]` makes the process print
//! `es2-wgpu: failpoint NAME:DETAIL reached` on stderr the K-th time (default: the first) it
//! reaches point NAME with that detail (default: any), then wait there forever for the test
//! to SIGKILL it. Unset, as it always is outside tests, a point does nothing. The points:
//!
//! - `step:N`: training step N is done and its metrics line written;
//! - `write-file:FILE`: file FILE, written through [`crate::io::atomic_write`], is complete in
//!   its temporary sibling and not yet renamed into place;
//! - `write-safetensors:FILE`: the same for [`crate::io::write_safetensors`];
//! - `swap-dir:DIR`: [`crate::io::atomic_dir`] has moved the old folder DIR aside and not yet
//!   moved the new one into place.
//!
//! Two points change what the run does instead of pausing it ([`fires`]), so that a test can
//! check the run's answer:
//!
//! - `nonfinite-gradient:N`: optimizer step N sees a NaN gradient norm, as if a gradient had
//!   overflowed;
//! - `device-fault:N`: optimizer step N also records work on a buffer past the adapter's
//!   largest, which the device reports as a validation error.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// The environment variable that arms a point.
pub const ENV: &str = "ES2_FAILPOINT";

struct Armed {
    name: String,
    detail: Option<String>,
    hit: usize,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var(ENV).ok()?;
            let (point, hit) = match spec.rsplit_once('@') {
                Some((point, k)) => (point.to_owned(), k.parse().ok()?),
                None => (spec, 1),
            };
            let (name, detail) = match point.split_once(':') {
                Some((name, detail)) => (name.to_owned(), Some(detail.to_owned())),
                None => (point, None),
            };
            Some(Armed { name, detail, hit })
        })
        .as_ref()
}

/// Whether this pass of point `name` with `detail` is the armed hit.
pub fn fires(name: &str, detail: &str) -> bool {
    static HITS: AtomicUsize = AtomicUsize::new(0);
    let Some(armed) = armed() else { return false };
    if armed.name != name || armed.detail.as_deref().is_some_and(|d| d != detail) {
        return false;
    }
    HITS.fetch_add(1, Ordering::SeqCst) + 1 == armed.hit
}

/// Marks point `name` with `detail`; pauses the process forever at the armed hit.
pub fn hit(name: &str, detail: &str) {
    if fires(name, detail) {
        eprintln!("es2-wgpu: failpoint {name}:{detail} reached");
        loop {
            std::thread::park();
        }
    }
}

/// [`hit`] with the file name of `path` as the detail.
pub fn hit_path(name: &str, path: &Path) {
    if armed().is_some() {
        let file = path.file_name().unwrap_or_default().to_string_lossy();
        hit(name, &file);
    }
}
