//! The `outbox-relay` binary: parses the command line and reports errors; the work is in the
//! library.

/// See the `mimalloc` entry of Cargo.toml for why.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    outbox_relay::cli::main()
}
