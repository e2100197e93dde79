//! The provisioner's journal on the local cloud's PostgreSQL: an instruction id acts once, the
//! per-database sequence fence supersedes stale instructions, and concurrent deliveries of one
//! message (two replicas during a rebalance) still record exactly one effect, and a replica whose
//! lease ran out writes nothing.

use anyhow::Result;
use qdb_proto::v1::Phase;
use qdb_provisioner::gossip::{Subject, event};
use qdb_provisioner::journal::{
    Accepted, NewInstruction, Next, SUCCESSOR, State, accept, enqueue, finish, next, prune, record_applied,
};
use qdb_tests::{Cloud, unique};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use std::time::Duration;

async fn pool() -> Result<PgPool> {
    let cloud = Cloud::load()?;
    let pool = PgPoolOptions::new().max_connections(4).connect(&cloud.database_url).await?;
    sqlx::migrate!("../migrations").run(&pool).await?;
    Ok(pool)
}

fn ins<'a>(id: &'a str, db: &'a str, sequence: i64) -> NewInstruction<'a> {
    NewInstruction {
        id,
        database_id: db,
        cluster: "region-a",
        sequence,
        operation: "create",
        payload: b"bytes",
        source_partition: Some(0),
        source_offset: Some(sequence),
    }
}

fn accepted(i: &NewInstruction<'_>) -> qdb_provisioner::journal::Outgoing {
    let subject =
        Subject { instruction_id: i.id.into(), database_id: i.database_id.into(), ..Default::default() };
    event(&subject, Phase::Accepted, "", "", None)
}

async fn accept_committed(pool: &PgPool, i: &NewInstruction<'_>) -> Result<Accepted> {
    let mut tx = pool.begin().await?;
    let outcome = accept(&mut tx, i, &accepted(i)).await?;
    tx.commit().await?;
    Ok(outcome)
}

async fn queued(pool: &PgPool, db: &str) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM outbox WHERE database_id = $1")
        .bind(db)
        .fetch_one(pool)
        .await?)
}

async fn states(pool: &PgPool, db: &str) -> Result<Vec<(i64, String)>> {
    Ok(sqlx::query_as(
        "SELECT sequence, state FROM instructions WHERE database_id = $1 ORDER BY sequence, id",
    )
    .bind(db)
    .fetch_all(pool)
    .await?)
}

#[tokio::test]
async fn an_instruction_id_acts_once() -> Result<()> {
    let pool = pool().await?;
    let db = unique("db");
    let id = unique("ins");
    assert_eq!(accept_committed(&pool, &ins(&id, &db, 1)).await?, Accepted::New);
    assert_eq!(queued(&pool, &db).await?, 1, "the accepted event is queued with the instruction");
    let Accepted::Duplicate(recorded) = accept_committed(&pool, &ins(&id, &db, 1)).await? else {
        panic!("a redelivery must be recognised");
    };
    assert_eq!(recorded.state, State::Pending);
    assert_eq!(states(&pool, &db).await?, vec![(1, "pending".to_string())]);
    assert_eq!(
        queued(&pool, &db).await?,
        1,
        "a duplicate is not accepted again (intake announces its record)"
    );
    Ok(())
}

#[tokio::test]
async fn stale_sequences_are_superseded() -> Result<()> {
    let pool = pool().await?;
    let db = unique("db");
    let (a, b, c, d) = (unique("a"), unique("b"), unique("c"), unique("d"));
    assert_eq!(accept_committed(&pool, &ins(&a, &db, 5)).await?, Accepted::New);
    assert_eq!(accept_committed(&pool, &ins(&b, &db, 3)).await?, Accepted::Stale { last_sequence: 5 });
    assert_eq!(accept_committed(&pool, &ins(&c, &db, 5)).await?, Accepted::Stale { last_sequence: 5 });
    assert_eq!(accept_committed(&pool, &ins(&d, &db, 9)).await?, Accepted::New);
    let reason: String =
        sqlx::query_scalar("SELECT reason FROM instructions WHERE id = $1").bind(&b).fetch_one(&pool).await?;
    assert_eq!(reason, "STALE_SEQUENCE");
    assert_eq!(
        states(&pool, &db).await?,
        vec![
            (3, "superseded".into()),
            (5, "pending".into()),
            (5, "superseded".into()),
            (9, "pending".into())
        ]
    );
    assert_eq!(queued(&pool, &db).await?, 2, "only the new instructions are announced as accepted here");
    Ok(())
}

#[tokio::test]
async fn concurrent_deliveries_record_one_effect() -> Result<()> {
    let pool = pool().await?;
    let db = unique("db");
    let id = unique("ins");
    let runs = (0..8).map(|_| {
        let (pool, db, id) = (pool.clone(), db.clone(), id.clone());
        tokio::spawn(async move { accept_committed(&pool, &ins(&id, &db, 1)).await })
    });
    let mut new = 0;
    for run in runs {
        match run.await?? {
            Accepted::New => new += 1,
            Accepted::Duplicate(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(new, 1);
    assert_eq!(states(&pool, &db).await?.len(), 1);
    assert_eq!(queued(&pool, &db).await?, 1, "one accepted event");
    Ok(())
}

/// What `claim` does for one database, without taking other databases' work.
async fn hold(pool: &PgPool, db: &str, owner: &str, secs: f64) -> Result<()> {
    sqlx::query("UPDATE databases SET lease_owner = $2, lease_until = now() + make_interval(secs => $3) WHERE database_id = $1")
        .bind(db)
        .bind(owner)
        .bind(secs)
        .execute(pool)
        .await?;
    Ok(())
}

/// Before leases fenced the journal, a replica that stalled past its lease (paused mid-apply)
/// still recorded its result over the work of the replica that took over.
#[tokio::test]
async fn a_replica_whose_lease_ran_out_writes_nothing() -> Result<()> {
    let pool = pool().await?;
    let db = unique("db");
    let id = unique("ins");
    assert_eq!(accept_committed(&pool, &ins(&id, &db, 1)).await?, Accepted::New);
    let short = std::time::Duration::from_secs(1);
    hold(&pool, &db, "replica-a", 1.0).await?;
    assert!(
        matches!(next(&pool, "replica-a", &db, short).await?, Next::Apply(..)),
        "a live lease is renewed"
    );
    tokio::time::sleep(std::time::Duration::from_millis(1300)).await;
    assert_eq!(
        next(&pool, "replica-a", &db, short).await?,
        Next::LeaseLost,
        "a lease that ran out is not renewed"
    );
    hold(&pool, &db, "replica-b", 60.0).await?;

    let subject = Subject { instruction_id: id.clone(), database_id: db.clone(), ..Default::default() };
    let applied = event(&subject, Phase::Applied, "", "applied", None);
    let deadline = std::time::Duration::from_secs(60);
    assert_eq!(record_applied(&pool, "replica-a", &id, Some(1), deadline, None, &applied).await?, None);
    let mut tx = pool.begin().await?;
    let refused = [applied.clone()];
    assert!(
        !finish(&mut *tx, Some("replica-a"), &id, State::Rejected, "REFUSED_BY_CLUSTER", "stale", &refused)
            .await?
    );
    tx.commit().await?;
    assert_eq!(
        states(&pool, &db).await?,
        vec![(1, "pending".to_string())],
        "nothing written without the lease"
    );
    let queued: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE database_id = $1 AND payload = $2")
            .bind(&db)
            .bind(&applied.payload)
            .fetch_one(&pool)
            .await?;
    assert_eq!(queued, 0, "no gossip from the replica without the lease");

    assert!(record_applied(&pool, "replica-b", &id, Some(1), deadline, None, &applied).await?.is_some());
    assert_eq!(next(&pool, "replica-a", &db, short).await?, Next::LeaseLost, "the lease is replica-b's");
    assert_eq!(next(&pool, "replica-b", &db, short).await?, Next::Released, "nothing more is due");
    assert_eq!(states(&pool, &db).await?, vec![(1, "applied".to_string())]);
    Ok(())
}

async fn lease_of(pool: &PgPool, db: &str) -> Result<(Option<String>, bool)> {
    Ok(sqlx::query_as("SELECT lease_owner, lease_until > now() + interval '30 seconds' FROM databases WHERE database_id = $1")
        .bind(db)
        .fetch_one(pool)
        .await
        .map(|(owner, long): (Option<String>, Option<bool>)| (owner, long.unwrap_or(false)))?)
}

/// A worker's step is one statement (renew the lease, read the next due instruction, or give
/// the lease back when nothing is due), where it was three; what each answer means is kept.
#[tokio::test]
async fn the_next_step_renews_the_lease_or_gives_it_back_when_nothing_is_due() -> Result<()> {
    let pool = pool().await?;
    let db = unique("db");
    let (first, second) = (unique("ins"), unique("ins"));
    assert_eq!(accept_committed(&pool, &ins(&first, &db, 1)).await?, Accepted::New);
    assert_eq!(accept_committed(&pool, &ins(&second, &db, 2)).await?, Accepted::New);
    hold(&pool, &db, "replica-a", 5.0).await?;
    let lease = Duration::from_secs(60);
    let Next::Apply(head, known) = next(&pool, "replica-a", &db, lease).await? else {
        panic!("the first instruction is due");
    };
    assert_eq!((head.id.as_str(), head.sequence, known), (first.as_str(), 1, None), "lowest sequence first");
    assert_eq!(lease_of(&pool, &db).await?, (Some("replica-a".into()), true), "renewed for the full lease");

    let subject = Subject { instruction_id: first.clone(), database_id: db.clone(), ..Default::default() };
    let applied = event(&subject, Phase::Applied, "", "applied", None);
    let recorded = record_applied(&pool, "replica-a", &first, Some(1), lease, None, &applied).await?;
    assert_eq!(recorded.map(|r| r.earlier_waiting), Some(false), "nothing earlier waits for its outcome");
    let Next::Apply(head, _) = next(&pool, "replica-a", &db, lease).await? else {
        panic!("the second instruction is due");
    };
    assert_eq!(head.id, second);
    assert_eq!(next(&pool, "replica-b", &db, lease).await?, Next::LeaseLost, "replica-a holds it");
    let recorded = record_applied(&pool, "replica-a", &second, Some(2), lease, None, &applied).await?;
    assert_eq!(recorded.map(|r| r.earlier_waiting), Some(true), "the first still waits for its outcome");
    let third = unique("ins");
    assert_eq!(accept_committed(&pool, &ins(&third, &db, 3)).await?, Accepted::New);
    let Next::Apply(head, _) = next(&pool, "replica-a", &db, lease).await? else {
        panic!("the third instruction is due");
    };
    assert_eq!(head.id, third);

    // A failed apply waits for its retry: nothing is due, so the lease goes back at once.
    sqlx::query("UPDATE instructions SET next_attempt_at = now() + interval '1 hour' WHERE id = $1")
        .bind(&third)
        .execute(&pool)
        .await?;
    assert_eq!(next(&pool, "replica-a", &db, lease).await?, Next::Released);
    assert_eq!(lease_of(&pool, &db).await?, (None, false), "free for any replica");
    assert_eq!(
        next(&pool, "replica-a", &db, lease).await?,
        Next::LeaseLost,
        "given back means no longer held"
    );
    assert_eq!(
        states(&pool, &db).await?,
        vec![(1, "applied".to_string()), (2, "applied".to_string()), (3, "pending".to_string())]
    );
    Ok(())
}

/// Ending an instruction and queueing what announces it is one statement: both happen, once, or
/// neither.
#[tokio::test]
async fn an_instruction_ends_once_with_its_announcements() -> Result<()> {
    let pool = pool().await?;
    let db = unique("db");
    let id = unique("ins");
    assert_eq!(accept_committed(&pool, &ins(&id, &db, 1)).await?, Accepted::New);
    let subject = Subject { instruction_id: id.clone(), database_id: db.clone(), ..Default::default() };
    let mut copy = event(&subject, Phase::Rejected, "BAD", "dead letter", None);
    copy.topic = qdb_provisioner::journal::Topic::DeadLetter;
    copy.key = None;
    let announce = [event(&subject, Phase::Rejected, "BAD", "rejected", None), copy];
    assert!(finish(&pool, None, &id, State::Rejected, "BAD", "rejected", &announce).await?);
    assert!(!finish(&pool, None, &id, State::Failed, "LATE", "again", &announce).await?, "already ended");
    let queued: Vec<(String, Option<Vec<u8>>, Vec<u8>)> = sqlx::query_as(
        "SELECT topic, key, payload FROM outbox WHERE database_id = $1 AND topic IN ('dlq', 'gossip') ORDER BY id",
    )
    .bind(&db)
    .fetch_all(&pool)
    .await?;
    let expected: Vec<_> =
        announce.iter().map(|o| (o.topic.as_str().to_string(), o.key.clone(), o.payload.clone())).collect();
    assert_eq!(queued.len(), 3, "the accepted event, then both announcements, once");
    assert_eq!(queued[0].0, "gossip", "the accepted event first");
    assert_eq!(queued[1..], expected[..], "both announcements, once");
    assert_eq!(states(&pool, &db).await?, vec![(1, "rejected".to_string())]);
    Ok(())
}

/// The drainers' lock is taken in the statement that reads the outbox: a transaction that does
/// not get it reads nothing, not even a row it queued itself.
#[tokio::test]
async fn an_outbox_batch_is_read_only_under_the_drainers_lock() -> Result<()> {
    let pool = pool().await?;
    // A lock key of this test's own: the provisioners of tests running beside it use DRAIN_LOCK.
    let key = 0x71db_7e57;
    let mut holder = pool.begin().await?;
    let held: bool =
        sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)").bind(key).fetch_one(&mut *holder).await?;
    assert!(held);
    let mut other = pool.begin().await?;
    let subject = Subject { instruction_id: unique("ins"), database_id: unique("db"), ..Default::default() };
    enqueue(&mut other, &event(&subject, Phase::Accepted, "", "", None)).await?;
    let batch = qdb_provisioner::journal::outbox_batch(&mut other, key, 100_000).await?;
    assert!(batch.is_empty(), "read {} rows without the lock", batch.len());
    other.rollback().await?;
    holder.rollback().await?;
    Ok(())
}

/// Issue 17 (housekeeping): finished instructions leave the journal after the retention, open
/// ones never do, and the sequence fence stays, so a message redelivered after its row went is
/// stale, not applied again.
#[tokio::test]
async fn finished_instructions_are_pruned_after_the_retention_and_their_replay_stays_stale() -> Result<()> {
    let pool = pool().await?;
    let db = unique("db");
    let (done, open) = (unique("done"), unique("open"));
    assert_eq!(accept_committed(&pool, &ins(&done, &db, 1)).await?, Accepted::New);
    assert_eq!(accept_committed(&pool, &ins(&open, &db, 2)).await?, Accepted::New);
    let mut conn = pool.acquire().await?;
    assert!(finish(&mut *conn, None, &done, State::Succeeded, "", "", &[]).await?);
    drop(conn);
    let hour = std::time::Duration::from_secs(3600);
    // Finished a minute ago: kept.
    prune(&pool, hour, 5000).await?;
    assert_eq!(states(&pool, &db).await?, vec![(1, "succeeded".to_string()), (2, "pending".to_string())]);
    // Finished two hours ago (and an open one as old): only the finished one goes.
    sqlx::query(
        "UPDATE instructions SET finished_at = now() - interval '2 hours', received_at = now() - interval '2 hours'
         WHERE database_id = $1",
    )
    .bind(&db)
    .execute(&pool)
    .await?;
    assert!(prune(&pool, hour, 5000).await? >= 1);
    assert_eq!(states(&pool, &db).await?, vec![(2, "pending".to_string())]);
    assert_eq!(
        accept_committed(&pool, &ins(&done, &db, 1)).await?,
        Accepted::Stale { last_sequence: 2 },
        "a replay of a pruned instruction is stopped by the fence"
    );
    Ok(())
}

/// A replica frozen (SIGSTOP, a long GC-like pause, a stalled VM) inside a transaction holds
/// its locks for as long as it is frozen: the outbox drain lock among them, which silenced every
/// replica's gossip until the frozen one woke (`faults::a_replica_frozen_mid_apply_past_its_
/// lease_cannot_land_an_older_spec` failed on it about one run in four). The provisioner's
/// sessions cut off a transaction left idle past their limit, so the lock frees.
#[tokio::test]
async fn a_transaction_left_idle_by_a_frozen_replica_frees_its_locks() -> Result<()> {
    let cloud = Cloud::load()?;
    let frozen = qdb_provisioner::journal::connect(&cloud.database_url, 1, Duration::from_secs(2)).await?;
    let other = pool().await?;
    let mut tx = frozen.begin().await?;
    let held: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(qdb_provisioner::outbox::DRAIN_LOCK)
        .fetch_one(&mut *tx)
        .await?;
    assert!(held);
    let start = std::time::Instant::now();
    loop {
        let mut probe = other.begin().await?;
        let free: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(qdb_provisioner::outbox::DRAIN_LOCK)
            .fetch_one(&mut *probe)
            .await?;
        probe.rollback().await?;
        if free {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "the idle transaction still holds the lock");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The frozen replica's work in that transaction is gone, not half-done: its commit fails.
    assert!(tx.commit().await.is_err(), "a cut-off transaction must not commit");
    Ok(())
}

/// Finding the instruction that superseded another reads only its database's rows: before the
/// index on (database_id, sequence) it read the whole journal, finished rows included (a
/// sequential scan, 1.7 ms at 2,400 rows, and the retention keeps days of them).
#[tokio::test]
async fn finding_a_successor_reads_one_databases_rows_through_an_index() -> Result<()> {
    let pool = pool().await?;
    let mut tx = pool.begin().await?;
    let (db, others) = (unique("db"), unique("other"));
    for k in 0..3000 {
        let id = format!("{others}-{k}");
        let of = format!("{others}-{}", k % 300);
        let i = ins(&id, &of, 1 + k / 300);
        accept(&mut tx, &i, &accepted(&i)).await?;
        finish(&mut *tx, None, &id, State::Succeeded, "", "", &[]).await?;
    }
    let id = unique("ins");
    let i = ins(&id, &db, 1);
    accept(&mut tx, &i, &accepted(&i)).await?;
    sqlx::query("ANALYZE instructions").execute(&mut *tx).await?;
    let plan: serde_json::Value =
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN (FORMAT JSON) {SUCCESSOR}")))
            .bind(&db)
            .bind(1i64)
            .bind(None::<i64>)
            .fetch_one(&mut *tx)
            .await?;
    tx.rollback().await?;
    let plan = plan.to_string();
    anyhow::ensure!(!plan.contains("Seq Scan"), "the successor query scans the whole journal: {plan}");
    Ok(())
}
