//! The relay process: binds HTTP first, connects to PostgreSQL (retrying), builds the sinks and
//! the pipeline, and runs the workers, the wake-up listener, the cluster heartbeat and the
//! maintenance tasks until shutdown; then lets in-flight batches finish, bounded by
//! `relay.shutdown_timeout_secs`, and leaves the cluster.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::cluster::{Context, Member};
use crate::config::Config;
use crate::http::HttpState;
use crate::metrics::Metrics;
use crate::pipeline::dispatch::Dispatcher;
use crate::pipeline::{worker, Pipeline};
use crate::redact::redact_url;
use crate::wakeup::{self, Wakeup};
use crate::{http, maintenance, store};

/// Connects to PostgreSQL, retrying with exponential backoff (logged) until it answers or
/// `shutdown` fires (then `None`).
pub async fn connect_with_retry(config: &Config, shutdown: &CancellationToken) -> Option<PgPool> {
    let mut delay = Duration::from_millis(200);
    loop {
        match store::connect(
            &config.database,
            config.database.max_connections,
            Duration::from_secs(config.relay.claim_timeout_secs),
        )
        .await
        {
            Ok(pool) => return Some(pool),
            Err(e) => {
                tracing::error!(
                    database = %redact_url(&config.database.url),
                    error = %e,
                    fix = crate::error::connect_advice(&e),
                    retry_in_ms = delay.as_millis() as u64,
                    "cannot reach PostgreSQL; retrying"
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return None,
                }
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Runs the relay until `shutdown` fires, then lets in-flight batches finish (bounded by
/// `relay.shutdown_timeout_secs`).
pub async fn run(config: Config, shutdown: CancellationToken) -> crate::Result<()> {
    for warning in &config.deprecations {
        tracing::warn!("{warning}");
    }
    let metrics = Arc::new(Metrics::new());
    let http_state = HttpState::new(Arc::clone(&metrics));
    let admin = config
        .admin
        .enabled
        .then(|| crate::admin::AdminState::new(&config.admin));
    let http_task = if config.http.listen.is_empty() {
        None
    } else {
        let listener = http::bind(&config.http).await?;
        let admin_routes = admin.as_ref().map(|a| {
            (
                config.admin.path_prefix.clone(),
                crate::admin::router(Arc::clone(a)),
            )
        });
        Some(tokio::spawn(http::serve(
            listener,
            Arc::clone(&http_state),
            admin_routes,
            shutdown.clone(),
        )))
    };
    let result = async {
        let Some(pool) = connect_with_retry(&config, &shutdown).await else {
            return Ok(());
        };
        let result = async {
            store::check_schema(&pool).await?;
            store::privileges::check_relay(&pool, "outbox-relay run").await?;
            if !store::autovacuum_on(&pool).await {
                // Every outbox row is inserted once and deleted once: without vacuum the table
                // and its indexes only grow.
                if config.relay.vacuum_when_autovacuum_off {
                    tracing::warn!(
                        "autovacuum is off on this PostgreSQL server: the relay vacuums the outbox \
                         tables itself (relay.vacuum_when_autovacuum_off); the application's own \
                         tables still need it"
                    );
                } else {
                    tracing::warn!(
                        "autovacuum is off on this PostgreSQL server and relay.vacuum_when_autovacuum_off \
                         is false: outbox.messages will grow without bound; turn either on, or run \
                         VACUUM outbox.messages regularly"
                    );
                }
            }
            let relay = Relay::build(&config, pool.clone(), metrics, shutdown.clone()).await?;
            http_state.set_running(pool.clone(), Arc::clone(&relay.dispatcher));
            if let Some(admin) = &admin {
                admin.set_running(pool.clone(), shutdown.clone());
            }
            relay.run().await;
            Ok(())
        }
        .await;
        // Bounded: a connection still held by an abandoned batch must not keep the process alive.
        let _ = tokio::time::timeout(Duration::from_secs(2), pool.close()).await;
        result
    }
    .await;
    if let Some(task) = http_task {
        if result.is_err() {
            task.abort();
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }
    result
}

/// A relay assembled on a connected pool; [`Relay::run`] runs it.
pub struct Relay {
    config: Config,
    pool: PgPool,
    metrics: Arc<Metrics>,
    wakeup: Arc<Wakeup>,
    dispatcher: Arc<Dispatcher>,
    pipeline: Arc<Pipeline>,
    member: Arc<Member>,
    floor: Arc<store::floor::Shared>,
    shutdown: CancellationToken,
}

impl Relay {
    /// Builds the sinks (without waiting for brokers), the pipeline and the cluster membership.
    /// `shutdown` stops what the relay starts, the sinks' breaker probes included.
    pub async fn build(
        config: &Config,
        pool: PgPool,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> crate::Result<Self> {
        let wakeup = Wakeup::new();
        let dispatcher = Dispatcher::build(
            config,
            Arc::clone(&metrics),
            Arc::clone(&wakeup),
            shutdown.clone(),
        )
        .await?;
        let member = Arc::new(Member::new(config.cluster.clone(), config.ordering.enabled));
        let floor = Arc::new(store::floor::Shared::default());
        floor.set(store::floor::read(&pool).await?);
        let pipeline = Arc::new(Pipeline::new(
            config,
            pool.clone(),
            Arc::clone(&dispatcher),
            member.slots.clone(),
            Arc::clone(&floor),
            Arc::clone(&metrics),
            Arc::clone(&wakeup),
        ));
        metrics.database_up.set(1);
        Ok(Self {
            config: config.clone(),
            pool,
            metrics,
            wakeup,
            dispatcher,
            pipeline,
            member,
            floor,
            shutdown,
        })
    }

    /// Runs until the shutdown token given to [`Relay::build`] fires, then finishes in-flight
    /// batches (bounded by `relay.shutdown_timeout_secs`) and leaves the cluster.
    pub async fn run(self) {
        let shutdown = self.shutdown.clone();
        let cfg = &self.config.relay;
        let workers = cfg.workers as usize;
        let cluster = Context {
            pool: self.pool.clone(),
            dispatcher: Arc::clone(&self.dispatcher),
            metrics: Arc::clone(&self.metrics),
            wakeup: Arc::clone(&self.wakeup),
            gauges_every: Duration::from_secs(cfg.lag_interval_secs),
        };
        cluster.load_pauses().await;
        let heartbeat = self.member.spawn(cluster, shutdown.clone());
        self.dispatcher.check_all().await;
        let excluded: wakeup::Excluded = {
            let dispatcher = Arc::clone(&self.dispatcher);
            Arc::new(move || dispatcher.excluded_topics())
        };
        let scope = wakeup::PollScope {
            excluded,
            floor: Arc::clone(&self.floor),
        };
        let listener = tokio::spawn(Arc::clone(&self.wakeup).run(
            self.pool.clone(),
            cfg.clone(),
            workers,
            scope,
            shutdown.clone(),
        ));
        let maintenance =
            maintenance::spawn_all(&self.pool, &self.metrics, cfg, &self.floor, &shutdown);
        let handles: Vec<_> = (0..workers)
            .map(|w| tokio::spawn(worker::run(Arc::clone(&self.pipeline), w, shutdown.clone())))
            .collect();
        let sinks: Vec<&str> = self
            .dispatcher
            .sinks()
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        // Each sink logged its broker, routes and stream or exchanges when it was built.
        tracing::info!(
            workers,
            batch_size = cfg.batch_size,
            ordering = self.config.ordering.enabled,
            database = %redact_url(&self.config.database.url),
            sinks = %sinks.join(","),
            "relay running"
        );

        shutdown.cancelled().await;
        tracing::info!("shutting down: no new claims; finishing in-flight batches");
        let deadline = Duration::from_secs(cfg.shutdown_timeout_secs);
        let aborts: Vec<_> = handles.iter().map(|h| h.abort_handle()).collect();
        if tokio::time::timeout(deadline, futures::future::join_all(handles))
            .await
            .is_err()
        {
            tracing::warn!(
                timeout_secs = deadline.as_secs(),
                "in-flight batches did not finish in time; abandoning them: their claim transactions roll back, the rows are released and will be published again"
            );
            // Dropping a batch mid-flight drops its transaction: PostgreSQL rolls it back.
            aborts.iter().for_each(|a| a.abort());
        }
        // The background tasks saw the same cancellation; they get one shared 2 s grace (not 2 s
        // each), so the exit comes at most about 2 s after the shutdown deadline.
        let background = async {
            let _ = heartbeat.await;
            // Free this relay's slots now rather than at lease expiry.
            self.member.leave(&self.pool, &self.metrics).await;
            let _ = listener.await;
            futures::future::join_all(maintenance).await;
        };
        if tokio::time::timeout(Duration::from_secs(2), background)
            .await
            .is_err()
        {
            tracing::warn!("background tasks did not stop within 2 s; exiting without them");
        }
        tracing::info!("stopped");
    }
}
