//! The operator files in deploy/ and docs/metrics.md, checked without a running relay:
//! `promtool check rules`, `promtool test rules` (deploy/prometheus/alerts_test.yml),
//! `promtool check config`, the dashboard's structure and provisioning, and the metrics
//! catalogue naming every metric the relay registers.

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
        out.contains("SUCCESS: 6 rules found"),
        "expected the 6 alert rules:\n{out}"
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
    let queries = dashboard_queries(&dashboard, "1m");
    let all = queries
        .iter()
        .map(|(_, q)| q.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    // The panels the issue asks for.
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
    ] {
        assert!(all.contains(needle), "no dashboard query uses {needle}");
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
