//! The claim floor (docs/architecture.md, "Storage under a held xmin horizon"), against a real
//! database: it rises past deleted rows, never past a row an open transaction may still commit,
//! set-aside rows below it (delayed, retried, re-inserted by `dead retry`) are still claimed,
//! the ordered claim still sees them as the head of their key, and an unsafe sequence turns it
//! off.

mod support;

use outbox_client::{enqueue_many, Message};
use outbox_relay::store;
use outbox_relay::store::floor::{Horizon, Step};
use sqlx::{Connection, PgConnection};
use support::*;

/// Advances the floor until a step raises it, starting from a fresh horizon; returns the floor.
/// Bounded: a step that waits would wait for ever here, so it fails the test instead.
async fn raise(conn: &mut PgConnection) -> i64 {
    let mut pending: Option<Horizon> = None;
    for _ in 0..3 {
        match store::floor::advance(conn, pending.as_ref()).await.unwrap() {
            Step::Noted(h) => pending = Some(h),
            Step::Raised { floor, .. } => return floor,
            other => panic!("the floor did not rise: {other:?}"),
        }
    }
    panic!("no step raised the floor")
}

async fn enqueue(db: &TestDb, topic: &str, key: Option<&str>, n: usize) -> Vec<i64> {
    let batch: Vec<Message> = (0..n)
        .map(|i| {
            let m = Message::bytes(topic, format!("{topic}-{i}").into_bytes());
            match key {
                Some(k) => m.key(k),
                None => m,
            }
        })
        .collect();
    let mut conn = db.pool.acquire().await.unwrap();
    let ids = enqueue_many(&mut conn, &batch).await.unwrap();
    ids.into_iter().map(|e| e.id).collect()
}

/// Schedules row `id` for a retry an hour ahead, as a failed attempt does.
async fn retry_in_an_hour(db: &TestDb, id: i64) {
    let mut tx = db.pool.begin().await.unwrap();
    let row = lock_rows(&mut tx, &[id]).await.remove(0);
    store::schedule_retries(
        &mut tx,
        &[store::Retry {
            row,
            delay: std::time::Duration::from_secs(3600),
            error: "broker down".into(),
        }],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

async fn delete_all(db: &TestDb) {
    sqlx::query("DELETE FROM outbox.messages")
        .execute(&db.pool)
        .await
        .unwrap();
}

async fn claim_ids(db: &TestDb, floor: i64) -> Vec<i64> {
    let mut tx = db.pool.begin().await.unwrap();
    let rows = store::claim(&mut tx, 100, &[], floor).await.unwrap();
    tx.rollback().await.unwrap();
    rows.into_iter().map(|r| r.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_floor_rises_past_deleted_rows_and_the_claim_starts_there() {
    let db = TestDb::new().await;
    let mut conn = db.pool.acquire().await.unwrap().detach();
    enqueue(&db, "f.x", None, 200).await;
    delete_all(&db).await;
    let live = enqueue(&db, "f.x", None, 5).await;

    let floor = raise(&mut conn).await;
    assert_eq!(floor, live[0], "the floor is the oldest live row");
    assert_eq!(store::floor::read(&db.pool).await.unwrap(), floor);
    assert_eq!(claim_ids(&db, floor).await, live);
    assert!(store::any_available(&db.pool, &[], floor).await.unwrap());

    // Nothing left: the floor goes just past the last id handed out.
    delete_all(&db).await;
    let floor = raise(&mut conn).await;
    assert_eq!(floor, live[4] + 1);
    assert!(!store::any_available(&db.pool, &[], floor).await.unwrap());
    let next = enqueue(&db, "f.x", None, 1).await;
    assert_eq!(claim_ids(&db, floor).await, next);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_enqueue_keeps_the_floor_below_its_row_until_it_commits() {
    let db = TestDb::new().await;
    let mut conn = db.pool.acquire().await.unwrap().detach();
    // A transaction takes an id and stays open; later rows commit and are delivered (deleted).
    let mut open = PgConnection::connect(&db.url).await.unwrap();
    let mut open_tx = open.begin().await.unwrap();
    let late: i64 = sqlx::query_scalar(
        "INSERT INTO outbox.messages (topic, payload) VALUES ('f.x', 'late') RETURNING id",
    )
    .fetch_one(&mut *open_tx)
    .await
    .unwrap();
    let after = enqueue(&db, "f.x", None, 50).await;
    assert!(after[0] > late);
    delete_all(&db).await;

    // Noted while the transaction is open: the next step must wait for it.
    let Step::Noted(h) = store::floor::advance(&mut conn, None).await.unwrap() else {
        panic!("the first step notes a horizon")
    };
    assert!(h.last_id >= after[49]);
    assert!(
        !h.writers.is_empty(),
        "the open enqueue holds a lock on outbox.messages"
    );
    for _ in 0..3 {
        match store::floor::advance(&mut conn, Some(&h)).await.unwrap() {
            Step::Waiting { oldest_writer_secs } => assert!(oldest_writer_secs >= 0.0),
            other => panic!("the floor moved while a row below it may commit: {other:?}"),
        }
    }
    let floor = store::floor::read(&db.pool).await.unwrap();
    assert!(floor <= late, "floor {floor} passed the open row {late}");

    open_tx.commit().await.unwrap();
    let Step::Raised { floor, .. } = store::floor::advance(&mut conn, Some(&h)).await.unwrap()
    else {
        panic!("the floor rises once the transaction has ended")
    };
    assert_eq!(floor, late, "the late row is the oldest live row");
    assert_eq!(claim_ids(&db, floor).await, vec![late]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_aside_rows_below_the_floor_are_claimed_when_due() {
    let db = TestDb::new().await;
    let mut conn = db.pool.acquire().await.unwrap().detach();
    // A delayed row and a retried row, then fresh rows that are delivered.
    let delayed: i64 = sqlx::query_scalar(
        "SELECT id FROM outbox.enqueue('f.x', 'later'::bytea, p_available_at => now() + interval '1 hour')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let retried = enqueue(&db, "f.x", None, 1).await[0];
    retry_in_an_hour(&db, retried).await;
    let fresh = enqueue(&db, "f.x", None, 20).await;
    sqlx::query("DELETE FROM outbox.messages WHERE id = ANY($1)")
        .bind(&fresh)
        .execute(&db.pool)
        .await
        .unwrap();

    let floor = raise(&mut conn).await;
    assert!(
        floor > fresh[19],
        "set-aside rows do not hold the floor down (floor {floor})"
    );
    assert!(claim_ids(&db, floor).await.is_empty(), "nothing is due yet");
    assert!(!store::any_available(&db.pool, &[], floor).await.unwrap());

    // Both become due (still set aside: available_at > created_at).
    sqlx::query("UPDATE outbox.messages SET available_at = created_at + interval '1 millisecond'")
        .execute(&db.pool)
        .await
        .unwrap();
    assert!(store::any_available(&db.pool, &[], floor).await.unwrap());
    let mut got = claim_ids(&db, floor).await;
    got.sort();
    assert_eq!(got, vec![delayed, retried]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_retried_below_the_floor_is_claimed() {
    let db = TestDb::new().await;
    let mut conn = db.pool.acquire().await.unwrap().detach();
    let ids = enqueue(&db, "f.x", Some("k"), 3).await;
    let mut tx = db.pool.begin().await.unwrap();
    let head = lock_rows(&mut tx, &ids[..1]).await;
    store::dead_letter(&mut tx, &head, &["rejected".to_string()])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    sqlx::query("DELETE FROM outbox.messages")
        .execute(&db.pool)
        .await
        .unwrap();
    let floor = raise(&mut conn).await;
    assert!(floor > ids[2]);

    let report = store::dead::retry(
        &mut db.pool.acquire().await.unwrap(),
        &store::dead::DeadFilter::default(),
        None,
    )
    .await
    .unwrap();
    assert_eq!(report.len(), 1);
    assert_eq!(claim_ids(&db, floor).await, vec![ids[0]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ordered_claim_sees_a_set_aside_row_below_the_floor_as_its_keys_head() {
    let db = TestDb::new().await;
    let mut conn = db.pool.acquire().await.unwrap().detach();
    let all: Vec<i16> = (0..store::SLOTS as i16).collect();
    // Key k: its first row is retried (set aside), then fresh rows are delivered, then more
    // rows of k and of another key arrive above the floor.
    let head = enqueue(&db, "f.x", Some("k"), 1).await[0];
    retry_in_an_hour(&db, head).await;
    let gone = enqueue(&db, "f.x", None, 20).await;
    sqlx::query("DELETE FROM outbox.messages WHERE id = ANY($1)")
        .bind(&gone)
        .execute(&db.pool)
        .await
        .unwrap();
    let floor = raise(&mut conn).await;
    assert!(floor > head);
    let k_later = enqueue(&db, "f.x", Some("k"), 2).await;
    let other = enqueue(&db, "f.x", Some("other"), 2).await;

    let ordered = |db: &TestDb| {
        let pool = db.pool.clone();
        let all = all.clone();
        async move {
            let mut tx = pool.begin().await.unwrap();
            let rows = store::claim_ordered(&mut tx, 100, &[], &all, floor)
                .await
                .unwrap();
            let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
            (tx, ids)
        }
    };
    // Not due: its key is held back, the other key goes.
    let (tx, ids) = ordered(&db).await;
    tx.rollback().await.unwrap();
    assert_eq!(ids, other, "key k is held back behind its retried head");

    // Due, but in flight elsewhere (locked): key k is still held back.
    sqlx::query("UPDATE outbox.messages SET available_at = created_at + interval '1 millisecond' WHERE id = $1")
        .bind(head)
        .execute(&db.pool)
        .await
        .unwrap();
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM outbox.messages WHERE id = $1 FOR UPDATE")
        .bind(head)
        .execute(&mut *holder)
        .await
        .unwrap();
    let (tx, ids) = ordered(&db).await;
    tx.rollback().await.unwrap();
    assert_eq!(
        ids, other,
        "a locked head below the floor holds its key back"
    );
    // Excluding another topic takes the per-topic form: the same rule.
    let mut tx = db.pool.begin().await.unwrap();
    let rows = store::claim_ordered(&mut tx, 100, &["g.x".to_string()], &all, floor)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(rows.iter().map(|r| r.id).collect::<Vec<_>>(), other);
    holder.rollback().await.unwrap();

    // Free: the whole key, head first.
    let (tx, ids) = ordered(&db).await;
    tx.rollback().await.unwrap();
    let mut expected = vec![head, k_later[0], k_later[1], other[0], other[1]];
    expected.sort();
    assert_eq!(ids, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_sequence_turns_the_floor_off() {
    let db = TestDb::new().await;
    let mut conn = db.pool.acquire().await.unwrap().detach();
    enqueue(&db, "f.x", None, 10).await;
    delete_all(&db).await;
    let floor = raise(&mut conn).await;
    assert!(floor > 0);
    sqlx::query("ALTER TABLE outbox.messages ALTER COLUMN id SET CACHE 20")
        .execute(&db.pool)
        .await
        .unwrap();
    match store::floor::advance(&mut conn, None).await.unwrap() {
        Step::Unsafe { reason } => assert!(reason.contains("CACHE 20"), "{reason}"),
        other => panic!("a cached sequence must turn the floor off: {other:?}"),
    }
    assert_eq!(store::floor::read(&db.pool).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_read_only_transaction_does_not_hold_the_floor_and_ids_stay_idempotent_below_it() {
    let db = TestDb::new().await;
    let mut conn = db.pool.acquire().await.unwrap().detach();
    // A report in REPEATABLE READ that has read the outbox: it holds the xmin horizon (vacuum
    // may not remove what is deleted after it), not the floor.
    let mut report = PgConnection::connect(&db.url).await.unwrap();
    let mut report_tx = report.begin().await.unwrap();
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *report_tx)
        .await
        .unwrap();
    sqlx::query("SELECT count(*) FROM outbox.messages")
        .execute(&mut *report_tx)
        .await
        .unwrap();
    // A delayed row (set aside) with a known message id, then rows delivered after it.
    let kept: i64 = sqlx::query_scalar(
        "SELECT id FROM outbox.enqueue('f.x', 'later'::bytea, p_message_id => 'kept-1',
                                       p_available_at => now() + interval '1 hour')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    enqueue(&db, "f.x", None, 100).await;
    sqlx::query("DELETE FROM outbox.messages WHERE id > $1")
        .bind(kept)
        .execute(&db.pool)
        .await
        .unwrap();
    let floor = raise(&mut conn).await;
    assert!(floor > kept + 100, "the floor rose past the deleted rows");

    // Enqueueing the kept message id again finds the row below the floor.
    let (id, inserted): (i64, bool) = sqlx::query_as(
        "SELECT id, inserted FROM outbox.enqueue('f.x', 'again'::bytea, p_message_id => 'kept-1')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((id, inserted), (kept, false));
    report_tx.rollback().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relays_vacuum_skips_a_conflicting_lock_and_blocks_no_enqueue_or_claim() {
    use outbox_relay::store::vacuum::{vacuum, Vacuumed};
    let db = TestDb::new().await;
    // A session holds a lock that conflicts with VACUUM's (as another VACUUM, an ANALYZE or an
    // index build would).
    let mut holder = PgConnection::connect(&db.url).await.unwrap();
    let mut holder_tx = holder.begin().await.unwrap();
    sqlx::query("LOCK TABLE outbox.messages IN SHARE UPDATE EXCLUSIVE MODE")
        .execute(&mut *holder_tx)
        .await
        .unwrap();
    let mut conn = db.pool.acquire().await.unwrap().detach();
    let vacuuming = tokio::spawn(async move { vacuum(&mut conn).await });
    // Enqueue and claim meanwhile: neither conflicts with the lock nor with the waiting VACUUM.
    let ids = enqueue(&db, "f.x", None, 3).await;
    assert_eq!(claim_ids(&db, 0).await, ids);
    assert_eq!(vacuuming.await.unwrap().unwrap(), Vacuumed::SkippedLocked);
    holder_tx.rollback().await.unwrap();
    let mut conn = db.pool.acquire().await.unwrap().detach();
    assert_eq!(vacuum(&mut conn).await.unwrap(), Vacuumed::Done);
}
