//! `sqlx::migrate!` embeds `migrations/` at compile time, but cargo does not notice a migration
//! file that is added: without this, a new migration would be missing from an incremental build
//! (sqlx's documented remedy).
fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}
