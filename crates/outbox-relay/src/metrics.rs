//! The relay's Prometheus metrics. Every name starts with `outbox_`, uses base units and
//! low-cardinality labels (topic, sink, outcome, error type; never ids or error text), and is
//! updated once per batch. The registry also carries `outbox_build_info` and, on Linux, the
//! standard `process_*` metrics (CPU, memory, file descriptors, start time). The catalogue with
//! meanings and alerts is docs/metrics.md.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub pending_messages: IntGaugeVec,
    pub scheduled_messages: IntGaugeVec,
    pub oldest_pending_age_seconds: GaugeVec,
    pub dead_letters: IntGaugeVec,
    pub published_total: IntCounterVec,
    pub publish_errors_total: IntCounterVec,
    pub retries_total: IntCounterVec,
    pub delivery_latency_seconds: HistogramVec,
    pub batch_size: Histogram,
    pub claim_duration_seconds: Histogram,
    pub mark_duration_seconds: Histogram,
    pub publish_duration_seconds: HistogramVec,
    pub sink_up: IntGaugeVec,
    pub database_up: IntGauge,
    pub in_flight_messages: IntGauge,
    pub unmarked_published_total: IntCounter,
    pub lag_query_duration_seconds: Gauge,
    pub relay_instances: IntGauge,
    /// 1 per topic an operator paused (`outbox-relay topics pause`); the series goes when resumed.
    pub topic_paused: IntGaugeVec,
    /// Always 1, labelled with the relay's version: `count by (version) (outbox_build_info)`.
    pub build_info: IntGaugeVec,
    /// The ordering gauges, registered into the same registry.
    pub ordering: OrderingMetrics,
    /// The storage upkeep's metrics (claim floor, vacuum), registered into the same registry.
    pub storage: StorageMetrics,
    /// Every registered metric name, for the catalogue check (docs/metrics.md).
    pub names: Vec<String>,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let latency_buckets = vec![
            0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            60.0, 300.0,
        ];
        let duration_buckets = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
        ];
        let mut m = Self {
            pending_messages: IntGaugeVec::new(
                opts("outbox_pending_messages", "Outbox rows waiting to be published (including in flight)."),
                &["topic"],
            )
            .unwrap(),
            scheduled_messages: IntGaugeVec::new(
                opts("outbox_scheduled_messages", "Outbox rows delayed or scheduled for a retry that are not due yet (included in outbox_pending_messages)."),
                &["topic"],
            )
            .unwrap(),
            oldest_pending_age_seconds: GaugeVec::new(
                opts("outbox_oldest_pending_age_seconds", "How long the oldest due outbox row has been due: since created_at, or since available_at for a row delayed at enqueue."),
                &["topic"],
            )
            .unwrap(),
            dead_letters: IntGaugeVec::new(
                opts("outbox_dead_letters", "Rows in outbox.dead_letters, awaiting an operator."),
                &["topic"],
            )
            .unwrap(),
            published_total: IntCounterVec::new(
                opts(
                    "outbox_published_total",
                    "Rows handled per outcome: delivered, duplicate, retry, dead, released.",
                ),
                &["topic", "sink", "outcome"],
            )
            .unwrap(),
            publish_errors_total: IntCounterVec::new(
                opts("outbox_publish_errors_total", "Publish failures by error type."),
                &["topic", "sink", "error_type"],
            )
            .unwrap(),
            retries_total: IntCounterVec::new(
                opts("outbox_retries_total", "Rows scheduled for another attempt after a failure."),
                &["topic", "sink"],
            )
            .unwrap(),
            delivery_latency_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "outbox_delivery_latency_seconds",
                    "From the row's created_at to the broker's acknowledgement.",
                )
                .buckets(latency_buckets),
                &["sink"],
            )
            .unwrap(),
            batch_size: Histogram::with_opts(
                HistogramOpts::new("outbox_batch_size", "Rows per claimed batch.").buckets(vec![
                    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
                ]),
            )
            .unwrap(),
            claim_duration_seconds: Histogram::with_opts(
                HistogramOpts::new("outbox_claim_duration_seconds", "Duration of the claim statement.")
                    .buckets(duration_buckets.clone()),
            )
            .unwrap(),
            mark_duration_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "outbox_mark_duration_seconds",
                    "Duration of marking a batch (mark sent, retries, dead letters, commit).",
                )
                .buckets(duration_buckets.clone()),
            )
            .unwrap(),
            publish_duration_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "outbox_publish_duration_seconds",
                    "Duration of publishing one batch to a sink, acknowledgements included.",
                )
                .buckets(duration_buckets),
                &["sink"],
            )
            .unwrap(),
            sink_up: IntGaugeVec::new(opts("outbox_sink_up", "1 when the sink is reachable, 0 when its circuit is open."), &["sink"])
                .unwrap(),
            database_up: IntGauge::with_opts(opts("outbox_database_up", "1 when the relay reaches PostgreSQL.")).unwrap(),
            in_flight_messages: IntGauge::with_opts(opts(
                "outbox_in_flight_messages",
                "Rows claimed and being published but not yet marked: a crash now would re-publish them.",
            ))
            .unwrap(),
            unmarked_published_total: IntCounter::with_opts(opts(
                "outbox_unmarked_published_total",
                "Rows the broker confirmed whose mark failed (they will be published again: duplicates).",
            ))
            .unwrap(),
            lag_query_duration_seconds: Gauge::with_opts(opts(
                "outbox_lag_query_duration_seconds",
                "Duration of the last lag sampling query.",
            ))
            .unwrap(),
            relay_instances: IntGauge::with_opts(opts(
                "outbox_relay_instances",
                "Relays whose heartbeat in outbox.relays is fresher than cluster.relay_expiry_secs, this one included.",
            ))
            .unwrap(),
            topic_paused: IntGaugeVec::new(
                opts("outbox_topic_paused", "1 while an operator has paused the topic: no relay claims its rows."),
                &["topic"],
            )
            .unwrap(),
            build_info: IntGaugeVec::new(
                opts("outbox_build_info", "Always 1; the labels say which relay build runs."),
                &["version"],
            )
            .unwrap(),
            ordering: OrderingMetrics::new(&registry).expect("ordering metric names are unique"),
            storage: StorageMetrics::new(&registry).expect("storage metric names are unique"),
            names: Vec::new(),
            registry,
        };
        let r = &m.registry;
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.pending_messages.clone()),
            Box::new(m.scheduled_messages.clone()),
            Box::new(m.oldest_pending_age_seconds.clone()),
            Box::new(m.dead_letters.clone()),
            Box::new(m.published_total.clone()),
            Box::new(m.publish_errors_total.clone()),
            Box::new(m.retries_total.clone()),
            Box::new(m.delivery_latency_seconds.clone()),
            Box::new(m.batch_size.clone()),
            Box::new(m.claim_duration_seconds.clone()),
            Box::new(m.mark_duration_seconds.clone()),
            Box::new(m.publish_duration_seconds.clone()),
            Box::new(m.sink_up.clone()),
            Box::new(m.database_up.clone()),
            Box::new(m.in_flight_messages.clone()),
            Box::new(m.unmarked_published_total.clone()),
            Box::new(m.lag_query_duration_seconds.clone()),
            Box::new(m.relay_instances.clone()),
            Box::new(m.topic_paused.clone()),
            Box::new(m.build_info.clone()),
            #[cfg(target_os = "linux")]
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ];
        let mut names = Vec::new();
        for c in collectors {
            names.extend(c.desc().iter().map(|d| d.fq_name.clone()));
            r.register(c).expect("metric names are unique");
        }
        m.names = names;
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        m
    }

    /// The text exposition format for `/metrics`.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// The ordering gauges (docs/ordering.md).
pub struct OrderingMetrics {
    pub partitions_owned: IntGauge,
    pub held_back_keys: IntGaugeVec,
    pub parked_keys: IntGaugeVec,
    pub rounds: IntGauge,
}

impl OrderingMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            partitions_owned: IntGauge::with_opts(Opts::new(
                "outbox_partitions_owned",
                "Ordering slots (of 256) this relay holds a lease on.",
            ))?,
            held_back_keys: IntGaugeVec::new(
                Opts::new(
                    "outbox_held_back_keys",
                    "Keys whose oldest message waits for a retry, holding back the later messages of the key.",
                ),
                &["topic"],
            )?,
            parked_keys: IntGaugeVec::new(
                Opts::new("outbox_parked_keys", "Keys parked after a dead letter, waiting for an operator."),
                &["topic"],
            )?,
            rounds: IntGauge::with_opts(Opts::new(
                "outbox_ordering_rounds_last_batch",
                "Publish rounds the last ordered batch needed (its most repeated key).",
            ))?,
        };
        registry.register(Box::new(m.partitions_owned.clone()))?;
        registry.register(Box::new(m.held_back_keys.clone()))?;
        registry.register(Box::new(m.parked_keys.clone()))?;
        registry.register(Box::new(m.rounds.clone()))?;
        Ok(m)
    }
}

/// The storage upkeep (docs/architecture.md, "Storage under a held xmin horizon").
pub struct StorageMetrics {
    pub claim_floor: IntGauge,
    pub claim_floor_gap_ids: IntGauge,
    pub claim_floor_stalled_seconds: Gauge,
    pub vacuums_total: IntCounterVec,
}

impl StorageMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            claim_floor: IntGauge::with_opts(Opts::new(
                "outbox_claim_floor",
                "The claim floor: the id from which claims scan for fresh rows.",
            ))?,
            claim_floor_gap_ids: IntGauge::with_opts(Opts::new(
                "outbox_claim_floor_gap_ids",
                "Ids handed out at or above the claim floor: the most rows (live or deleted) a claim may walk.",
            ))?,
            claim_floor_stalled_seconds: Gauge::with_opts(Opts::new(
                "outbox_claim_floor_stalled_seconds",
                "How long the oldest transaction that keeps the claim floor from rising (one that inserted into outbox.messages) has been open; 0 while the floor rises.",
            ))?,
            vacuums_total: IntCounterVec::new(
                Opts::new(
                    "outbox_vacuums_total",
                    "VACUUMs of the outbox tables the relay ran itself because autovacuum is off, by result (done, skipped_locked, failed).",
                ),
                &["result"],
            )?,
        };
        registry.register(Box::new(m.claim_floor.clone()))?;
        registry.register(Box::new(m.claim_floor_gap_ids.clone()))?;
        registry.register(Box::new(m.claim_floor_stalled_seconds.clone()))?;
        registry.register(Box::new(m.vacuums_total.clone()))?;
        Ok(m)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
