//! Who may use the admin, and what.
//!
//! Every request names an account of `[[admin.users]]`: people with HTTP basic auth (the browser
//! asks once and resends it), scripts with `Authorization: Bearer <token>`. Passwords and tokens
//! are compared in constant time; nothing of them is logged. The `read` role may load every
//! page and query; actions (every `POST`) need the `admin` role.
//!
//! CSRF: a browser resends basic-auth credentials on its own, so a page of another site could
//! make it post to the admin. Every action authenticated by a password must therefore carry the
//! account's CSRF token in the `X-CSRF-Token` header, which the admin's pages embed and another
//! site cannot read. The token is an HMAC of the account name keyed by a hash of its password:
//! the same on every relay of a deployment (a page served by one relay may post to another
//! behind the same load balancer) and changed with the password. A bearer token is never sent
//! by a browser on its own, so requests that carry one need no CSRF token.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{AdminRole, AdminUser};
use crate::store::admin::Actor;

/// The header an action authenticated by a password must carry.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The accounts, with their secrets hashed for comparison.
pub struct Accounts {
    users: Vec<Account>,
}

struct Account {
    name: String,
    role: AdminRole,
    password: Option<[u8; 32]>,
    token: Option<[u8; 32]>,
    csrf: Option<String>,
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// The CSRF token of an account whose password hashes to `password`.
fn csrf_token(name: &str, password: &[u8; 32]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(password).expect("HMAC takes any key");
    mac.update(b"outbox-relay admin csrf\0");
    mac.update(name.as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Who made a request, as the handlers see it.
#[derive(Debug, Clone)]
pub struct Session {
    pub name: String,
    pub role: AdminRole,
    /// The CSRF token the pages embed (accounts that signed in with a password).
    pub csrf: Option<String>,
}

impl Session {
    pub fn actor(&self) -> Actor {
        Actor {
            name: self.name.clone(),
            via: "http",
        }
    }
}

impl Accounts {
    pub fn new(users: &[AdminUser]) -> Self {
        Self {
            users: users
                .iter()
                .map(|u| {
                    let password = (!u.password.is_empty()).then(|| digest(u.password.expose()));
                    Account {
                        name: u.name.clone(),
                        role: u.role,
                        csrf: password.as_ref().map(|p| csrf_token(&u.name, p)),
                        password,
                        token: (!u.token.is_empty()).then(|| digest(u.token.expose())),
                    }
                })
                .collect(),
        }
    }

    /// The account a request's `Authorization` header names, and whether it came by password.
    fn check(&self, headers: &HeaderMap) -> Result<(Session, bool), Refusal> {
        let value = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or(Refusal::NoCredentials)?;
        let (scheme, rest) = value.split_once(' ').ok_or(Refusal::BadCredentials)?;
        if scheme.eq_ignore_ascii_case("bearer") {
            let given = digest(rest.trim());
            // Every account is compared, so the time does not tell which one matched.
            let mut found = None;
            for a in &self.users {
                if let Some(t) = &a.token {
                    if bool::from(t[..].ct_eq(&given[..])) {
                        found = Some(a);
                    }
                }
            }
            let a = found.ok_or(Refusal::BadCredentials)?;
            return Ok((a.session(), false));
        }
        if scheme.eq_ignore_ascii_case("basic") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(rest.trim())
                .map_err(|_| Refusal::BadCredentials)?;
            let decoded = String::from_utf8(decoded).map_err(|_| Refusal::BadCredentials)?;
            let (name, password) = decoded.split_once(':').ok_or(Refusal::BadCredentials)?;
            let given = digest(password);
            let mut found = None;
            for a in &self.users {
                if let Some(p) = &a.password {
                    let same_name = bool::from(a.name.as_bytes().ct_eq(name.as_bytes()));
                    if bool::from(p[..].ct_eq(&given[..])) && same_name {
                        found = Some(a);
                    }
                }
            }
            let a = found.ok_or(Refusal::BadCredentials)?;
            return Ok((a.session(), true));
        }
        Err(Refusal::BadCredentials)
    }
}

impl Account {
    fn session(&self) -> Session {
        Session {
            name: self.name.clone(),
            role: self.role,
            csrf: self.csrf.clone(),
        }
    }
}

enum Refusal {
    NoCredentials,
    BadCredentials,
    ReadOnly,
    Csrf,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let challenge = [(
            header::WWW_AUTHENTICATE,
            r#"Basic realm="outbox-relay admin", charset="UTF-8""#,
        )];
        let body = |status: StatusCode, error: &str, message: &str| {
            (
                status,
                axum::Json(serde_json::json!({ "error": error, "message": message })),
            )
        };
        match self {
            Refusal::NoCredentials => (
                challenge,
                body(
                    StatusCode::UNAUTHORIZED,
                    "unauthenticated",
                    "sign in: basic auth with an admin.users account, or Authorization: Bearer <token>",
                ),
            )
                .into_response(),
            Refusal::BadCredentials => (
                challenge,
                body(
                    StatusCode::UNAUTHORIZED,
                    "bad_credentials",
                    "unknown account, wrong password or wrong token",
                ),
            )
                .into_response(),
            Refusal::ReadOnly => body(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this account has the read role: actions need an account with role = \"admin\"",
            )
            .into_response(),
            Refusal::Csrf => body(
                StatusCode::FORBIDDEN,
                "csrf",
                "an action signed in with a password must carry the X-CSRF-Token header of the admin's pages",
            )
            .into_response(),
        }
    }
}

/// In front of every admin route: authenticates, checks the role of actions and their CSRF
/// token, and hands the [`Session`] to the handler.
pub async fn authenticate(
    State(accounts): State<Arc<Accounts>>,
    mut request: Request,
    next: Next,
) -> Response {
    let (session, by_password) = match accounts.check(request.headers()) {
        Ok(found) => found,
        Err(refusal) => return refusal.into_response(),
    };
    let changes = !matches!(*request.method(), Method::GET | Method::HEAD);
    if changes {
        if session.role != AdminRole::Admin {
            return Refusal::ReadOnly.into_response();
        }
        if by_password {
            let given = request
                .headers()
                .get(CSRF_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let expected = session.csrf.as_deref().unwrap_or("");
            if expected.is_empty() || !bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
                return Refusal::Csrf.into_response();
            }
        }
    }
    request.extensions_mut().insert(session);
    next.run(request).await
}
