//! The admin's routes, relative to its prefix, behind its authentication.

use std::sync::Arc;

use axum::Router;

use super::state::AdminState;
use super::{api, auth, pages};

pub fn router(state: Arc<AdminState>) -> Router {
    api::routes()
        .merge(pages::routes())
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state.accounts),
            auth::authenticate,
        ))
        .with_state(state)
}
