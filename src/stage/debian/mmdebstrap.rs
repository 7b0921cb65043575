//! Running mmdebstrap so that it stops with kiln, and what an error repeats of its output.

use std::io::{BufRead, BufReader};
use std::process::Command;

/// Runs mmdebstrap (`cmd`, its stderr piped) to the end, handing each line of its output to
/// `on_line` as it comes; returns its exit status and the whole output for the log. A stop
/// request (Ctrl-C, SIGTERM) stops it too, and so does kiln's death without a chance to stop it
/// (SIGKILL): an orphan would go on writing a partial tarball that the next build, its lock
/// gone with this process, writes afresh.
pub fn run_mmdebstrap(
    cmd: &mut Command,
    mut on_line: impl FnMut(&str),
) -> std::io::Result<(std::process::ExitStatus, String)> {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let stop_with_us = crate::interrupt::Child::register(child.id());
    let mut log_text = String::new();
    if let Some(err) = child.stderr.take() {
        for line in BufReader::new(err).lines() {
            let line = line.unwrap_or_default();
            on_line(&line);
            log_text.push_str(&line);
            log_text.push('\n');
        }
    }
    let status = child.wait();
    drop(stop_with_us);
    Ok((status?, log_text))
}

/// The last `n` of `lines`, joined: what an error repeats of a tool's output.
pub fn tail<'a>(lines: impl DoubleEndedIterator<Item = &'a str>, n: usize) -> String {
    let mut v: Vec<&str> = lines.rev().take(n).collect();
    v.reverse();
    v.join("\n")
}
