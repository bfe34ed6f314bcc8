//! The admin (docs/admin.md): the JSON API that its pages, scripts and the CLI's actions share,
//! mounted on the relay's HTTP server under `admin.path_prefix` when `admin.enabled`.
//!
//! - [`auth`]: the accounts of `[[admin.users]]` (basic auth for people, bearer tokens for
//!   scripts), the `read` and `admin` roles, CSRF protection of every action.
//! - [`api`]: the endpoints.
//! - [`pages`]: the HTML pages (overview, messages, dead letters, keys, audit).
//! - [`lag`]: the in-memory lag history behind the overview's chart.
//! - [`state`]: what the handlers share; [`routes`]: how they are mounted.
//!
//! The admin reads and acts through the relay's pool once the relay is connected (before that
//! its endpoints answer 503 "starting"), with the same statements as the CLI
//! ([`crate::store::admin`], [`crate::store::dead`], [`crate::store::keys`]).

pub mod api;
pub mod auth;
pub mod lag;
pub mod pages;
pub mod routes;
pub mod state;

pub use routes::router;
pub use state::AdminState;
