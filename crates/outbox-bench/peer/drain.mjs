// The peer of outbox-bench's `peer` scenario: graphile-worker draining no-op jobs.
//
// Installed by the bench, with the package.json and package-lock.json beside it, into a cache
// directory of its own (see crates/outbox-bench/src/scenarios/peer.rs); the bench loads the
// jobs and vacuums the table itself, then runs this script.
//
//   node drain.mjs migrate                      graphile-worker's migrations (runMigrations)
//   node drain.mjs drain JOBS CONCURRENCY LOCAL_QUEUE
//                                               drains JOBS queued `noop` jobs, prints JSON
//
// The database is PEER_DATABASE_URL (never on the command line, where `ps` would show a
// password). Only errors and warnings are logged (to stderr); stdout carries the result:
// {"jobs", "secs", "startup_secs", "jobs_per_sec", "concurrency", "max_pool_size", "version"}.
//
// The clock starts at the first completed job (start-up, reported as startup_secs, is left
// out, as the bench does for the relay) and stops when graphile_worker._private_jobs is empty:
// a job is deleted by its completion, which graphile-worker writes after the `job:complete`
// event, so the table is polled once every job has completed.

import { EventEmitter } from "node:events";
import { readFileSync } from "node:fs";
import { performance } from "node:perf_hooks";

import { Logger, makeWorkerUtils, run, runMigrations } from "graphile-worker";

const connectionString = process.env.PEER_DATABASE_URL;
if (!connectionString) {
  console.error("PEER_DATABASE_URL is not set");
  process.exit(2);
}

const logger = new Logger(() => (level, message) => {
  if (level === "error" || level === "warning") {
    console.error(`graphile-worker ${level}: ${message}`);
  }
});

const version = JSON.parse(
  readFileSync(
    new URL("./node_modules/graphile-worker/package.json", import.meta.url),
  ),
).version;

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function drain(jobs, concurrency, localQueue) {
  // graphile-worker's advice for the pool: `concurrentJobs + 2` connections.
  const maxPoolSize = concurrency + 2;
  const utils = await makeWorkerUtils({ connectionString, logger });
  const waiting = () =>
    utils.withPgClient(async (client) => {
      const { rows } = await client.query(
        "SELECT count(*)::int AS n FROM graphile_worker._private_jobs",
      );
      return rows[0].n;
    });
  const queued = await waiting();
  if (queued !== jobs) {
    throw new Error(`expected ${jobs} queued jobs, found ${queued}`);
  }

  let completed = 0;
  let failed = 0;
  let first = null;
  let allCompleted;
  const done = new Promise((resolve) => (allCompleted = resolve));
  const events = new EventEmitter();
  events.on("job:complete", ({ error }) => {
    completed += 1;
    if (error) failed += 1;
    if (first === null) first = performance.now();
    if (completed >= jobs || failed > 0) allCompleted();
  });

  const started = performance.now();
  // graphile-worker's batching, its documented mode for throughput (its performance page):
  // jobs fetched LOCAL_QUEUE at a time (the relay's batch size) and completions written
  // together. With its defaults (one fetch and one completion statement per job) it drained
  // about 1,500 jobs/s on the reference machine, a tenth of what it can do. LISTEN/NOTIFY,
  // prepared statements and the poll interval stay at its defaults.
  const runner = await run({
    connectionString,
    concurrency,
    maxPoolSize,
    noHandleSignals: true,
    logger,
    events,
    taskList: { noop: async () => {} },
    preset: {
      worker: {
        localQueue: { size: localQueue },
        completeJobBatchDelay: 0,
        failJobBatchDelay: 0,
      },
    },
  });
  await Promise.race([
    done,
    runner.promise.then(() => {
      throw new Error(`graphile-worker stopped after ${completed} of ${jobs} jobs`);
    }),
  ]);
  if (failed > 0) {
    await runner.stop();
    await utils.release();
    throw new Error(`${failed} no-op job(s) failed`);
  }
  let end;
  for (;;) {
    const left = await waiting();
    end = performance.now();
    if (left === 0) break;
    await sleep(10);
  }
  await runner.stop();
  await utils.release();
  const secs = Math.max((end - first) / 1000, 1e-6);
  // Jobs done after the first completion, over the time since it.
  return {
    jobs,
    secs,
    startup_secs: (first - started) / 1000,
    jobs_per_sec: (jobs - 1) / secs,
    concurrency,
    local_queue: localQueue,
    max_pool_size: maxPoolSize,
    version,
  };
}

const [mode, ...args] = process.argv.slice(2);
try {
  if (mode === "migrate") {
    await runMigrations({ connectionString, logger });
  } else if (mode === "drain") {
    const [jobs, concurrency, localQueue] = args.map((a) => Number.parseInt(a, 10));
    if (!(jobs > 0 && concurrency > 0 && localQueue > 0)) {
      throw new Error("usage: drain.mjs drain JOBS CONCURRENCY LOCAL_QUEUE");
    }
    process.stdout.write(
      JSON.stringify(await drain(jobs, concurrency, localQueue)) + "\n",
    );
  } else {
    throw new Error(`unknown mode ${mode}: migrate or drain`);
  }
} catch (e) {
  console.error(e instanceof Error ? (e.stack ?? e.message) : String(e));
  process.exit(1);
}
