//! The admin's pages: server-rendered HTML (maud templates, checked at compile time and escaped),
//! one stylesheet and one small script embedded in the binary, nothing loaded from the network.
//! Every page reads through the same statements as the JSON API; the action forms post to the
//! API (the script adds the CSRF token and asks for the count first where a filter selects).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use maud::{html, Markup, DOCTYPE};

use super::api::{self, ApiError, Overview};
use super::auth::Session;
use super::state::AdminState;
use crate::config::AdminRole;
use crate::store::admin::{self as sql, MessageQuery, Source};

const CSS: &str = include_str!("assets/admin.css");
const JS: &str = include_str!("assets/admin.js");

pub fn routes() -> Router<Arc<AdminState>> {
    Router::new()
        .route("/", get(overview))
        .route("/overview", get(overview))
        .route("/messages", get(messages))
        .route("/messages/{source}/{id}", get(message))
        .route("/dead", get(dead))
        .route("/keys", get(keys))
        .route("/audit", get(audit))
        .route(
            "/assets/admin.css",
            get(|| async { asset("text/css", CSS) }),
        )
        .route(
            "/assets/admin.js",
            get(|| async { asset("text/javascript", JS) }),
        )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// A page that could not be shown: the API's error, as a page.
pub struct PageError(ApiError);

impl From<ApiError> for PageError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl From<sqlx::Error> for PageError {
    fn from(e: sqlx::Error) -> Self {
        Self(e.into())
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let body = html! {
            (DOCTYPE)
            html lang="en" {
                head { meta charset="utf-8"; title { "outbox-relay admin: error" } }
                body { h1 { "Cannot show this page" } p { (self.0.message) } }
            }
        };
        (self.0.status, Html(body.into_string())).into_response()
    }
}

type Page = Result<Html<String>, PageError>;

/// The frame of every page: navigation, who is signed in, the CSRF token for the script.
fn layout(
    state: &AdminState,
    session: &Session,
    title: &str,
    active: &str,
    refresh: Option<u32>,
    body: Markup,
) -> Html<String> {
    let p = &state.prefix;
    let nav = [
        ("overview", "Overview", format!("{p}/overview")),
        ("messages", "Messages", format!("{p}/messages")),
        ("dead", "Dead letters", format!("{p}/dead")),
        ("keys", "Keys", format!("{p}/keys")),
        ("audit", "Audit", format!("{p}/audit")),
    ];
    let role = match session.role {
        AdminRole::Admin => "admin",
        AdminRole::Read => "read only",
    };
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="admin-prefix" content=(p);
                @if let Some(csrf) = &session.csrf { meta name="csrf-token" content=(csrf); }
                title { (title) " · outbox-relay" }
                link rel="stylesheet" href={ (p) "/assets/admin.css" };
                script src={ (p) "/assets/admin.js" } defer {}
            }
            body {
                header {
                    strong { "outbox-relay" }
                    nav {
                        @for (id, label, href) in &nav {
                            @if *id == active { a href=(href) aria-current="page" { (label) } }
                            @else { a href=(href) { (label) } }
                        }
                    }
                    span.who { (session.name) " (" (role) ")" }
                }
                @if let Some(secs) = refresh {
                    main data-refresh=(secs) { h1 { (title) } (body) }
                } @else {
                    main { h1 { (title) } (body) }
                }
            }
        }
    };
    Html(page.into_string())
}

fn can_act(session: &Session) -> bool {
    session.role == AdminRole::Admin
}

fn age(secs: f64) -> String {
    if secs < 60.0 {
        format!("{secs:.1} s")
    } else if secs < 3600.0 {
        format!("{} min {} s", (secs / 60.0) as u64, (secs % 60.0) as u64)
    } else {
        format!(
            "{} h {} min",
            (secs / 3600.0) as u64,
            ((secs % 3600.0) / 60.0) as u64
        )
    }
}

fn time(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

fn source_name(source: Source) -> &'static str {
    match source {
        Source::Waiting => "waiting",
        Source::Dead => "dead",
        Source::Sent => "sent",
    }
}

async fn overview(
    State(state): State<Arc<AdminState>>,
    Extension(session): Extension<Session>,
) -> Page {
    let o = Overview::read(&state).await?;
    let p = &state.prefix;
    let s = &o.status;
    let act = can_act(&session);
    let body = html! {
        section {
            h2 { "Topics" }
            @if s.topics.is_empty() { p.muted { "Nothing waiting, nothing dead." } }
            @else {
                div.scroll { table {
                    thead { tr {
                        th { "Topic" } th.num { "Waiting" } th.num { "Scheduled" } th.num { "Oldest due" }
                        th.num { "Published/s" } th.num { "Dead" } th { "State" }
                    } }
                    tbody {
                        @for t in &s.topics {
                            tr {
                                td { a href={ (p) "/messages?topic=" (urlencode(&t.lag.topic)) } { (t.lag.topic) } }
                                td.num { (t.lag.waiting) }
                                td.num { (t.lag.scheduled) }
                                td.num { (age(t.lag.oldest_age_seconds)) }
                                td.num { @if let Some(r) = t.publish_rate_per_second { (format!("{r:.1}")) } @else { "–" } }
                                td.num { @if t.dead_letters > 0 { a href={ (p) "/dead?topic=" (urlencode(&t.lag.topic)) } { (t.dead_letters) } } @else { "0" } }
                                td {
                                    @if t.paused {
                                        span.paused { "paused" } " "
                                        @if act {
                                            form.inline data-api={ "/api/topics/" (urlencode(&t.lag.topic)) "/resume" } data-done="resumed" {
                                                button.secondary type="submit" { "Resume" }
                                            }
                                        }
                                    } @else {
                                        span.up { "flowing" } " "
                                        @if act {
                                            form.inline data-api={ "/api/topics/" (urlencode(&t.lag.topic)) "/pause" }
                                                data-confirm={ "Pause " (t.lag.topic) "? No relay claims its rows until it is resumed." } data-done="paused" {
                                                button.secondary type="submit" { "Pause" }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                } }
            }
        }
        section {
            h2 { "Waiting rows, last hour" }
            (lag_chart(&o.lag))
        }
        section {
            h2 { "Sinks" }
            @if s.sinks.is_empty() { p.muted { "Unknown: no relay has a fresh heartbeat." } }
            @else {
                div.scroll { table {
                    thead { tr { th { "Sink" } th { "Kind" } th { "State" } th.num { "Relays up" } th { "Last error" } } }
                    tbody { @for k in &s.sinks { tr {
                        td { (k.sink) } td { (k.kind) }
                        td { @if k.up { span.up { "up" } } @else { span.down { "DOWN" } } }
                        td.num { (k.relays_up) "/" (k.relays_reporting) }
                        td { (k.error.as_deref().unwrap_or("")) }
                    } } }
                } }
            }
        }
        section {
            h2 { "Relays" }
            div.scroll { table {
                thead { tr { th { "Host" } th.num { "Pid" } th { "Version" } th.num { "Slots" } th { "Can publish" } th.num { "Heartbeat" } } }
                tbody { @for r in s.relays.iter().filter(|r| r.is_fresh()) { tr {
                    td { (r.hostname) } td.num { (r.pid) } td { (r.version) }
                    td.num { (o.slots.get(&r.relay_id).copied().unwrap_or(0)) }
                    td { @if r.sinks.iter().any(|k| k.up) { span.up { "yes" } } @else { span.down { "no" } } }
                    td.num { (age(r.heartbeat_age_seconds)) " ago" }
                } } }
            } }
        }
        section {
            h2 { "Keys" }
            p {
                a href={ (p) "/keys" } { (s.keys.held_back.len()) " held back, " (s.keys.parked.len()) " parked" }
                " (at most 20 of each counted here)"
            }
        }
    };
    Ok(layout(
        &state,
        &session,
        "Overview",
        "overview",
        Some(5),
        body,
    ))
}

/// An inline SVG chart of the busiest topics' waiting rows (at most six lines).
fn lag_chart(samples: &[super::lag::Sample]) -> Markup {
    if samples.len() < 2 {
        return html! { p.muted { "Collecting samples…" } };
    }
    let mut peak: BTreeMap<&str, i64> = BTreeMap::new();
    for s in samples {
        for (t, n) in &s.waiting {
            let e = peak.entry(t.as_str()).or_default();
            *e = (*e).max(*n);
        }
    }
    let mut topics: Vec<(&str, i64)> = peak.into_iter().collect();
    topics.sort_by_key(|t| std::cmp::Reverse(t.1));
    topics.truncate(6);
    let max = topics.first().map_or(1, |t| t.1).max(1) as f64;
    let (w, h) = (600.0, 140.0);
    let colours = [
        "#1f5fbf", "#b3261e", "#1e7b34", "#8a5a00", "#6b3fa0", "#00707a",
    ];
    let step = w / (samples.len() - 1) as f64;
    html! {
        svg.chart viewBox={ "0 0 " (w) " " (h + 10.0) } preserveAspectRatio="none" role="img" aria-label="waiting rows per topic" {
            @for (i, (topic, _)) in topics.iter().enumerate() {
                polyline fill="none" stroke=(colours[i % colours.len()]) stroke-width="2" points=(
                    samples.iter().enumerate().map(|(x, s)| {
                        let n = s.waiting.get(*topic).copied().unwrap_or(0) as f64;
                        format!("{:.1},{:.1}", x as f64 * step, 5.0 + h - n / max * h)
                    }).collect::<Vec<_>>().join(" ")
                ) {}
            }
        }
        p.legend {
            @for (i, (topic, peak)) in topics.iter().enumerate() {
                span { span style={ "color:" (colours[i % colours.len()]) } { "■ " } (topic) " (peak " (peak) ")" }
            }
            span.muted { "from " (time(&samples[0].at)) " to " (time(&samples[samples.len() - 1].at)) " UTC" }
        }
    }
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[derive(Debug, Default, serde::Deserialize)]
struct SearchParams {
    source: Option<Source>,
    message_id: Option<String>,
    key: Option<String>,
    topic: Option<String>,
    /// Enqueued at or after / before, RFC 3339 (an empty field is no bound).
    from: Option<String>,
    to: Option<String>,
    before_id: Option<i64>,
}

/// An RFC 3339 time from a search field, or a 400 that says what to type.
fn time_field(
    name: &str,
    v: &Option<String>,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, ApiError> {
    match nonempty(v) {
        None => Ok(None),
        Some(text) => chrono::DateTime::parse_from_rfc3339(text.trim())
            .map(|t| Some(t.with_timezone(&chrono::Utc)))
            .map_err(|e| {
                ApiError::bad_input(format!(
                    "{name} {text:?} is not a time ({e}): write it as 2026-12-03T08:00:00Z"
                ))
            }),
    }
}

fn nonempty(v: &Option<String>) -> Option<String> {
    v.clone().filter(|s| !s.is_empty())
}

async fn search_page(
    state: &AdminState,
    session: &Session,
    p: SearchParams,
    fixed: Option<Source>,
) -> Page {
    let source = fixed.or(p.source).unwrap_or(Source::Waiting);
    let q = MessageQuery {
        message_id: nonempty(&p.message_id),
        key: nonempty(&p.key),
        topic: nonempty(&p.topic),
        from: time_field("from", &p.from)?,
        to: time_field("to", &p.to)?,
        before_id: p.before_id,
    };
    let limit = 50;
    let mut c = api::conn(state).await?;
    let rows = sql::search_messages(&mut c, source, &q, limit).await?;
    let pre = &state.prefix;
    let here = if fixed.is_some() { "dead" } else { "messages" };
    let next = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|r| r.id))
        .flatten();
    let query_of = |before: i64| {
        let mut parts = vec![
            format!("source={}", source_name(source)),
            format!("before_id={before}"),
        ];
        for (k, v) in [
            ("message_id", &q.message_id),
            ("key", &q.key),
            ("topic", &q.topic),
            ("from", &p.from),
            ("to", &p.to),
        ] {
            if let Some(v) = v.as_ref().filter(|v| !v.is_empty()) {
                parts.push(format!("{k}={}", urlencode(v)));
            }
        }
        parts.join("&")
    };
    let act = can_act(session) && source == Source::Dead;
    let replay = can_act(session) && source == Source::Sent;
    let body = html! {
        section {
            form.search method="get" action={ (pre) "/" (here) } {
                @if fixed.is_none() {
                    label { "Where"
                        select name="source" {
                            @for s in [Source::Waiting, Source::Dead, Source::Sent] {
                                @if s == source { option value=(source_name(s)) selected { (source_name(s)) } }
                                @else { option value=(source_name(s)) { (source_name(s)) } }
                            }
                        }
                    }
                }
                label { "Message id" input name="message_id" value=(q.message_id.clone().unwrap_or_default()); }
                label { "Key" input name="key" value=(q.key.clone().unwrap_or_default()); }
                label { "Topic" input name="topic" value=(q.topic.clone().unwrap_or_default()); }
                label { "Enqueued from (UTC)" input name="from" placeholder="2026-12-03T08:00:00Z" value=(p.from.clone().unwrap_or_default()); }
                label { "to" input name="to" placeholder="2026-12-03T09:00:00Z" value=(p.to.clone().unwrap_or_default()); }
                button type="submit" { "Search" }
            }
        }
        @if act && (q.topic.is_some() || q.key.is_some()) {
            section {
                p { "Every dead letter of this selection (not only this page):" }
                form.inline data-api="/api/dead/retry" data-confirm="count" data-verb="Retry" data-done="retried" {
                    @if let Some(t) = &q.topic { input type="hidden" name="topics[]" value=(t); }
                    @if let Some(k) = &q.key { input type="hidden" name="keys[]" value=(k); }
                    button type="submit" { "Retry all" }
                }
                " "
                form.inline data-api="/api/dead/purge" data-confirm="count" data-verb="Purge for good" data-done="purged" {
                    @if let Some(t) = &q.topic { input type="hidden" name="topics[]" value=(t); }
                    @if let Some(k) = &q.key { input type="hidden" name="keys[]" value=(k); }
                    button.danger type="submit" { "Purge all" }
                }
            }
        }
        @if replay {
            section {
                form.search id="replay" data-api="/api/replay" data-confirm="count" data-verb="Replay" data-done="replayed as new messages" {
                    label { "Replay sent ids from" input name="id_from" data-type="number" inputmode="numeric" required; }
                    label { "to" input name="id_to" data-type="number" inputmode="numeric" required; }
                    @if let Some(t) = &q.topic { input type="hidden" name="topic" value=(t); }
                    @if let Some(k) = &q.key { input type="hidden" name="key" value=(k); }
                    button type="submit" { "Replay" }
                }
                p.muted { "Each becomes a new message with a new message id; the original id travels in the outbox-replay-of header." }
            }
        }
        section {
            @if rows.is_empty() { p.muted { "No " (source_name(source)) " message matches." } }
            @else {
                form id="selected" data-api="/api/dead/retry" data-done="retried" {}
                div.scroll { table {
                    thead { tr {
                        @if act { th { "" } }
                        th.num { "Id" } th { "Topic" } th { "Key" } th { "Message id" } th.num { "Attempts" } th.num { "Bytes" }
                        th { (match source { Source::Waiting => "Due", Source::Dead => "Dead since", Source::Sent => "Sent" }) }
                        th { "Last error" }
                    } }
                    tbody { @for r in &rows { tr {
                        @if act { td { input type="checkbox" name="ids[]" value=(r.id) data-type="number" form="selected" aria-label={ "select " (r.id) }; } }
                        td.num { a href={ (pre) "/messages/" (source_name(source)) "/" (r.id) } { (r.id) } }
                        td { (r.topic) } td { (r.key.as_deref().unwrap_or("–")) } td { code { (r.message_id) } }
                        td.num { (r.attempts) } td.num { (r.payload_bytes) }
                        td { (time(&r.at)) }
                        td { (r.last_error.as_deref().unwrap_or("")) }
                    } } }
                } }
                @if act {
                    p {
                        button type="submit" form="selected" { "Retry selected" }
                    }
                }
                @if let Some(before) = next {
                    p { a href={ (pre) "/" (here) "?" (query_of(before)) } { "Older →" } }
                }
            }
        }
    };
    let title = if fixed.is_some() {
        "Dead letters"
    } else {
        "Messages"
    };
    Ok(layout(state, session, title, here, None, body))
}

async fn messages(
    State(state): State<Arc<AdminState>>,
    Extension(session): Extension<Session>,
    params: Result<Query<SearchParams>, axum::extract::rejection::QueryRejection>,
) -> Page {
    let Query(p) = params.map_err(|e| ApiError::bad_input(e.body_text()))?;
    search_page(&state, &session, p, None).await
}

async fn dead(
    State(state): State<Arc<AdminState>>,
    Extension(session): Extension<Session>,
    params: Result<Query<SearchParams>, axum::extract::rejection::QueryRejection>,
) -> Page {
    let Query(p) = params.map_err(|e| ApiError::bad_input(e.body_text()))?;
    search_page(&state, &session, p, Some(Source::Dead)).await
}

async fn message(
    State(state): State<Arc<AdminState>>,
    Extension(session): Extension<Session>,
    Path((source, id)): Path<(String, i64)>,
) -> Page {
    let source: Source = serde_json::from_value(serde_json::Value::String(source.clone()))
        .map_err(|_| {
            ApiError::bad_input(format!("unknown source {source:?}: waiting, dead or sent"))
        })?;
    let mut c = api::conn(&state).await?;
    let m = sql::message(&mut c, source, id).await?.ok_or_else(|| {
        ApiError::not_found(format!("no {} message with id {id}", source_name(source)))
    })?;
    let payload = api::render_payload(&m.payload);
    let s = &m.summary;
    let act = can_act(&session);
    let headers: Vec<(String, String)> = m
        .headers
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default();
    let errors = m.errors.as_array().cloned().unwrap_or_default();
    let body = html! {
        section {
            div.scroll { table { tbody {
                tr { th { "Where" } td { (source_name(source)) } }
                tr { th { "Id" } td { (s.id) } }
                tr { th { "Message id" } td { code { (s.message_id) } } }
                tr { th { "Topic" } td { (s.topic) } }
                tr { th { "Key" } td { (s.key.as_deref().unwrap_or("–")) } }
                tr { th { "Enqueued" } td { (time(&s.created_at)) " UTC" } }
                tr { th { (match source { Source::Waiting => "Due", Source::Dead => "Dead since", Source::Sent => "Sent" }) } td { (time(&s.at)) " UTC" } }
                tr { th { "Attempts" } td { (s.attempts) } }
                @if let Some(e) = &s.last_error { tr { th { "Last error" } td.err { (e) } } }
            } } }
            @if act && source == Source::Dead {
                p {
                    form.inline data-api="/api/dead/retry" data-done="retried: back in the outbox" {
                        input type="hidden" name="ids[]" value=(s.id) data-type="number";
                        button type="submit" { "Retry" }
                    }
                    " "
                    form.inline data-api="/api/dead/purge" data-confirm="Purge this dead letter for good?" data-done="purged" {
                        input type="hidden" name="ids[]" value=(s.id) data-type="number";
                        button.danger type="submit" { "Purge" }
                    }
                }
            }
            @if act && source == Source::Sent {
                p {
                    form.inline data-api="/api/replay" data-confirm="count" data-verb="Replay" data-done="replayed as a new message" {
                        input type="hidden" name="id_from" value=(s.id) data-type="number";
                        input type="hidden" name="id_to" value=(s.id) data-type="number";
                        button type="submit" { "Replay" }
                    }
                }
            }
        }
        section {
            h2 { "Payload " span.muted { "(" (payload["encoding"].as_str().unwrap_or("")) ", " (s.payload_bytes) " bytes)" } }
            pre { (payload["text"].as_str().unwrap_or("")) }
        }
        section {
            h2 { "Headers" }
            @if headers.is_empty() { p.muted { "None." } }
            @else { table { tbody { @for (k, v) in &headers { tr { th { (k) } td { code { (v) } } } } } } }
        }
        @if !errors.is_empty() {
            section {
                h2 { "Attempts that failed" }
                div.scroll { table {
                    thead { tr { th.num { "Attempt" } th { "At" } th { "Error" } } }
                    tbody { @for e in &errors { tr {
                        td.num { (e["attempt"].to_string()) }
                        td { (e["at"].as_str().unwrap_or("")) }
                        td { (e["error"].as_str().unwrap_or("")) }
                    } } }
                } }
            }
        }
    };
    Ok(layout(
        &state,
        &session,
        &format!("Message {}", s.id),
        "messages",
        None,
        body,
    ))
}

async fn keys(
    State(state): State<Arc<AdminState>>,
    Extension(session): Extension<Session>,
) -> Page {
    let pool = state.pool().ok_or_else(api::starting)?;
    let k = crate::overview::collect_keys(pool, 500).await?;
    let act = can_act(&session);
    let pre = &state.prefix;
    let body = html! {
        section {
            h2 { "Held back" }
            p.muted { "The key's oldest message failed and waits for its next attempt; the key's later messages wait behind it." }
            @if k.held_back.is_empty() { p.muted { "None." } }
            @else { div.scroll { table {
                thead { tr { th { "Key" } th { "Topic" } th.num { "Attempts" } th.num { "Behind" } th { "Next attempt" } th { "Last error" } @if act { th { "" } } } }
                tbody { @for h in &k.held_back { tr {
                    td { a href={ (pre) "/messages?key=" (urlencode(&h.key)) } { (h.key) } } td { (h.topic) }
                    td.num { (h.attempts) } td.num { (h.behind) } td { (time(&h.next_attempt_at)) }
                    td { (h.last_error.as_deref().unwrap_or("")) }
                    @if act { td {
                        form.inline data-api="/api/keys/skip" data-confirm={ "Dead-letter the failing message of key " (h.key) " now?" } data-done="skipped" {
                            input type="hidden" name="key" value=(h.key);
                            input type="hidden" name="topic" value=(h.topic);
                            button.danger type="submit" { "Skip" }
                        }
                    } }
                } } }
            } } }
        }
        section {
            h2 { "Parked" }
            p.muted { "A message of the key was dead-lettered (ordering.on_dead = \"park\"): the key's later messages wait until it is released." }
            @if k.parked.is_empty() { p.muted { "None." } }
            @else { div.scroll { table {
                thead { tr { th { "Key" } th { "Topic" } th.num { "Dead letter" } th.num { "Waiting" } th { "Parked" } th { "Reason" } @if act { th { "" } } } }
                tbody { @for pk in &k.parked { tr {
                    td { (pk.key) } td { (pk.topic) }
                    td.num { a href={ (pre) "/messages/dead/" (pk.dead_id) } { (pk.dead_id) } }
                    td.num { (pk.waiting) } td { (time(&pk.parked_at)) } td { (pk.reason) }
                    @if act { td {
                        form.inline data-api="/api/keys/release" data-done="released" {
                            input type="hidden" name="keys[]" value=(pk.key);
                            button type="submit" { "Release" }
                        }
                    } }
                } } }
            } } }
        }
    };
    Ok(layout(&state, &session, "Keys", "keys", Some(10), body))
}

async fn audit(
    State(state): State<Arc<AdminState>>,
    Extension(session): Extension<Session>,
) -> Page {
    let mut c = api::conn(&state).await?;
    let entries = sql::audit_entries(&mut c, 200, None).await?;
    let body = html! {
        section {
            @if entries.is_empty() { p.muted { "No action recorded yet." } }
            @else { div.scroll { table {
                thead { tr { th { "At (UTC)" } th { "Who" } th { "Via" } th { "Action" } th.num { "Changed" } th { "On" } } }
                tbody { @for e in &entries { tr {
                    td { (time(&e.at)) } td { (e.actor) } td { (e.via) } td { (e.action) } td.num { (e.affected) }
                    td { code { (e.target.to_string()) } }
                } } }
            } } }
        }
    };
    Ok(layout(&state, &session, "Audit trail", "audit", None, body))
}
