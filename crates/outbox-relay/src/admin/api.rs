//! The admin's JSON API, under `<admin.path_prefix>/api` (docs/admin.md lists every endpoint).
//! The pages call it; so can scripts, with a bearer token.
//!
//! Actions that select rows by a filter (dead-letter retry and purge, replay) take two steps,
//! so that what the operator confirmed is what happens: `"dry_run": true` answers the rows and
//! their count; the action itself must repeat the count as `"expect"`, and is refused (409, with
//! the current count) when the selection has changed since. Actions on named rows (ids, a key,
//! a topic) need no count. Every action is recorded in the audit trail.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::PgConnection;

use super::auth::Session;
use super::state::AdminState;
use crate::store;
use crate::store::admin::{self as sql, MessageQuery, ReplaySelection, Source};
use crate::store::dead::DeadFilter;

/// The most rows one page of a search returns, and one filtered action selects.
pub const MAX_PAGE: i64 = 500;
pub const MAX_SELECTION: i64 = 100_000;

pub fn routes() -> Router<Arc<AdminState>> {
    Router::new()
        .route("/api/session", get(session))
        .route("/api/overview", get(overview))
        .route("/api/messages", get(messages))
        .route("/api/messages/{source}/{id}", get(message))
        .route("/api/audit", get(audit))
        .route("/api/dead/retry", post(dead_retry))
        .route("/api/dead/purge", post(dead_purge))
        .route("/api/keys/release", post(keys_release))
        .route("/api/keys/skip", post(keys_skip))
        .route("/api/topics/{topic}/pause", post(topic_pause))
        .route("/api/topics/{topic}/resume", post(topic_resume))
        .route("/api/replay", post(replay))
}

/// An answer other than success: a status and `{"error": kind, "message": what to do}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    pub extra: Value,
}

impl ApiError {
    pub fn bad_input(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_input", message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            extra: Value::Null,
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        tracing::warn!(error = %e, "admin request failed in the database");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "database",
            format!("the database did not answer: {e}"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.kind, "message": self.message });
        if let (Value::Object(b), Value::Object(extra)) = (&mut body, self.extra) {
            b.extend(extra);
        }
        (self.status, Json(body)).into_response()
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

/// A JSON body, or a 400 that says what is wrong with it.
fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    let bytes: &[u8] = if bytes.is_empty() { b"{}" } else { bytes };
    serde_json::from_slice(bytes).map_err(|e| ApiError::bad_input(format!("the JSON body: {e}")))
}

pub(super) async fn conn(
    state: &AdminState,
) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>, ApiError> {
    let pool = state.pool().ok_or_else(starting)?;
    Ok(pool.acquire().await?)
}

async fn record(
    conn: &mut PgConnection,
    session: &Session,
    action: &str,
    target: Value,
    affected: i64,
) -> Result<(), ApiError> {
    sql::audit(conn, &session.actor(), action, &target, affected).await?;
    tracing::info!(actor = %session.name, action, affected, "admin action");
    Ok(())
}

/// Who is signed in, with which role, and the CSRF token that actions signed in with a password
/// must carry (`X-CSRF-Token`).
async fn session(Extension(session): Extension<Session>) -> Json<Value> {
    Json(json!({
        "name": session.name,
        "role": session.role,
        "csrf_token": session.csrf,
    }))
}

/// What the overview shows, for the API and the page.
pub struct Overview {
    pub status: crate::overview::Status,
    /// Slots held per relay id.
    pub slots: std::collections::BTreeMap<String, i64>,
    pub lag: Vec<super::lag::Sample>,
}

impl Overview {
    pub async fn read(state: &AdminState) -> Result<Self, ApiError> {
        let pool = state.pool().ok_or_else(starting)?;
        let status = crate::overview::collect(pool).await?;
        let mut c = pool.acquire().await?;
        let slots = sql::slots_by_relay(&mut c).await?;
        Ok(Self {
            status,
            slots,
            lag: state.lag.samples(),
        })
    }

    /// The live relays with the slots they hold and whether any of their sinks can publish.
    pub fn relays(&self) -> Vec<Value> {
        self.status
            .relays
            .iter()
            .filter(|r| r.is_fresh())
            .map(|r| {
                json!({
                    "relay_id": r.relay_id,
                    "hostname": r.hostname,
                    "pid": r.pid,
                    "version": r.version,
                    "heartbeat_age_seconds": r.heartbeat_age_seconds,
                    "slots": self.slots.get(&r.relay_id).copied().unwrap_or(0),
                    "can_publish": r.sinks.iter().any(|s| s.up),
                    "sinks": r.sinks,
                })
            })
            .collect()
    }
}

pub(super) fn starting() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "starting",
        "the relay is still connecting to PostgreSQL: try again in a moment",
    )
}

async fn overview(State(state): State<Arc<AdminState>>) -> ApiResult {
    let o = Overview::read(&state).await?;
    Ok(Json(json!({
        "at": o.status.at,
        "topics": o.status.topics,
        "sinks": o.status.sinks,
        "relays": o.relays(),
        "keys": o.status.keys,
        "paused_topics": o.status.paused_topics,
        "lag_history": o.lag,
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MessagesParams {
    #[serde(default = "waiting")]
    source: Source,
    message_id: Option<String>,
    key: Option<String>,
    topic: Option<String>,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    before_id: Option<i64>,
    limit: Option<i64>,
}

fn waiting() -> Source {
    Source::Waiting
}

fn nonempty(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.is_empty())
}

async fn messages(
    State(state): State<Arc<AdminState>>,
    params: Result<Query<MessagesParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(p) = params.map_err(|e| {
        ApiError::bad_input(format!(
            "{}: the parameters are source (waiting, dead, sent), message_id, key, topic, from, to (RFC 3339), before_id, limit",
            e.body_text()
        ))
    })?;
    let limit = p.limit.unwrap_or(50);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_input(format!(
            "limit must be between 1 and {MAX_PAGE}, got {limit}"
        )));
    }
    let q = MessageQuery {
        message_id: nonempty(p.message_id),
        key: nonempty(p.key),
        topic: nonempty(p.topic),
        from: p.from,
        to: p.to,
        before_id: p.before_id,
    };
    let mut c = conn(&state).await?;
    let rows = sql::search_messages(&mut c, p.source, &q, limit).await?;
    let next = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|r| r.id))
        .flatten();
    Ok(Json(json!({ "messages": rows, "next_before_id": next })))
}

/// A payload as a person can read it: JSON pretty-printed, UTF-8 text as is, anything else as
/// hex.
pub fn render_payload(payload: &[u8]) -> Value {
    if let Ok(text) = std::str::from_utf8(payload) {
        if let Ok(doc) = serde_json::from_str::<Value>(text) {
            if doc.is_object() || doc.is_array() {
                return json!({
                    "encoding": "json",
                    "text": serde_json::to_string_pretty(&doc).unwrap_or_else(|_| text.to_string()),
                });
            }
        }
        if !text
            .chars()
            .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
        {
            return json!({ "encoding": "text", "text": text });
        }
    }
    json!({ "encoding": "hex", "text": crate::message::hex_dump(payload) })
}

async fn message(
    State(state): State<Arc<AdminState>>,
    Path((source, id)): Path<(String, String)>,
) -> ApiResult {
    let source: Source = serde_json::from_value(Value::String(source.clone())).map_err(|_| {
        ApiError::bad_input(format!(
            "unknown source {source:?}: use waiting, dead or sent"
        ))
    })?;
    let id: i64 = id
        .parse()
        .map_err(|_| ApiError::bad_input(format!("the id must be a number, got {id:?}")))?;
    let mut c = conn(&state).await?;
    let m = sql::message(&mut c, source, id).await?.ok_or_else(|| {
        ApiError::not_found(format!(
            "no {} message with id {id}",
            serde_json::to_value(source)
                .unwrap_or_default()
                .as_str()
                .unwrap_or("")
        ))
    })?;
    Ok(Json(json!({
        "message": m.summary,
        "payload": render_payload(&m.payload),
        "headers": m.headers,
        "errors": m.errors,
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditParams {
    before_id: Option<i64>,
    limit: Option<i64>,
}

async fn audit(
    State(state): State<Arc<AdminState>>,
    params: Result<Query<AuditParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(p) = params.map_err(|e| {
        ApiError::bad_input(format!(
            "{}: the parameters are before_id, limit",
            e.body_text()
        ))
    })?;
    let limit = p.limit.unwrap_or(100).clamp(1, MAX_PAGE);
    let mut c = conn(&state).await?;
    let entries = sql::audit_entries(&mut c, limit, p.before_id).await?;
    Ok(Json(json!({ "entries": entries })))
}

/// Which dead letters an action applies to: ids, or a filter. Every field given must match.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeadSelection {
    #[serde(default)]
    ids: Vec<i64>,
    #[serde(default)]
    topics: Vec<String>,
    #[serde(default)]
    keys: Vec<String>,
    id_from: Option<i64>,
    id_to: Option<i64>,
    older_than_secs: Option<u64>,
    newer_than_secs: Option<u64>,
    /// Answer the selection and change nothing.
    #[serde(default)]
    dry_run: bool,
    /// The count the operator confirmed (needed unless `ids` names the rows).
    expect: Option<usize>,
    /// Select everything: needed when no id or filter is given.
    #[serde(default)]
    all: bool,
}

impl DeadSelection {
    fn filter(&self) -> Result<DeadFilter, ApiError> {
        if let (Some(a), Some(b)) = (self.id_from, self.id_to) {
            if a > b {
                return Err(ApiError::bad_input(format!(
                    "id_from ({a}) is greater than id_to ({b})"
                )));
            }
        }
        let f = DeadFilter {
            topics: self.topics.clone(),
            older_than: self.older_than_secs.map(Duration::from_secs),
            newer_than: self.newer_than_secs.map(Duration::from_secs),
            id_from: self.id_from,
            id_to: self.id_to,
            ids: self.ids.clone(),
            keys: self.keys.clone(),
        };
        if f.is_empty() && !self.all {
            return Err(ApiError::bad_input(
                "name the dead letters (ids) or a filter (topics, keys, id_from/id_to, older_than_secs/newer_than_secs); \"all\": true selects every one",
            ));
        }
        Ok(f)
    }

    /// The ids to act on now, checked against the confirmed count.
    async fn chosen(
        &self,
        c: &mut PgConnection,
    ) -> Result<Result<Vec<i64>, Json<Value>>, ApiError> {
        let filter = self.filter()?;
        let ids = store::dead::select_ids(c, &filter, Some(MAX_SELECTION)).await?;
        if self.dry_run {
            return Ok(Err(Json(
                json!({ "dry_run": true, "count": ids.len(), "ids": ids }),
            )));
        }
        let by_ids_only = !self.ids.is_empty()
            && filter
                == DeadFilter {
                    ids: self.ids.clone(),
                    ..DeadFilter::default()
                };
        match self.expect {
            Some(n) if n != ids.len() => Err(ApiError {
                extra: json!({ "count": ids.len() }),
                ..ApiError::new(
                    StatusCode::CONFLICT,
                    "count_changed",
                    format!("the selection holds {} dead letter(s) now, not {n}: look again and confirm the new count", ids.len()),
                )
            }),
            None if !by_ids_only => Err(ApiError {
                extra: json!({ "count": ids.len() }),
                ..ApiError::new(
                    StatusCode::CONFLICT,
                    "confirm",
                    format!("this selects {} dead letter(s): send the same selection with \"expect\": {} to go ahead", ids.len(), ids.len()),
                )
            }),
            _ => Ok(Ok(ids)),
        }
    }
}

async fn dead_retry(
    State(state): State<Arc<AdminState>>,
    Extension(session): Extension<Session>,
    bytes: Bytes,
) -> ApiResult {
    let sel: DeadSelection = body(&bytes)?;
    let mut c = conn(&state).await?;
    let ids = match sel.chosen(&mut c).await? {
        Ok(ids) => ids,
        Err(dry_run) => return Ok(dry_run),
    };
    let chosen = DeadFilter {
        ids: ids.clone(),
        ..DeadFilter::default()
    };
    let results = if ids.is_empty() {
        Vec::new()
    } else {
        store::dead::retry(&mut c, &chosen, None).await?
    };
    let retried = results.iter().filter(|r| r.retried).count();
    record(
        &mut c,
        &session,
        "dead.retry",
        json!({ "ids": ids }),
        retried as i64,
    )
    .await?;
    Ok(Json(json!({
        "retried": retried,
        "skipped": results.len() - retried,
        "results": results,
    })))
}

async fn dead_purge(
    State(state): State<Arc<AdminState>>,
    Extension(session): Extension<Session>,
    bytes: Bytes,
) -> ApiResult {
    let sel: DeadSelection = body(&bytes)?;
    let mut c = conn(&state).await?;
    let ids = match sel.chosen(&mut c).await? {
        Ok(ids) => ids,
        Err(dry_run) => return Ok(dry_run),
    };
    let purged = store::dead::purge_ids(&mut c, &ids).await?;
    record(
        &mut c,
        &session,
        "dead.purge",
        json!({ "ids": ids }),
        purged as i64,
    )
    .await?;
    Ok(Json(json!({ "purged": purged })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseBody {
    #[serde(default)]
    keys: Vec<String>,
    #[serde(default)]
    topics: Vec<String>,
}

async fn keys_release(
    State(state): State<Arc<AdminState>>,
    Extension(session): Extension<Session>,
    bytes: Bytes,
) -> ApiResult {
    let b: ReleaseBody = body(&bytes)?;
    if b.keys.is_empty() && b.topics.is_empty() {
        return Err(ApiError::bad_input(
            "name the keys to release (keys), or topics to release every key parked for them",
        ));
    }
    let mut c = conn(&state).await?;
    let matching = store::keys::parked_matching(&mut c, &b.keys, &b.topics).await?;
    let names: Vec<String> = matching.iter().map(|p| p.key.clone()).collect();
    let released = store::keys::release_keys(&mut c, &names).await?;
    let not_parked: Vec<&String> = b.keys.iter().filter(|k| !released.contains(k)).collect();
    record(
        &mut c,
        &session,
        "keys.release",
        json!({ "keys": released, "topics": b.topics }),
        released.len() as i64,
    )
    .await?;
    Ok(Json(
        json!({ "released": released, "not_parked": not_parked }),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SkipBody {
    key: String,
    topic: Option<String>,
    #[serde(default)]
    dry_run: bool,
}

async fn keys_skip(
    State(state): State<Arc<AdminState>>,
    Extension(session): Extension<Session>,
    bytes: Bytes,
) -> ApiResult {
    let b: SkipBody = body(&bytes)?;
    let mut c = conn(&state).await?;
    let skipped = match store::keys::skip(&mut c, &b.key, b.topic.as_deref(), b.dry_run).await {
        Ok(s) => s,
        Err(store::keys::SkipError::Database(e)) => return Err(e.into()),
        Err(e @ store::keys::SkipError::InFlight(_)) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "in_flight",
                e.to_string(),
            ))
        }
        Err(e) => return Err(ApiError::bad_input(e.to_string())),
    };
    if !b.dry_run {
        let affected = i64::from(skipped.dead_lettered.is_some()) + i64::from(skipped.unparked);
        record(
            &mut c,
            &session,
            "keys.skip",
            json!({ "key": b.key, "topic": b.topic, "dead_lettered": skipped.dead_lettered }),
            affected,
        )
        .await?;
    }
    Ok(Json(serde_json::to_value(&skipped).unwrap_or_default()))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PauseBody {
    reason: Option<String>,
}

async fn topic_pause(
    State(state): State<Arc<AdminState>>,
    Extension(session): Extension<Session>,
    Path(topic): Path<String>,
    bytes: Bytes,
) -> ApiResult {
    let b: PauseBody = body(&bytes)?;
    let reason = nonempty(b.reason);
    let mut c = conn(&state).await?;
    let paused = sql::pause_topic(&mut c, &topic, &session.name, reason.as_deref()).await?;
    if paused {
        record(
            &mut c,
            &session,
            "topics.pause",
            json!({ "topic": topic, "reason": reason }),
            1,
        )
        .await?;
    }
    Ok(Json(json!({ "topic": topic, "paused": paused })))
}

async fn topic_resume(
    State(state): State<Arc<AdminState>>,
    Extension(session): Extension<Session>,
    Path(topic): Path<String>,
) -> ApiResult {
    let mut c = conn(&state).await?;
    if !sql::resume_topic(&mut c, &topic).await? {
        return Err(ApiError::not_found(format!(
            "topic {topic:?} is not paused"
        )));
    }
    record(
        &mut c,
        &session,
        "topics.resume",
        json!({ "topic": topic }),
        1,
    )
    .await?;
    Ok(Json(json!({ "topic": topic, "resumed": true })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayBody {
    id_from: Option<i64>,
    id_to: Option<i64>,
    key: Option<String>,
    topic: Option<String>,
    sent_from: Option<DateTime<Utc>>,
    sent_to: Option<DateTime<Utc>>,
    limit: Option<i64>,
    #[serde(default)]
    dry_run: bool,
    expect: Option<usize>,
}

async fn replay(
    State(state): State<Arc<AdminState>>,
    Extension(session): Extension<Session>,
    bytes: Bytes,
) -> ApiResult {
    let b: ReplayBody = body(&bytes)?;
    let selection = ReplaySelection {
        id_from: b.id_from,
        id_to: b.id_to,
        key: nonempty(b.key),
        topic: nonempty(b.topic),
        sent_from: b.sent_from,
        sent_to: b.sent_to,
    };
    selection.validate().map_err(ApiError::bad_input)?;
    let limit = b.limit.unwrap_or(10_000);
    if !(1..=MAX_SELECTION).contains(&limit) {
        return Err(ApiError::bad_input(format!(
            "limit must be between 1 and {MAX_SELECTION}, got {limit}"
        )));
    }
    let mut c = conn(&state).await?;
    let candidates = sql::replay_candidates(&mut c, &selection, limit).await?;
    if b.dry_run {
        return Ok(Json(
            json!({ "dry_run": true, "count": candidates.len(), "messages": candidates }),
        ));
    }
    if b.expect != Some(candidates.len()) {
        let (kind, message) = match b.expect {
            Some(n) => ("count_changed", format!("the selection holds {} sent row(s) now, not {n}: look again and confirm the new count", candidates.len())),
            None => ("confirm", format!("this replays {} sent row(s): send the same selection with \"expect\": {} to go ahead", candidates.len(), candidates.len())),
        };
        return Err(ApiError {
            extra: json!({ "count": candidates.len() }),
            ..ApiError::new(StatusCode::CONFLICT, kind, message)
        });
    }
    let replayed = sql::replay(&mut c, &selection, limit).await?;
    record(
        &mut c,
        &session,
        "replay",
        serde_json::to_value(&selection).unwrap_or_default(),
        replayed.len() as i64,
    )
    .await?;
    Ok(Json(
        json!({ "replayed": replayed.len(), "messages": replayed }),
    ))
}
