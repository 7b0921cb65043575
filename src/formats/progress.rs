//! Progress reporting as a small trait, so libraries report without knowing about terminals.
//! The binary implements it with indicatif bars on a terminal and plain log lines otherwise.

/// What a progress count measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Bytes,
    Items,
}

/// Receives progress from long-running work. Every method has a do-nothing default.
pub trait Progress: Send + Sync {
    /// A new phase starts; `total` is known for bars and unknown for spinners.
    fn begin(&self, phase: &str, total: Option<u64>, unit: Unit) {
        let _ = (phase, total, unit);
    }
    /// `n` more units of the current phase are done.
    fn advance(&self, n: u64) {
        let _ = n;
    }
    /// The current phase is done; `summary` is a short human result ("1.2 GiB in 3.1 s").
    fn end(&self, summary: &str) {
        let _ = summary;
    }
    /// A line of information that should survive the bars (a warning, a note).
    fn note(&self, line: &str) {
        let _ = line;
    }
}

/// Reports nothing.
pub struct Silent;
impl Progress for Silent {}
