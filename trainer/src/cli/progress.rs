//! Progress bars on the terminal for the library's [`Progress`] reports.

use std::cell::RefCell;

use indicatif::{ProgressBar, ProgressStyle};
use trainer::progress::Progress;

/// One bar per phase; notes are printed above it. Quiet: nothing at all.
pub struct Bars {
    quiet: bool,
    bar: RefCell<Option<ProgressBar>>,
}

impl Bars {
    pub fn new(quiet: bool) -> Self {
        Self { quiet, bar: RefCell::new(None) }
    }
}

impl Progress for Bars {
    fn begin(&self, what: &str, len: u64) {
        self.end();
        if self.quiet {
            return;
        }
        let pb = ProgressBar::new(len);
        pb.set_style(
            ProgressStyle::with_template("{prefix:>22} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta} {msg}")
                .unwrap()
                .progress_chars("=> "),
        );
        pb.set_prefix(what.to_string());
        *self.bar.borrow_mut() = Some(pb);
    }

    fn grow(&self, n: u64) {
        if let Some(pb) = self.bar.borrow().as_ref() {
            pb.inc_length(n);
        }
    }

    fn advance(&self, n: u64, status: Option<&str>) {
        if let Some(pb) = self.bar.borrow().as_ref() {
            pb.inc(n);
            if let Some(s) = status {
                pb.set_message(s.to_string());
            }
        }
    }

    fn end(&self) {
        if let Some(pb) = self.bar.borrow_mut().take() {
            pb.finish_and_clear();
        }
    }

    fn note(&self, msg: &str) {
        if self.quiet {
            return;
        }
        match self.bar.borrow().as_ref() {
            Some(pb) => pb.suspend(|| eprintln!("{msg}")),
            None => eprintln!("{msg}"),
        }
    }
}
