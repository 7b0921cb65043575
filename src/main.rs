//! The `kiln` binary: parse the command line, run one command, print any error once with its
//! whole cause chain, and pick the exit code.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    match cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("kiln: error: {}", kiln::message::render(err.chain()));
            ExitCode::from(1)
        }
    }
}
