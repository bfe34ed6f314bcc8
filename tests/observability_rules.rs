//! The operator files in deploy/ and docs/metrics.md, checked without a running relay:
//! `promtool check rules`, `promtool test rules` (deploy/prometheus/alerts_test.yml),
//! `promtool check config`, every alert's runbook section in docs/operations.md, the
//! dashboard's structure, variables and provisioning, and the metrics catalogue naming every
//! metric the relay registers.

mod support;

use std::process::Command;

use support::observability::*;

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let Some(promtool) = require_tool(
        "promtool",
        "PROMTOOL_BIN",
        "alert_rules_pass_promtool_check_and_unit_tests",
    ) else {
        return;
    };
    let (ok, out) = run(Command::new(&promtool)
        .arg("check")
        .arg("rules")
        .arg(deploy("prometheus/alerts.yml")));
    assert!(ok, "promtool check rules failed:\n{out}");
    assert!(
        out.contains("SUCCESS: 8 rules found"),
        "expected the 7 alert rules:\n{out}"
    );

    let (ok, out) = run(Command::new(&promtool)
        .arg("test")
        .arg("rules")
        .arg("alerts_test.yml")
        .current_dir(deploy("prometheus")));
    assert!(ok, "promtool test rules failed:\n{out}");
    assert!(out.contains("SUCCESS"), "{out}");

    let (ok, out) = run(Command::new(&promtool)
        .arg("check")
        .arg("config")
        .arg(deploy("prometheus/prometheus.yml")));
    assert!(ok, "promtool check config failed:\n{out}");
}

#[test]
fn rule_unit_tests_catch_a_broken_rule() {
    // The unit tests are not vacuous: with a threshold changed they fail.
    let Some(promtool) = require_tool(
        "promtool",
        "PROMTOOL_BIN",
        "rule_unit_tests_catch_a_broken_rule",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let alerts = std::fs::read_to_string(deploy("prometheus/alerts.yml")).unwrap();
    let broken = alerts.replace(
        "outbox_oldest_pending_age_seconds) > 300",
        "outbox_oldest_pending_age_seconds) > 3000",
    );
    assert_ne!(alerts, broken, "the lag threshold moved: update this test");
    std::fs::write(dir.path().join("alerts.yml"), broken).unwrap();
    std::fs::copy(
        deploy("prometheus/alerts_test.yml"),
        dir.path().join("alerts_test.yml"),
    )
    .unwrap();
    let (ok, out) = run(Command::new(&promtool)
        .arg("test")
        .arg("rules")
        .arg("alerts_test.yml")
        .current_dir(dir.path()));
    assert!(
        !ok && out.contains("OutboxLagTooOld"),
        "a broken rule must fail its unit test:\n{out}"
    );
}

#[test]
fn dashboard_is_provisioned_and_every_panel_has_a_query() {
    let raw = std::fs::read_to_string(deploy("grafana/dashboards/outbox-relay.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&raw).expect("dashboard is JSON");
    assert_eq!(dashboard["uid"], "outbox-relay");
    // Variables: topic and relay (instance), each with All.
    let variables: Vec<(&str, &str)> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap(),
                v["query"]["query"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        variables,
        [
            ("topic", "label_values(outbox_pending_messages, topic)"),
            (
                "instance",
                "label_values(up{job=\"outbox-relay\"}, instance)"
            )
        ]
    );
    let queries = dashboard_queries(&with_all_relays(&dashboard), "1m");
    let all = queries
        .iter()
        .map(|(_, q)| q.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    // The panels the operators asked for.
    for needle in [
        "outbox_pending_messages",
        "outbox_oldest_pending_age_seconds",
        "outbox_published_total",
        "histogram_quantile(0.5, sum by (sink, le) (rate(outbox_delivery_latency_seconds_bucket",
        "histogram_quantile(0.99, sum by (sink, le) (rate(outbox_delivery_latency_seconds_bucket",
        "outbox_publish_errors_total",
        "outbox_dead_letters",
        "outbox_sink_up",
        "outbox_relay_instances",
        "max by (topic) (outbox_held_back_keys",
        "max by (topic) (outbox_parked_keys",
        "max by (instance) (outbox_partitions_owned",
        // Slots held by relays that cannot publish (every sink down): 0 when none, not absent.
        "sum(max by (instance) (outbox_partitions_owned) * (max by (instance) (outbox_sink_up) == bool 0))",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "outbox_build_info",
    ] {
        assert!(all.contains(needle), "no dashboard query uses {needle}");
    }
    // Per-relay panels follow the relay variable.
    for (title, q) in &queries {
        if q.contains("outbox_sink_up{") || q.contains("outbox_published_total") {
            assert!(
                q.contains("instance=~\".*\""),
                "panel {title:?} ignores the relay variable: {q}"
            );
        }
    }
    // Every panel and target uses the provisioned datasource.
    let ds =
        std::fs::read_to_string(deploy("grafana/provisioning/datasources/prometheus.yml")).unwrap();
    assert!(
        ds.contains("uid: prometheus"),
        "the datasource must be provisioned with uid prometheus"
    );
    for p in dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] != "row")
    {
        assert_eq!(p["datasource"]["uid"], "prometheus", "panel {}", p["title"]);
        for t in p["targets"].as_array().unwrap() {
            assert_eq!(t["datasource"]["uid"], "prometheus", "panel {}", p["title"]);
        }
    }
    let provider =
        std::fs::read_to_string(deploy("grafana/provisioning/dashboards/outbox-relay.yml"))
            .unwrap();
    let compose = std::fs::read_to_string(repo_root().join("docker-compose.yml")).unwrap();
    assert!(provider.contains("path: /var/lib/grafana/dashboards"));
    // docs/operations.md says an admin can edit and save the dashboard.
    assert!(
        provider.contains("allowUiUpdates: true"),
        "the provisioned dashboard must be savable from the UI"
    );
    assert!(compose.contains("./deploy/grafana/dashboards:/var/lib/grafana/dashboards"));
    assert!(compose.contains("./deploy/grafana/provisioning:/etc/grafana/provisioning"));
    assert!(compose.contains("./deploy/prometheus:/etc/prometheus"));
}

#[test]
fn metrics_catalogue_documents_every_metric() {
    let doc = std::fs::read_to_string(repo_root().join("docs/metrics.md")).unwrap();
    let metrics = outbox_relay::metrics::Metrics::new();
    assert!(metrics.names.len() >= 17, "{:?}", metrics.names);
    // The ordering metrics live in their own struct, registered into the same registry.
    use prometheus::core::Collector;
    let ordering =
        outbox_relay::metrics::OrderingMetrics::new(&prometheus::Registry::new()).unwrap();
    let descs = [
        ordering.partitions_owned.desc(),
        ordering.held_back_keys.desc(),
        ordering.parked_keys.desc(),
        ordering.rounds.desc(),
    ];
    let ordering_names: Vec<String> = descs
        .iter()
        .flat_map(|d| d.iter().map(|d| d.fq_name.clone()))
        .collect();
    assert_eq!(ordering_names.len(), 4);
    for name in metrics.names.iter().chain(&ordering_names) {
        assert!(
            doc.contains(&format!("`{name}`")),
            "docs/metrics.md does not document `{name}`"
        );
    }
}

#[test]
fn alert_probes_drop_thresholds_and_absent() {
    assert_eq!(
        alert_probes("max by (topic) (outbox_oldest_pending_age_seconds) > 300"),
        ["max by (topic) (outbox_oldest_pending_age_seconds)"]
    );
    assert_eq!(
        alert_probes("max by (topic) (deriv(x[15m])) > 0\nand max by (topic) (x) > 1000"),
        ["max by (topic) (deriv(x[15m]))", "max by (topic) (x)"]
    );
    assert_eq!(
        alert_probes("sum(up{job=\"outbox-relay\"}) == 0 or absent(up{job=\"outbox-relay\"})"),
        ["sum(up{job=\"outbox-relay\"})"]
    );
    assert_eq!(alert_probes("x{a!=\"b\"} >= bool 1"), ["x{a!=\"b\"}"]);
    // Keywords inside label values or function arguments are not operators.
    assert_eq!(
        alert_probes("count(x{topic=\"a or b\"}) > 1"),
        ["count(x{topic=\"a or b\"})"]
    );
}

/// The dashboard with its relay variable set to All, as [`dashboard_queries`] sets the topic.
fn with_all_relays(dashboard: &serde_json::Value) -> serde_json::Value {
    serde_json::from_str(&dashboard.to_string().replace("$instance", ".*")).unwrap()
}

/// GitHub's anchor of a Markdown heading: lower case, spaces to dashes, punctuation dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn every_alert_has_a_runbook_url_naming_a_section_of_operations_md() {
    let alerts = std::fs::read_to_string(deploy("prometheus/alerts.yml")).unwrap();
    let doc = std::fs::read_to_string(repo_root().join("docs/operations.md")).unwrap();
    let anchors: Vec<String> = doc
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| anchor(l.trim_start_matches('#')))
        .collect();
    // (alert, its runbook_url), in file order.
    let mut rules: Vec<(String, Option<String>)> = Vec::new();
    for line in alerts.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("- alert: ") {
            rules.push((name.to_string(), None));
        } else if let Some(url) = line.strip_prefix("runbook_url: ") {
            let last = rules.last_mut().expect("runbook_url inside a rule");
            assert!(last.1.is_none(), "alert {} has two runbook_urls", last.0);
            last.1 = Some(url.trim_matches('"').to_string());
        }
    }
    assert_eq!(rules.len(), 8, "{rules:?}");
    for (alert, url) in &rules {
        let url = url
            .as_deref()
            .unwrap_or_else(|| panic!("alert {alert} has no runbook_url"));
        let section = url.strip_prefix("docs/operations.md#").unwrap_or_else(|| {
            panic!("alert {alert}: runbook_url {url} is not a section of docs/operations.md")
        });
        assert_eq!(section, anchor(alert), "alert {alert}: runbook_url {url}");
        assert!(
            anchors.iter().any(|a| a == section),
            "alert {alert}: docs/operations.md has no heading with the anchor #{section}"
        );
    }
}

#[test]
fn metrics_include_build_info_and_process_metrics() {
    let text = outbox_relay::metrics::Metrics::new().render();
    let build = format!(
        "outbox_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    assert!(text.contains(&build), "no {build} in:\n{text}");
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "no {name} in:\n{text}"
        );
    }
}

#[test]
fn the_sample_relay_config_has_all_three_sinks_and_compose_runs_the_relay_with_it() {
    use outbox_relay::config::Config;
    let config = Config::load(Some(&repo_root().join("deploy/relay.toml")))
        .unwrap_or_else(|e| panic!("deploy/relay.toml is not a valid config: {e}"));
    let kinds: Vec<&str> = config.sinks.values().map(|s| s.kind()).collect();
    for kind in ["nats", "amqp", "kafka"] {
        assert!(
            kinds.contains(&kind),
            "deploy/relay.toml has no {kind} sink: {kinds:?}"
        );
    }
    assert_eq!(
        config.http.listen, "0.0.0.0:9187",
        "compose's healthcheck and Prometheus use :9187"
    );
    let compose = std::fs::read_to_string(repo_root().join("docker-compose.yml")).unwrap();
    for needle in [
        "./deploy/relay.toml:/etc/outbox-relay/relay.toml:ro",
        "OUTBOX_CONFIG: /etc/outbox-relay/relay.toml",
        // The Kafka topic the sample routes to, created before the relay starts.
        "\"--topic\", \"payments\"",
        "kafka-init: { condition: service_completed_successfully }",
        "rabbitmq-init: { condition: service_completed_successfully }",
        "http://127.0.0.1:9187/readyz",
    ] {
        assert!(
            compose.contains(needle),
            "docker-compose.yml lacks {needle}"
        );
    }
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    assert!(
        dockerfile.contains("HEALTHCHECK"),
        "the image has no health check"
    );
    // The packages installed: only what the rdkafka features need (no cmake, no libsasl2).
    let installs: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.contains("apt-get install"))
        .collect();
    assert_eq!(installs.len(), 2, "{installs:?}");
    for line in installs {
        assert!(
            !line.contains("libsasl2") && !line.contains("cmake"),
            "the image installs what the rdkafka features do not use: {line}"
        );
    }
}
