//! How long library work (evaluation, the classifier's training) reports progress without printing: the
//! caller passes a [`Progress`]; the command line draws progress bars with it, tests and embedding code pass
//! [`Silent`].

/// Receives the progress of long work. One phase at a time: `begin`, any number of `advance` / `grow`,
/// `end`.
pub trait Progress {
    /// A phase named `what` of `len` units (0 when not known yet: see `grow`).
    fn begin(&self, what: &str, len: u64);
    /// The phase has `n` more units than announced.
    fn grow(&self, n: u64);
    /// `n` units done, with an optional status (e.g. the loss).
    fn advance(&self, n: u64, status: Option<&str>);
    fn end(&self);
    /// A one-line note worth showing a user (e.g. that a cached model is being trained first).
    fn note(&self, msg: &str);
}

/// Reports nothing.
pub struct Silent;

impl Progress for Silent {
    fn begin(&self, _: &str, _: u64) {}
    fn grow(&self, _: u64) {}
    fn advance(&self, _: u64, _: Option<&str>) {}
    fn end(&self) {}
    fn note(&self, _: &str) {}
}
