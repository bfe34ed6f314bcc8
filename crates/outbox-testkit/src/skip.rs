//! Tests that cannot run here say so: [`skipped`] prints one line naming the test, what is
//! missing and how to get it, and appends the same line to the file named by
//! `OUTBOX_TEST_SKIPS` (set by `scripts/test`, which prints the file after the run: nextest
//! shows only the output of failing tests, and a skip passes).

use std::io::Write;

/// Reports that `test` skipped (all of it, or the part named in `what`) and why.
pub fn skipped(test: &str, why: &str) {
    let line = format!("SKIPPED {test}: {why}");
    eprintln!("{line}");
    if let Some(path) = std::env::var_os("OUTBOX_TEST_SKIPS") {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path);
        // One write per line: appends of a short line from parallel tests do not interleave.
        if let Ok(mut f) = file {
            let _ = f.write_all(format!("{line}\n").as_bytes());
        }
    }
}
