//! `decodebench`: parse flags, set up logging, run the subcommand.

use clap::Parser;
use std::io::IsTerminal;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = match decodebench::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and --version print and succeed; anything else is a command-line error, with
            // its own exit code (not clap's 2, which `run` uses for an incomplete run).
            let code = if e.use_stderr() {
                decodebench::cli::usage_error_code(std::env::args_os().skip(1))
            } else {
                0
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let (filter, bad_filter) = match tracing_subscriber::EnvFilter::try_new(&cli.log) {
        Ok(f) => (f, None),
        Err(e) => (tracing_subscriber::EnvFilter::new("info"), Some(e)),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: a log redirected to a file gets no escape codes.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if let Some(e) = bad_filter {
        tracing::warn!(
            filter = %cli.log,
            "--log / DECODEBENCH_LOG is not a valid filter ({e}); logging at `info`. \
             Examples: `debug`, `decodebench=debug,info`"
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(decodebench::commands::execute(cli)) {
        Ok(code) => code,
        Err(e) if decodebench::commands::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", decodebench::commands::error_report(&e));
            ExitCode::FAILURE
        }
    }
}
