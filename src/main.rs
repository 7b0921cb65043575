//! The `kiln` binary: parse the command line, run one command, print any error once with its
//! whole cause chain, and pick the exit code.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    let result = cli::run();
    // Commands that install kiln::interrupt stop cleanly on SIGINT/SIGTERM: exit 128 + signal.
    if let Some(sig) = kiln::interrupt::received() {
        let name = kiln::interrupt::signal_name(sig);
        match result {
            Ok(()) => eprintln!("kiln: {name} arrived after every output was written; they are complete"),
            Err(_) => eprintln!(
                "kiln: stopped by {name}: nothing new was published (earlier outputs are untouched) and temporary files were removed"
            ),
        }
        return ExitCode::from(u8::try_from(128 + sig).unwrap_or(1));
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.downcast_ref::<cli::ExitWith>().is_some() => {
            ExitCode::from(err.downcast_ref::<cli::ExitWith>().map_or(1, |e| e.0))
        }
        Err(err) => {
            eprintln!("kiln: error: {}", kiln::message::render(err.chain()));
            ExitCode::from(1)
        }
    }
}
