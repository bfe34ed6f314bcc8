//! The `outbox-relay` binary: parses the command line and reports errors; the work is in the
//! library.

/// jemalloc: see the `tikv-jemallocator` entry of Cargo.toml and [`JEMALLOC_CONF`].
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once when it starts (its `malloc_conf`, built into the binary so
/// that no deployment has to set `MALLOC_CONF`): memory freed by the relay goes back to the
/// system within a second, by a background thread rather than on the relay's own threads, and
/// two arenas serve its few busy threads (the default, four per core, holds memory in each).
#[export_name = "_rjem_malloc_conf"]
pub static JEMALLOC_CONF: &[u8] =
    b"background_thread:true,narenas:2,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

fn main() -> std::process::ExitCode {
    outbox_relay::cli::main()
}
