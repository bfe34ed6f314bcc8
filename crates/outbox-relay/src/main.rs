//! The `outbox-relay` binary: parses the command line and reports errors; the work is in the
//! library.

fn main() -> std::process::ExitCode {
    outbox_relay::cli::main()
}
