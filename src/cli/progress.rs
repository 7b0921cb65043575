//! The binary's [`Progress`]: indicatif bars and spinners on a terminal, plain log lines
//! (one per phase, with its summary) when stderr is not a terminal or `--quiet`/`--json` asks.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kiln::progress::{Progress, Unit};

pub struct TermProgress {
    bars: bool,
    quiet: bool,
    state: Mutex<State>,
}

struct State {
    bar: Option<ProgressBar>,
    phase: String,
    started: Instant,
}

impl TermProgress {
    /// Bars when stderr is a terminal (and `NO_PROGRESS` is unset); plain lines otherwise.
    /// `quiet` keeps only notes (warnings).
    pub fn new(quiet: bool) -> Self {
        let bars = !quiet && std::io::stderr().is_terminal() && std::env::var_os("NO_PROGRESS").is_none();
        TermProgress {
            bars,
            quiet,
            state: Mutex::new(State { bar: None, phase: String::new(), started: Instant::now() }),
        }
    }
}

fn style(total: Option<u64>, unit: Unit) -> ProgressStyle {
    let t = match (total, unit) {
        (Some(_), Unit::Bytes) => {
            "{spinner} {msg:<12} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}"
        }
        (Some(_), Unit::Items) => "{spinner} {msg:<12} [{bar:30}] {pos}/{len} {per_sec} eta {eta}",
        (None, Unit::Bytes) => "{spinner} {msg:<12} {bytes} {binary_bytes_per_sec} {elapsed}",
        (None, Unit::Items) => "{spinner} {msg:<12} {pos} {elapsed}",
    };
    ProgressStyle::with_template(t).expect("valid template").progress_chars("=> ")
}

impl Progress for TermProgress {
    fn begin(&self, phase: &str, total: Option<u64>, unit: Unit) {
        let mut s = self.state.lock().unwrap();
        if let Some(b) = s.bar.take() {
            b.finish_and_clear();
        }
        s.phase = phase.to_string();
        s.started = Instant::now();
        if self.bars {
            let bar = match total {
                Some(n) => ProgressBar::with_draw_target(Some(n), ProgressDrawTarget::stderr()),
                None => ProgressBar::new_spinner(),
            };
            bar.set_style(style(total, unit));
            bar.set_message(phase.to_string());
            bar.enable_steady_tick(Duration::from_millis(120));
            s.bar = Some(bar);
        } else if !self.quiet {
            eprintln!("kiln: {phase}...");
        }
    }

    fn advance(&self, n: u64) {
        if let Some(b) = &self.state.lock().unwrap().bar {
            b.inc(n);
        }
    }

    fn end(&self, summary: &str) {
        let mut s = self.state.lock().unwrap();
        let secs = s.started.elapsed().as_secs_f64();
        if let Some(b) = s.bar.take() {
            b.finish_and_clear();
        }
        if !self.quiet {
            eprintln!("kiln: {}: {summary} ({secs:.1} s)", s.phase);
        }
    }

    fn note(&self, line: &str) {
        let s = self.state.lock().unwrap();
        match &s.bar {
            Some(b) => b.suspend(|| eprintln!("kiln: {line}")),
            None => eprintln!("kiln: {line}"),
        }
    }
}
