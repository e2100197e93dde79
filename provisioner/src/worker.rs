//! Workers: apply pending instructions, one database at a time per replica (its lease), in
//! sequence order, databases in parallel up to a bound. The journal is the queue, so nothing
//! waits in memory and a replica that dies leaves its work to the others.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use kube::api::{DeleteParams, Patch, PatchParams};
use qdb_crd::{PROVISIONER_MANAGER, QuestDB, QuestDBSpec, keys};
use qdb_proto::Message;
use qdb_proto::v1::{self, Phase};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::Shared;
use crate::clusters::Cluster;
use crate::gossip::{self, Source, Subject};
use crate::journal::{self, JournalError, Next, Open, State};
use crate::mapping::{self, Action, MapError};

/// The resource that reflects `instruction`: its spec, and which instruction wrote it.
pub fn build_resource(instruction: &v1::Instruction, spec: QuestDBSpec) -> QuestDB {
    let mut qdb = QuestDB::new(&instruction.database_id, spec);
    qdb.metadata.labels = Some(
        [
            (keys::DATABASE.to_string(), instruction.database_id.clone()),
            (keys::MANAGED_BY.to_string(), PROVISIONER_MANAGER.to_string()),
        ]
        .into(),
    );
    qdb.metadata.annotations = Some(
        [
            (keys::INSTRUCTION_ID.to_string(), instruction.instruction_id.clone()),
            (keys::INSTRUCTION_SEQUENCE.to_string(), instruction.sequence.to_string()),
        ]
        .into(),
    );
    qdb
}

/// The body the provisioner applies for `instruction`: the one place it is built, so the
/// property test (tests/tests/provisioner_outcomes.rs) applies exactly what the worker does.
/// An emptied server config is left out, never sent as `{}`: server-side apply then removes the
/// keys this manager owned, whereas `{}` after owned keys leaves the map null, which the schema
/// refuses (`spec.serverConfig: Invalid value: "null"`, seen on Kubernetes 1.37).
pub fn apply_body(instruction: &v1::Instruction, spec: QuestDBSpec) -> serde_json::Value {
    serde_json::to_value(build_resource(instruction, spec)).unwrap_or_default()
}

/// The wait before the next attempt after `attempts` failed ones: exponential with jitter.
pub fn retry_delay(attempts: i32, max: Duration) -> Duration {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(max)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
        .nth(usize::try_from(attempts).unwrap_or(0))
        .unwrap_or(max)
}

/// Why the cluster will not take a write, whatever the number of tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The object itself was refused (schema, CEL rule, admission) although the provisioner
    /// validated it first: the provisioner's own bug, not the user's.
    SpecRefused,
    /// This provisioner's identity may not do it (RBAC).
    Forbidden,
    /// The credentials were not accepted.
    Unauthorized,
    /// The cluster lacks what the write needs: the QuestDB CRD or the namespace.
    NotSetUp,
    /// The resource already reflects a later instruction of the database (the cluster's
    /// sequence policy, deploy/crd/sequence-policy.yaml): this one came too late, which is
    /// neither the user's mistake nor a provisioner bug.
    StaleSequence,
    /// Any other refusal the apiserver means as final (413, 405, ...).
    Other,
}

/// What the cluster's sequence policy says when it refuses an older spec (its messageExpression).
const STALE_SEQUENCE_MESSAGE: &str = "stale instruction sequence";

impl Refusal {
    /// The machine-readable gossip reason.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::SpecRefused => "SPEC_REFUSED_BY_CLUSTER",
            Refusal::Forbidden => "FORBIDDEN",
            Refusal::Unauthorized => "UNAUTHORIZED",
            Refusal::NotSetUp => "CLUSTER_NOT_SET_UP",
            Refusal::StaleSequence => "STALE_SEQUENCE",
            Refusal::Other => "CLUSTER_REFUSED_REQUEST",
        }
    }
}

/// Whether an apiserver answer of `code` is final (Some) or worth another try (None): conflicts,
/// throttling, timeouts and server errors pass; a refusal of the request itself does not.
/// `message` is the apiserver's, which tells the sequence policy's refusal from a spec's.
pub fn refusal(code: u16, message: &str) -> Option<Refusal> {
    match code {
        400 | 422 if message.contains(STALE_SEQUENCE_MESSAGE) => Some(Refusal::StaleSequence),
        400 | 422 => Some(Refusal::SpecRefused),
        401 => Some(Refusal::Unauthorized),
        403 => Some(Refusal::Forbidden),
        404 => Some(Refusal::NotSetUp),
        408 | 409 | 425 | 429 => None,
        400..=499 => Some(Refusal::Other),
        _ => None,
    }
}

#[derive(Debug, thiserror::Error)]
enum ExecError {
    /// The instruction cannot apply to the resource as it is: terminal, the user's to fix.
    #[error(transparent)]
    Rejected(#[from] MapError),
    /// The cluster will never take this write: terminal, failed at once.
    #[error("{verb}: the cluster refused it ({code}): {message}")]
    Refused { verb: &'static str, refusal: Refusal, code: u16, message: String },
    /// Worth another try later: the cluster is unreachable, busy or the resource is changing.
    #[error("{what}")]
    Transient { what: String, source: Option<kube::Error> },
}

impl ExecError {
    fn is_authorization_refusal(&self) -> bool {
        matches!(self, ExecError::Refused { refusal: Refusal::Forbidden | Refusal::Unauthorized, .. })
    }
}

fn kube_error(verb: &'static str, e: kube::Error) -> ExecError {
    match &e {
        kube::Error::Api(status) => match refusal(status.code, &status.message) {
            Some(refusal) => {
                ExecError::Refused { verb, refusal, code: status.code, message: status.message.clone() }
            }
            None => ExecError::Transient { what: format!("{verb} failed"), source: Some(e) },
        },
        _ => ExecError::Transient { what: format!("{verb} failed"), source: Some(e) },
    }
}

/// What an apply left on the cluster.
struct Applied {
    generation: Option<i64>,
    qdb: Option<QuestDB>,
    /// The spec now on the cluster (None after a delete).
    spec: Option<QuestDBSpec>,
}

fn deleting(qdb: &QuestDB) -> Result<(), ExecError> {
    if qdb.metadata.deletion_timestamp.is_some() {
        return Err(ExecError::Transient {
            what: "the database is still being deleted".into(),
            source: None,
        });
    }
    Ok(())
}

/// Another database's resource (a create's clone source): from the watch cache once it is
/// synced, else from the cluster.
async fn resource(ctx: &Shared, cluster: &Cluster, name: &str) -> Result<Option<QuestDB>, ExecError> {
    if let Some(view) = ctx.views.get(&cluster.name).filter(|v| v.is_synced()) {
        return Ok(view.get(name).map(|q| (*q).clone()));
    }
    let fetched = cluster.questdbs().get_opt(name).await;
    ctx.metrics.kube(&cluster.name, "get", fetched.is_ok());
    fetched.map_err(|e| kube_error("get", e))
}

/// The current spec of the resource, None if it does not exist. The provisioner is the only
/// writer of spec, so the spec it last applied (journal) is the truth while the resource exists;
/// existence comes from the watch cache, and only when that cannot tell is the cluster asked.
async fn current_spec(
    ctx: &Shared,
    cluster: &Cluster,
    ins: &v1::Instruction,
    known: Option<QuestDBSpec>,
) -> Result<Option<QuestDBSpec>, ExecError> {
    let name = &ins.database_id;
    let view = ctx.views.get(&cluster.name).filter(|v| v.is_synced());
    if let Some(cached) = view.and_then(|v| v.get(name)) {
        deleting(&cached)?;
        return Ok(Some(known.unwrap_or_else(|| cached.spec.clone())));
    }
    let is_create = matches!(ins.operation, Some(v1::instruction::Operation::Create(_)));
    if is_create && view.is_some() && known.is_none() {
        return Ok(None);
    }
    let fetched = cluster.questdbs().get_opt(name).await;
    ctx.metrics.kube(&cluster.name, "get", fetched.is_ok());
    match fetched.map_err(|e| kube_error("get", e))? {
        Some(q) => {
            deleting(&q)?;
            Ok(Some(known.unwrap_or(q.spec)))
        }
        None => Ok(None),
    }
}

/// [`execute`], with an authorization refusal final only when a ready apiserver gave it: one that
/// has just started answers 403 until it has loaded its roles (seen for a second or more after a
/// restart, with `/readyz` failing `poststarthook/rbac/bootstrap-roles`), and how long that takes
/// is the cluster's, not a number of tries. Once `/readyz` passes, one more try tells.
async fn execute_confirmed(
    ctx: &Shared,
    cluster: &Cluster,
    ins: &v1::Instruction,
    known: Option<QuestDBSpec>,
) -> Result<Applied, ExecError> {
    match execute(ctx, cluster, ins, known.clone()).await {
        Err(e) if e.is_authorization_refusal() => match cluster.readiness().await {
            Ok(()) => execute(ctx, cluster, ins, known).await,
            Err(why) => Err(ExecError::Transient {
                what: format!("{e}; not final: the apiserver is not ready ({why})"),
                source: None,
            }),
        },
        other => other,
    }
}

async fn execute(
    ctx: &Shared,
    cluster: &Cluster,
    ins: &v1::Instruction,
    known: Option<QuestDBSpec>,
) -> Result<Applied, ExecError> {
    let api = cluster.questdbs();
    let name = &ins.database_id;
    let current = current_spec(ctx, cluster, ins, known).await?;
    let resolved = match mapping::clone_of(ins) {
        Some(source) => {
            let source = resource(ctx, cluster, source).await?;
            Some(mapping::resolve_clone(ins, current.as_ref(), source.as_ref())?)
        }
        None => None,
    };
    let resolved = match (resolved, &ins.operation) {
        (None, Some(qdb_proto::v1::instruction::Operation::Restore(_))) => {
            let q = resource(ctx, cluster, &ins.database_id).await?;
            Some(mapping::resolve_restore(ins, q.as_ref())?)
        }
        (resolved, _) => resolved,
    };
    let ins = resolved.as_ref().unwrap_or(ins);
    let action = mapping::desired(ins, current.as_ref())?;
    let apply = |spec| {
        let obj = apply_body(ins, spec);
        let api = api.clone();
        async move {
            let params = PatchParams::apply(PROVISIONER_MANAGER).force();
            let res = api.patch(name, &params, &Patch::Apply(&obj)).await;
            ctx.metrics.kube(&cluster.name, "apply", res.is_ok());
            let qdb = res.map_err(|e| kube_error("apply", e))?;
            // Applied to an object on its way out: it will be gone, so this is not done.
            deleting(&qdb)?;
            Ok::<_, ExecError>(qdb)
        }
    };
    match action {
        Action::Apply(spec) => {
            let qdb = apply(spec.clone()).await?;
            Ok(Applied { generation: qdb.metadata.generation, qdb: Some(qdb), spec: Some(spec) })
        }
        Action::Delete { prepare } => {
            if let Some(spec) = prepare {
                apply(spec).await?;
            }
            let res = api.delete(name, &DeleteParams::default()).await;
            match res {
                Ok(_) => ctx.metrics.kube(&cluster.name, "delete", true),
                Err(kube::Error::Api(s)) if s.code == 404 => ctx.metrics.kube(&cluster.name, "delete", true),
                Err(e) => {
                    ctx.metrics.kube(&cluster.name, "delete", false);
                    return Err(kube_error("delete", e));
                }
            }
            Ok(Applied { generation: None, qdb: None, spec: None })
        }
    }
}

/// Applies one due instruction. Returns whether the database may go on to its next one.
async fn apply_one(ctx: &Shared, head: &Open, known: Option<QuestDBSpec>) -> Result<bool, JournalError> {
    let ins = match v1::Instruction::decode(head.payload.as_slice()) {
        Ok(ins) => ins,
        Err(e) => {
            // Journaled payloads decoded on arrival; this is corruption, not input.
            let (reason, message) = ("JOURNAL_CORRUPT", e.to_string());
            journal::finish(&ctx.pool, Some(&ctx.replica), &head.id, State::Failed, reason, &message, &[])
                .await?;
            return Ok(true);
        }
    };
    let subject = Subject::of(&ins);
    let Some(cluster) = ctx.registry.get(&head.cluster) else {
        let message = format!("cluster {:?} is no longer in this provisioner's registry", head.cluster);
        terminal(ctx, head, &subject, State::Failed, "UNKNOWN_CLUSTER", &message, None).await?;
        return Ok(true);
    };
    match execute_confirmed(ctx, cluster, &ins, known).await {
        Ok(applied) => {
            let deadline = ctx.deadline(&head.operation);
            let status = applied.qdb.as_ref().map(gossip::database_status);
            let message = match applied.generation {
                Some(g) => format!("{} applied at generation {g}", head.operation),
                None => "delete requested".to_string(),
            };
            let event = gossip::event(&subject, Phase::Applied, "", &message, status);
            let spec = applied.spec.as_ref();
            let recorded = journal::record_applied(
                &ctx.pool,
                &ctx.replica,
                &head.id,
                applied.generation,
                deadline,
                spec,
                &event,
            )
            .await?;
            if let Some(recorded) = recorded {
                ctx.metrics.apply_seconds.observe(recorded.secs);
                ctx.metrics.count("applied");
                ctx.outbox_wake.notify_one();
                debug!(instruction = %head.id, database = %head.database_id, "applied");
                // The operator may have reported on this generation before the journal said
                // applied; judge it now rather than at the next sweep.
                if let Some(view) = ctx.views.get(&head.cluster) {
                    let returned = applied.qdb.as_ref();
                    let earlier = recorded.earlier_waiting;
                    crate::tracker::evaluate_after_apply(
                        ctx,
                        view,
                        head,
                        applied.generation,
                        returned,
                        earlier,
                    )
                    .await;
                }
                Ok(true)
            } else {
                // The lease ran out during the apply (or another replica recorded it): whoever
                // holds the database now owns its journal; this replica stops here.
                lease_lost(ctx, head);
                Ok(false)
            }
        }
        Err(ExecError::Rejected(e)) => {
            let message = e.to_string();
            terminal(ctx, head, &subject, State::Rejected, e.reason(), &message, Some(&ins)).await?;
            Ok(true)
        }
        Err(e @ ExecError::Refused { refusal, .. }) => {
            let message = e.to_string();
            if matches!(refusal, Refusal::SpecRefused | Refusal::StaleSequence)
                && let Some(by) = overtaken_by(cluster, &ins).await
            {
                // The resource already reflects a later instruction (a replay after a crash can
                // get here): this one came too late, whichever rule of the cluster said no first
                // (a version downgrade's is checked before the sequence policy).
                let message = format!("the resource already reflects instruction {by}: {message}");
                superseded(ctx, head, &subject, &by, &message).await?;
                return Ok(true);
            }
            if refusal == Refusal::SpecRefused {
                // Everything written was validated first: the cluster and the provisioner
                // disagree on what a valid spec is, and that is for the provisioner to fix.
                ctx.metrics.spec_refused(&head.cluster);
            }
            terminal(ctx, head, &subject, State::Failed, refusal.reason(), &message, None).await?;
            Ok(true)
        }
        Err(e @ ExecError::Transient { .. }) => {
            let error = crate::error_chain(&e);
            let deadline = ctx.deadline(&head.operation);
            if head.age >= deadline {
                // The deadline counts from arrival: an instruction that could never be applied
                // ends like one the operator never finished.
                let message = format!(
                    "not applied within the {} deadline of {}s after {} attempts; last error: {error}",
                    head.operation,
                    deadline.as_secs(),
                    head.attempts + 1
                );
                terminal(ctx, head, &subject, State::Failed, "DEADLINE_EXCEEDED", &message, None).await?;
                return Ok(true);
            }
            let delay =
                retry_delay(head.attempts, ctx.max_retry_delay).min(deadline.saturating_sub(head.age));
            info!(instruction = %head.id, database = %head.database_id, cluster = %head.cluster,
                attempts = head.attempts + 1, retry_in_ms = delay.as_millis() as u64, error = %error,
                "apply failed; will retry");
            if journal::retry_later(&ctx.pool, &ctx.replica, head, delay, &error).await? {
                ctx.metrics.count("retried");
            } else {
                // Stalled past the lease (paused, partitioned): the failed apply is someone
                // else's business now, and saying so is how on-call finds the stall.
                lease_lost(ctx, head);
            }
            Ok(false)
        }
    }
}

/// The later instruction the live resource reflects, when its sequence is above `ins`'s.
async fn overtaken_by(cluster: &Cluster, ins: &v1::Instruction) -> Option<String> {
    let live = cluster.questdbs().get_opt(&ins.database_id).await.ok().flatten()?;
    let annotations = live.metadata.annotations.as_ref()?;
    let sequence: u64 = annotations.get(keys::INSTRUCTION_SEQUENCE)?.parse().ok()?;
    (sequence > ins.sequence).then(|| annotations.get(keys::INSTRUCTION_ID).cloned().unwrap_or_default())
}

/// Ends an instruction as superseded by the later instruction `by`.
async fn superseded(
    ctx: &Shared,
    head: &Open,
    subject: &Subject,
    by: &str,
    message: &str,
) -> Result<(), JournalError> {
    let reason = gossip::SUPERSEDED_BY_LATER;
    let announce = [gossip::superseded(subject, by, message, None)];
    let written = journal::finish(
        &ctx.pool,
        Some(&ctx.replica),
        &head.id,
        State::Superseded,
        reason,
        message,
        &announce,
    )
    .await?;
    if !written {
        lease_lost(ctx, head);
        return Ok(());
    }
    ctx.metrics.count(State::Superseded.as_str());
    ctx.outbox_wake.notify_one();
    info!(instruction = %head.id, database = %head.database_id, by, "instruction superseded");
    Ok(())
}

/// Ends an instruction with a gossip event, and a dead-letter copy for a rejection.
#[allow(clippy::too_many_arguments)]
async fn terminal(
    ctx: &Shared,
    head: &Open,
    subject: &Subject,
    state: State,
    reason: &str,
    message: &str,
    dead_letter: Option<&v1::Instruction>,
) -> Result<(), JournalError> {
    let phase = gossip::phase_of_state(state);
    let mut announce = vec![gossip::event(subject, phase, reason, message, None)];
    if dead_letter.is_some() {
        let source = Source {
            topic: ctx.instructions_topic.clone(),
            partition: head.source_partition,
            offset: head.source_offset,
            key: Some(head.database_id.clone().into_bytes()),
            headers: vec![],
        };
        announce.push(gossip::dead_letter(
            &source,
            &head.payload,
            &head.database_id,
            reason,
            message,
            ctx.publish_max_bytes,
        ));
    }
    let written =
        journal::finish(&ctx.pool, Some(&ctx.replica), &head.id, state, reason, message, &announce).await?;
    if !written {
        lease_lost(ctx, head);
        return Ok(());
    }
    ctx.metrics.count(state.as_str());
    ctx.outbox_wake.notify_one();
    warn!(instruction = %head.id, database = %head.database_id, reason, message, "instruction {}", state.as_str());
    Ok(())
}

/// A conditional write after the claim wrote nothing: the lease ran out or moved to another
/// replica, or the instruction was already ended by whoever holds it. Nothing is announced.
fn lease_lost(ctx: &Shared, head: &Open) {
    ctx.metrics.count("lease_lost");
    warn!(instruction = %head.id, database = %head.database_id,
        "lease gone or instruction already ended; this replica's result is dropped");
}

/// Works through one claimed database's due instructions, then gives the database back.
async fn work_on(ctx: Arc<Shared>, database_id: String, stop: CancellationToken) {
    loop {
        if stop.is_cancelled() {
            break;
        }
        // The lease is renewed with every step: an apply may take long, and a replica that
        // stalled past its lease (paused, partitioned) must find out before it acts again.
        let (head, known) = match journal::next(&ctx.pool, &ctx.replica, &database_id, ctx.lease).await {
            Ok(Next::Apply(head, known)) => (head, known),
            Ok(Next::Released) => {
                ctx.work_wake.notify_one();
                return;
            }
            Ok(Next::LeaseLost) => {
                warn!(database = %database_id, "lease lost; leaving the database to whoever holds it");
                ctx.work_wake.notify_one();
                return;
            }
            Err(e) => {
                warn!(database = %database_id, error = %crate::error_chain(&e), "reading the journal failed");
                break;
            }
        };
        match apply_one(&ctx, &head, known).await {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                warn!(database = %database_id, error = %crate::error_chain(&e), "journal write failed; the instruction stays pending");
                break;
            }
        }
    }
    if let Err(e) = journal::release(&ctx.pool, &ctx.replica, &database_id).await {
        // The lease runs out on its own.
        warn!(database = %database_id, error = %crate::error_chain(&e), "releasing the database failed");
    }
    ctx.work_wake.notify_one();
}

/// Claims databases with due work while there are free slots; on stop, lets in-flight
/// instructions finish (bounded), leaves the rest pending in the journal and gives up its leases.
pub async fn run(ctx: Arc<Shared>, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(ctx.max_parallel));
    let mut tasks = JoinSet::new();
    while !stop.is_cancelled() {
        while tasks.try_join_next().is_some() {}
        let free = slots.available_permits();
        let mut claimed = 0;
        if free > 0 {
            match journal::claim(&ctx.pool, &ctx.replica, free as i64, ctx.lease).await {
                Ok(dbs) => {
                    claimed = dbs.len();
                    for db in dbs {
                        let Ok(permit) = slots.clone().acquire_owned().await else { break };
                        let (ctx, stop) = (ctx.clone(), stop.clone());
                        tasks.spawn(async move {
                            work_on(ctx, db, stop).await;
                            drop(permit);
                        });
                    }
                }
                Err(e) => warn!(error = %crate::error_chain(&e), "claiming work failed"),
            }
        }
        if claimed > 0 && claimed == free {
            continue;
        }
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = ctx.work_wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
    let in_flight = tasks.len();
    if tokio::time::timeout(Duration::from_secs(20), async { while tasks.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        warn!(in_flight, "in-flight instructions did not finish in 20s; they stay pending");
        tasks.abort_all();
    }
    match journal::release_all(&ctx.pool, &ctx.replica).await {
        Ok(n) => info!(in_flight, released = n, "workers stopped"),
        Err(e) => {
            warn!(error = %crate::error_chain(&e), "releasing leases failed; they run out on their own")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_carries_instruction_id_and_sequence() {
        let ins = v1::Instruction {
            instruction_id: "i-9".into(),
            database_id: "db-9".into(),
            sequence: 12,
            ..Default::default()
        };
        let spec: QuestDBSpec = serde_json::from_value(serde_json::json!({
            "version": "8.2.1", "instanceType": "m6i.xlarge", "nodeImage": "ami-0123456789abcdef0",
            "volume": {"sizeGib": 10, "type": "gp3"}
        }))
        .unwrap();
        let q = build_resource(&ins, spec.clone());
        assert_eq!(q.metadata.name.as_deref(), Some("db-9"));
        let ann = q.metadata.annotations.unwrap();
        assert_eq!(ann[keys::INSTRUCTION_ID], "i-9");
        assert_eq!(ann[keys::INSTRUCTION_SEQUENCE], "12");
        assert_eq!(q.metadata.labels.unwrap()[keys::DATABASE], "db-9");
        assert_eq!(q.spec, spec);
        let json = serde_json::to_value(build_resource(&ins, spec)).unwrap();
        assert_eq!(json["kind"], "QuestDB");
        assert!(json.get("status").is_none_or(|s| s.is_null()));
    }

    #[test]
    fn an_empty_server_config_is_left_out() {
        let ins = v1::Instruction {
            instruction_id: "i-1".into(),
            database_id: "db-1".into(),
            ..Default::default()
        };
        let mut spec: QuestDBSpec = serde_json::from_value(serde_json::json!({
            "version": "8.2.1", "instanceType": "m6i.xlarge", "nodeImage": "ami-0123456789abcdef0",
            "volume": {"sizeGib": 10, "type": "gp3"}, "serverConfig": {"a": "1"}
        }))
        .unwrap();
        assert_eq!(apply_body(&ins, spec.clone())["spec"]["serverConfig"], serde_json::json!({"a": "1"}));
        spec.server_config.clear();
        assert!(apply_body(&ins, spec)["spec"].get("serverConfig").is_none());
    }

    #[test]
    fn refusals_are_final_and_the_rest_is_retried() {
        assert_eq!(refusal(422, "spec.volume.sizeGib: must grow"), Some(Refusal::SpecRefused));
        assert_eq!(refusal(400, ""), Some(Refusal::SpecRefused));
        let stale = "ValidatingAdmissionPolicy 'questdb-instruction-sequence' with binding \
                     'questdb-instruction-sequence' denied request: stale instruction sequence 2: \
                     the resource already reflects sequence 3";
        assert_eq!(refusal(422, stale), Some(Refusal::StaleSequence), "not counted as a provisioner bug");
        assert_eq!(refusal(403, ""), Some(Refusal::Forbidden));
        assert_eq!(refusal(401, ""), Some(Refusal::Unauthorized));
        assert_eq!(refusal(404, ""), Some(Refusal::NotSetUp));
        assert_eq!(refusal(413, ""), Some(Refusal::Other));
        for transient in [408, 409, 425, 429, 500, 502, 503, 504] {
            assert_eq!(refusal(transient, STALE_SEQUENCE_MESSAGE), None, "{transient}");
        }
        let reasons: std::collections::HashSet<_> = [
            Refusal::SpecRefused,
            Refusal::Forbidden,
            Refusal::Unauthorized,
            Refusal::NotSetUp,
            Refusal::StaleSequence,
            Refusal::Other,
        ]
        .iter()
        .map(|r| r.reason())
        .collect();
        assert_eq!(reasons.len(), 6, "each refusal has its own reason");
    }

    #[test]
    fn retry_delay_grows_and_is_capped() {
        let max = Duration::from_secs(10);
        assert!(retry_delay(0, max) <= Duration::from_millis(400));
        assert!(retry_delay(3, max) >= Duration::from_millis(1600));
        assert!(retry_delay(60, max) <= max * 2, "jitter stays within one more max");
    }
}
