//! The admin's JSON API (docs/admin.md) on a real relay, database and NATS: accounts and roles,
//! CSRF, every endpoint and action, and bad input.

mod support;

use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};
use support::*;

const PREFIX: &str = "/ops/outbox";
const ALICE: (&str, &str) = ("alice", "correct horse battery");
const VIEWER_TOKEN: &str = "viewer-token-0123456789";
const ROBOT_TOKEN: &str = "robot-token-0123456789";

fn admin_config(db: &TestDb, stream: &str, prefix: &str, port: u16) -> String {
    let base = nats_config(
        &db.url,
        &nats_url(),
        stream,
        prefix,
        "retention_secs = 3600",
    )
    .replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""));
    format!(
        r#"{base}
[admin]
enabled = true
path_prefix = "{PREFIX}"
lag_sample_secs = 1

[[admin.users]]
name = "{}"
role = "admin"
password = "{}"

[[admin.users]]
name = "viewer"
role = "read"
token = "{VIEWER_TOKEN}"

[[admin.users]]
name = "robot"
role = "admin"
token = "{ROBOT_TOKEN}"
"#,
        ALICE.0, ALICE.1
    )
}

/// How a request signs in.
#[derive(Clone, Copy)]
enum As<'a> {
    Nobody,
    Basic(&'a str, &'a str),
    Bearer(&'a str),
}

struct Admin {
    port: u16,
}

impl Admin {
    async fn call(
        &self,
        who: As<'_>,
        method: &str,
        path: &str,
        body: &str,
        csrf: Option<&str>,
    ) -> (u16, Value) {
        let auth = match who {
            As::Nobody => None,
            As::Basic(user, password) => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            )),
            As::Bearer(token) => Some(format!("Bearer {token}")),
        };
        let mut headers: Vec<(&str, &str)> = vec![("Content-Type", "application/json")];
        if let Some(a) = &auth {
            headers.push(("Authorization", a));
        }
        if let Some(c) = csrf {
            headers.push(("X-CSRF-Token", c));
        }
        let (status, text) = http::request(
            self.port,
            method,
            &format!("{PREFIX}{path}"),
            &headers,
            body,
        )
        .await
        .unwrap_or_else(|| panic!("{method} {path}: no answer"));
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    async fn get(&self, who: As<'_>, path: &str) -> (u16, Value) {
        self.call(who, "GET", path, "", None).await
    }

    /// A POST as the robot (bearer token: no CSRF token needed).
    async fn act(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(
            As::Bearer(ROBOT_TOKEN),
            "POST",
            path,
            &body.to_string(),
            None,
        )
        .await
    }

    async fn ok(&self, path: &str, body: Value) -> Value {
        let (status, v) = self.act(path, body).await;
        assert_eq!(status, 200, "POST {path}: {v}");
        v
    }
}

async fn start(db: &TestDb) -> (RelayProcess, Admin, NatsConsumer, String) {
    let (stream, prefix) = (unique("S"), unique("t"));
    let consumer = NatsConsumer::new(&nats_url(), &stream, &[format!("{prefix}.>")]).await;
    let port = free_port();
    let relay = RelayProcess::start(&admin_config(db, &stream, &prefix, port));
    let admin = Admin { port };
    let auth = format!("Bearer {VIEWER_TOKEN}");
    wait_until(Duration::from_secs(30), "the admin answers", || async {
        let path = format!("{PREFIX}/api/overview");
        http::get_with(port, &path, &[("Authorization", &auth)])
            .await
            .map(|r| r.0)
            == Some(200)
    })
    .await;
    (relay, admin, consumer, prefix)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_roles_and_csrf_guard_every_endpoint() {
    let db = TestDb::new().await;
    let (relay, admin, consumer, _) = start(&db).await;

    let (status, body) = admin.get(As::Nobody, "/api/overview").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthenticated"))
    );
    let (status, body) = admin
        .get(As::Basic("alice", "wrong password!"), "/api/overview")
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("bad_credentials"))
    );
    let (status, body) = admin
        .get(As::Bearer("not-a-token-at-all-000"), "/api/overview")
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("bad_credentials"))
    );
    let (status, _) = admin
        .get(As::Basic("viewer", VIEWER_TOKEN), "/api/overview")
        .await;
    assert_eq!(status, 401, "a token is not a password");

    let (status, me) = admin.get(As::Bearer(VIEWER_TOKEN), "/api/session").await;
    assert_eq!(
        (status, me["name"].as_str(), me["role"].as_str()),
        (200, Some("viewer"), Some("read"))
    );
    let (status, body) = admin
        .call(
            As::Bearer(VIEWER_TOKEN),
            "POST",
            "/api/topics/x/pause",
            "{}",
            None,
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );

    // A person signs in with a password: actions need the CSRF token the session hands out.
    let alice = As::Basic(ALICE.0, ALICE.1);
    let (_, me) = admin.get(alice, "/api/session").await;
    let csrf = me["csrf_token"].as_str().expect("a CSRF token").to_string();
    assert_eq!(csrf.len(), 64);
    let (status, body) = admin
        .call(alice, "POST", "/api/topics/x/pause", "{}", None)
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("csrf")),
        "{body}"
    );
    let (status, body) = admin
        .call(
            alice,
            "POST",
            "/api/topics/x/pause",
            "{}",
            Some("0".repeat(64).as_str()),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("csrf")),
        "{body}"
    );
    let (status, body) = admin
        .call(
            alice,
            "POST",
            "/api/topics/x/pause",
            r#"{"reason":"by hand"}"#,
            Some(&csrf),
        )
        .await;
    assert_eq!(
        (status, body["paused"].as_bool()),
        (200, Some(true)),
        "{body}"
    );

    // Scripts with an admin token need no CSRF token.
    assert_eq!(
        admin.ok("/api/topics/x/resume", json!({})).await["resumed"],
        true
    );
    let (status, body) = admin.act("/api/topics/x/resume", json!({})).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));

    // The relay's own endpoints are not behind the admin's accounts.
    assert_eq!(
        http::get(admin.port, "/healthz").await.map(|r| r.0),
        Some(200)
    );
    assert_eq!(
        http::get(admin.port, "/metrics").await.map(|r| r.0),
        Some(200)
    );
    let (status, _) = admin
        .get(As::Bearer(VIEWER_TOKEN), "/api/nothing-here")
        .await;
    assert_eq!(status, 404);

    let (_, audit) = admin.get(As::Bearer(VIEWER_TOKEN), "/api/audit").await;
    let entries: Vec<(String, String, String)> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["actor"].as_str().unwrap().to_string(),
                e["via"].as_str().unwrap().to_string(),
                e["action"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        entries,
        vec![
            ("robot".into(), "http".into(), "topics.resume".into()),
            ("alice".into(), "http".into(), "topics.pause".into()),
        ]
    );
    drop(relay);
    consumer.delete_stream().await;
}

async fn insert_dead(db: &TestDb, id: i64, topic: &str, key: &str) {
    sqlx::query(
        "INSERT INTO outbox.dead_letters
                (id, message_id, topic, key, payload, headers, created_at, attempts, last_error, errors)
         VALUES ($1, 'mid-' || $1, $2, $3, 'dead payload', '{}', now(), 3, 'broker said no',
                 jsonb_build_array(jsonb_build_object('at', now(), 'attempt', 3, 'error', 'broker said no')))",
    )
    .bind(id)
    .bind(topic)
    .bind(key)
    .execute(&db.pool)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_show_retry_purge_release_pause_and_replay() {
    let db = TestDb::new().await;
    let (relay, admin, mut consumer, prefix) = start(&db).await;
    let viewer = As::Bearer(VIEWER_TOKEN);

    // Waiting rows, held by a pause so that they stay to be found.
    admin
        .ok("/api/topics/held/pause", json!({ "reason": "inspect" }))
        .await;
    wait_until(
        Duration::from_secs(30),
        "the relay sees the pause",
        || async {
            http::scrape_metric(admin.port, "outbox_topic_paused", &[("topic", "held")]).await
                == 1.0
        },
    )
    .await;
    sqlx::query(
        "INSERT INTO outbox.messages (topic, key, payload, headers) VALUES
           ('held', 'k1', convert_to('{\"order\":1,\"items\":[\"a\"]}', 'UTF8'), '{\"h\":\"v\"}'),
           ('held', 'k1', '\\x0001ff'::bytea, '{}')",
    )
    .execute(&db.pool)
    .await
    .unwrap();

    let (status, page) = admin
        .get(viewer, "/api/messages?source=waiting&key=k1&limit=1")
        .await;
    assert_eq!(status, 200, "{page}");
    let first = &page["messages"][0];
    assert_eq!(first["payload_bytes"], 3, "newest first: {page}");
    let next = page["next_before_id"].as_i64().expect("a next page");
    let (_, page2) = admin
        .get(
            viewer,
            &format!("/api/messages?source=waiting&key=k1&limit=1&before_id={next}"),
        )
        .await;
    let json_id = page2["messages"][0]["id"].as_i64().unwrap();
    let (_, shown) = admin
        .get(viewer, &format!("/api/messages/waiting/{json_id}"))
        .await;
    assert_eq!(shown["payload"]["encoding"], "json");
    assert!(
        shown["payload"]["text"]
            .as_str()
            .unwrap()
            .contains("\n  \"items\""),
        "{shown}"
    );
    assert_eq!(shown["headers"]["h"], "v");
    let (_, shown) = admin
        .get(viewer, &format!("/api/messages/waiting/{next}"))
        .await;
    assert_eq!(shown["payload"]["encoding"], "hex");
    assert!(
        shown["payload"]["text"]
            .as_str()
            .unwrap()
            .starts_with("00000000  00 01 ff"),
        "{shown}"
    );
    let (_, by_topic) = admin.get(viewer, "/api/messages?topic=held").await;
    assert_eq!(by_topic["messages"].as_array().unwrap().len(), 2);
    assert!(by_topic["next_before_id"].is_null());

    // Bad input says what to fix.
    for (path, status, needle) in [
        ("/api/messages?limit=0", 400, "limit must be between"),
        ("/api/messages?source=elsewhere", 400, "source"),
        ("/api/messages?from=yesterday", 400, "from"),
        ("/api/messages?colour=red", 400, "colour"),
        ("/api/messages/waiting/abc", 400, "must be a number"),
        ("/api/messages/bogus/1", 400, "waiting, dead or sent"),
        ("/api/messages/dead/999999", 404, "no dead message"),
    ] {
        let (got, body) = admin.get(viewer, path).await;
        assert_eq!(got, status, "{path}: {body}");
        assert!(body.to_string().contains(needle), "{path}: {body}");
    }

    // Dead letters: a filter needs the confirmed count; named ids do not.
    for id in [901, 902, 903] {
        insert_dead(&db, id, "revive", "kd").await;
    }
    let (status, body) = admin.act("/api/dead/retry", json!({})).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = admin
        .act("/api/dead/retry", json!({ "topics": ["revive"] }))
        .await;
    assert_eq!(
        (status, body["error"].as_str(), body["count"].as_i64()),
        (409, Some("confirm"), Some(3))
    );
    let dry = admin
        .ok(
            "/api/dead/retry",
            json!({ "topics": ["revive"], "dry_run": true }),
        )
        .await;
    assert_eq!(dry["count"], 3);
    let (status, body) = admin
        .act(
            "/api/dead/retry",
            json!({ "topics": ["revive"], "id_to": 902, "expect": 3 }),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str(), body["count"].as_i64()),
        (409, Some("count_changed"), Some(2))
    );
    let purged = admin.ok("/api/dead/purge", json!({ "ids": [903] })).await;
    assert_eq!(purged["purged"], 1);
    let retried = admin
        .ok(
            "/api/dead/retry",
            json!({ "topics": ["revive"], "expect": 2 }),
        )
        .await;
    assert_eq!(retried["retried"], 2, "{retried}");
    let (status, body) = admin
        .call(
            As::Bearer(ROBOT_TOKEN),
            "POST",
            "/api/dead/purge",
            "{not json",
            None,
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("bad_input")),
        "{body}"
    );

    // Parked keys.
    sqlx::query(
        "INSERT INTO outbox.parked_keys (key, topic, dead_id, message_id, reason)
         VALUES ('kp', 'held', 1, 'mid-1', 'broker said no')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let released = admin
        .ok(
            "/api/keys/release",
            json!({ "keys": ["kp", "never-parked"] }),
        )
        .await;
    assert_eq!(
        released,
        json!({ "released": ["kp"], "not_parked": ["never-parked"] })
    );
    let (status, body) = admin
        .act("/api/keys/skip", json!({ "key": "nobody" }))
        .await;
    assert_eq!(status, 400, "{body}");

    // The overview: topics, the pause, relays with their slots, the lag history.
    wait_until(Duration::from_secs(30), "lag sampled", || async {
        let (_, o) = admin.get(viewer, "/api/overview").await;
        !o["lag_history"].as_array().unwrap().is_empty()
    })
    .await;
    let (_, o) = admin.get(viewer, "/api/overview").await;
    let held = o["topics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["topic"] == "held")
        .unwrap();
    assert_eq!(
        (held["waiting"].as_i64(), held["paused"].as_bool()),
        (Some(2), Some(true)),
        "{o}"
    );
    assert_eq!(o["paused_topics"][0]["reason"], "inspect");
    assert_eq!(o["relays"][0]["slots"], 256, "{o}");
    assert_eq!(o["relays"][0]["can_publish"], true);

    // The pages show the same, escaped, to every account; the assets are embedded.
    insert_dead(&db, 904, "x<b>bold</b>", "kx").await;
    let port = admin.port;
    let page = |path: &'static str| async move {
        http::get_with(
            port,
            &format!("{PREFIX}{path}"),
            &[("Authorization", &format!("Bearer {VIEWER_TOKEN}"))],
        )
        .await
        .unwrap()
    };
    let (status, html) = page("/overview").await;
    assert_eq!(status, 200, "{html}");
    assert!(
        html.contains("held") && html.contains("paused") && html.contains("Relays"),
        "{html}"
    );
    assert!(
        !html.contains("Pause</button>"),
        "a read account gets no action buttons"
    );
    let (status, html) = page("/dead").await;
    assert_eq!(status, 200);
    assert!(
        html.contains("x&lt;b&gt;bold&lt;/b&gt;") && !html.contains("x<b>bold"),
        "{html}"
    );
    let (status, html) = page("/messages/dead/904").await;
    assert_eq!(status, 200);
    assert!(
        html.contains("dead payload") && html.contains("broker said no"),
        "{html}"
    );
    for path in [
        "/keys",
        "/audit",
        "/messages?source=sent",
        "/assets/admin.js",
        "/assets/admin.css",
    ] {
        assert_eq!(page(path).await.0, 200, "{path}");
    }
    assert_eq!(page("/messages/dead/123456789").await.0, 404);
    let (status, html) = http::get(admin.port, &format!("{PREFIX}/overview"))
        .await
        .unwrap();
    assert_eq!(status, 401, "{html}");

    // Resume, deliver, then replay what retention kept.
    admin.ok("/api/topics/held/resume", json!({})).await;
    let got = consumer.collect(4, Duration::from_secs(30)).await;
    assert_eq!(
        got.len(),
        4,
        "two held and two retried: relay stderr:\n{}",
        relay.stderr()
    );
    wait_until(Duration::from_secs(30), "kept as sent", || async {
        admin
            .get(viewer, "/api/messages?source=sent&key=k1")
            .await
            .1["messages"]
            .as_array()
            .unwrap()
            .len()
            == 2
    })
    .await;
    let (status, body) = admin.act("/api/replay", json!({ "topic": "held" })).await;
    assert_eq!(status, 400, "a topic alone is too wide: {body}");
    let (status, body) = admin.act("/api/replay", json!({ "key": "k1" })).await;
    assert_eq!((status, body["count"].as_i64()), (409, Some(2)), "{body}");
    let replayed = admin
        .ok("/api/replay", json!({ "key": "k1", "expect": 2 }))
        .await;
    assert_eq!(replayed["replayed"], 2);
    let again = consumer.collect(2, Duration::from_secs(30)).await;
    assert_eq!(again.len(), 2);
    assert!(again.iter().all(
        |m| m.subject == format!("{prefix}.held") && m.headers.contains_key("outbox-replay-of")
    ));

    let (_, audit) = admin.get(viewer, "/api/audit?limit=3").await;
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["replay", "topics.resume", "keys.release"]);
    consumer.delete_stream().await;
}
