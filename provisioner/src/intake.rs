//! Intake: each consumed message is classified (pure) and journaled with the gossip and
//! dead-letter copy that answer it, in the transaction after which its offset may be stored.

use qdb_proto::Message;
use qdb_proto::v1::{self, Phase, instruction::Operation};
use sqlx::PgConnection;

use crate::gossip::{self, Source, Subject};
use crate::journal::{self, Accepted, JournalError, NewInstruction};
use crate::mapping;

/// What to do with one message.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Well-formed and for a known cluster: journal it.
    Journal(v1::Instruction),
    /// Refused on arrival; `instruction` is whatever could be read of it.
    Reject { instruction: Option<v1::Instruction>, reason: &'static str, message: String },
}

/// Classifies a message without touching anything.
pub fn classify(payload: &[u8], max_bytes: usize, known_cluster: impl Fn(&str) -> bool) -> Verdict {
    let decoded = v1::Instruction::decode(payload);
    if payload.len() > max_bytes {
        return Verdict::Reject {
            instruction: decoded.ok(),
            reason: "OVERSIZED",
            message: format!("message of {} bytes exceeds the limit of {max_bytes}", payload.len()),
        };
    }
    let ins = match decoded {
        Ok(ins) => ins,
        Err(e) => {
            return Verdict::Reject {
                instruction: None,
                reason: "UNDECODABLE",
                message: format!("not an Instruction: {e}"),
            };
        }
    };
    let reject =
        |reason, message: String| Verdict::Reject { instruction: Some(ins.clone()), reason, message };
    if ins.instruction_id.is_empty() || ins.database_id.is_empty() {
        return reject("MISSING_ID", "instruction_id and database_id are required".into());
    }
    if ins.instruction_id.len() > 256 {
        return reject("INVALID_INSTRUCTION_ID", "instruction_id is longer than 256 bytes".into());
    }
    if !known_cluster(&ins.cluster) {
        return reject(
            "UNKNOWN_CLUSTER",
            format!("cluster {:?} is not in this provisioner's registry", ins.cluster),
        );
    }
    if let Err(e) = mapping::precheck(&ins) {
        return reject(e.reason(), e.to_string());
    }
    Verdict::Journal(ins)
}

/// The operation's name as journaled and used for per-operation deadlines.
pub fn operation_name(ins: &v1::Instruction) -> &'static str {
    match ins.operation {
        Some(Operation::Create(_)) => "create",
        Some(Operation::Modify(_)) => "modify",
        Some(Operation::Pause(_)) => "pause",
        Some(Operation::Resume(_)) => "resume",
        Some(Operation::Restart(_)) => "restart",
        Some(Operation::Delete(_)) => "delete",
        Some(Operation::Snapshot(_)) => "snapshot",
        Some(Operation::Restore(_)) => "restore",
        None => "unknown",
    }
}

/// How a message was answered, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    Duplicate,
    Superseded,
    Rejected,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Duplicate => "duplicate",
            Outcome::Superseded => "superseded",
            Outcome::Rejected => "rejected",
        }
    }
}

/// Journals one classified message with its answer. Run inside the batch transaction.
pub async fn record(
    conn: &mut PgConnection,
    verdict: &Verdict,
    payload: &[u8],
    source: &Source,
    publish_max_bytes: usize,
) -> Result<Outcome, JournalError> {
    fn new<'a>(ins: &'a v1::Instruction, payload: &'a [u8], source: &Source) -> NewInstruction<'a> {
        NewInstruction {
            id: &ins.instruction_id,
            database_id: &ins.database_id,
            cluster: &ins.cluster,
            sequence: i64::try_from(ins.sequence).unwrap_or(i64::MAX),
            operation: operation_name(ins),
            payload,
            source_partition: Some(source.partition),
            source_offset: Some(source.offset),
        }
    }
    match verdict {
        Verdict::Journal(ins) => {
            let subject = Subject::of(ins);
            let accepted = gossip::event(&subject, Phase::Accepted, "", "", None);
            let (outcome, event) = match journal::accept(conn, &new(ins, payload, source), &accepted).await? {
                // Queued with the instruction.
                Accepted::New => return Ok(Outcome::Accepted),
                Accepted::Duplicate(rec) => (Outcome::Duplicate, announce_again(&subject, &rec)),
                Accepted::Stale { last_sequence } => (
                    Outcome::Superseded,
                    gossip::event(
                        &subject,
                        Phase::Superseded,
                        "STALE_SEQUENCE",
                        &format!("sequence {} is not above {last_sequence}, already accepted", ins.sequence),
                        None,
                    ),
                ),
            };
            journal::enqueue(conn, &event).await?;
            Ok(outcome)
        }
        Verdict::Reject { instruction, reason, message } => {
            let readable =
                instruction.as_ref().filter(|i| !i.instruction_id.is_empty() && !i.database_id.is_empty());
            if let Some(ins) = readable {
                let subject = Subject::of(ins);
                if let Some(rec) = journal::reject(conn, &new(ins, payload, source), reason, message).await? {
                    journal::enqueue(conn, &announce_again(&subject, &rec)).await?;
                    return Ok(Outcome::Duplicate);
                }
                journal::enqueue(conn, &gossip::event(&subject, Phase::Rejected, reason, message, None))
                    .await?;
            } else if let Some(ins) =
                instruction.as_ref().filter(|i| !i.instruction_id.is_empty() || !i.database_id.is_empty())
            {
                // Too incomplete to journal, but someone is waiting to hear about it.
                journal::enqueue(
                    conn,
                    &gossip::event(&Subject::of(ins), Phase::Rejected, reason, message, None),
                )
                .await?;
            }
            let database_id = instruction.as_ref().map(|i| i.database_id.as_str()).unwrap_or_default();
            journal::enqueue(
                conn,
                &gossip::dead_letter(source, payload, database_id, reason, message, publish_max_bytes),
            )
            .await?;
            Ok(Outcome::Rejected)
        }
    }
}

fn announce_again(subject: &Subject, rec: &journal::Recorded) -> journal::Outgoing {
    let message = if rec.message.is_empty() {
        "duplicate delivery; recorded outcome announced again".to_string()
    } else {
        format!("duplicate delivery; recorded outcome announced again: {}", rec.message)
    };
    gossip::event(subject, gossip::phase_of_state(rec.state), &rec.reason, &message, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn create() -> v1::Instruction {
        v1::Instruction {
            instruction_id: "i-1".into(),
            database_id: "db-1".into(),
            cluster: "region-a".into(),
            sequence: 1,
            issued_at_ms: 0,
            operation: Some(Operation::Create(v1::Create {
                adopt: None,
                spec: Some(v1::DatabaseSpec {
                    questdb_version: "8.2.1".into(),
                    instance_type: "m6i.xlarge".into(),
                    node_image: "ami-0123456789abcdef0".into(),
                    volume: Some(v1::Volume {
                        size_gib: 10,
                        r#type: v1::VolumeType::Gp3 as i32,
                        ..Default::default()
                    }),
                    server_config: BTreeMap::new(),
                    allowed_cidrs: vec![],
                    snapshot_policy: None,
                }),
            })),
        }
    }

    fn reason_of(v: Verdict) -> &'static str {
        match v {
            Verdict::Reject { reason, .. } => reason,
            Verdict::Journal(_) => "journal",
        }
    }

    fn known(c: &str) -> bool {
        c == "region-a"
    }

    #[test]
    fn good_instruction_is_journaled() {
        let ins = create();
        assert_eq!(classify(&ins.encode_to_vec(), 1024, known), Verdict::Journal(ins));
    }

    #[test]
    fn bad_input_is_rejected_with_a_reason() {
        assert_eq!(reason_of(classify(b"\xff\xff\xff", 1024, known)), "UNDECODABLE");
        assert_eq!(reason_of(classify(&[], 1024, known)), "MISSING_ID");
        let mut ins = create();
        ins.cluster = "mars".into();
        assert_eq!(reason_of(classify(&ins.encode_to_vec(), 1024, known)), "UNKNOWN_CLUSTER");
        let mut ins = create();
        ins.operation = None;
        assert_eq!(reason_of(classify(&ins.encode_to_vec(), 1024, known)), "UNKNOWN_OPERATION");
        let mut ins = create();
        if let Some(Operation::Create(c)) = &mut ins.operation {
            c.spec.as_mut().unwrap().questdb_version = "latest; rm -rf".into();
        }
        assert_eq!(reason_of(classify(&ins.encode_to_vec(), 1024, known)), "INVALID_SPEC");
        let ins = create();
        match classify(&ins.encode_to_vec(), 8, known) {
            Verdict::Reject { instruction, reason, .. } => {
                assert_eq!(reason, "OVERSIZED");
                assert_eq!(instruction.unwrap().instruction_id, "i-1", "the id is still read for gossip");
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn truncated_message_is_undecodable() {
        let bytes = create().encode_to_vec();
        assert_eq!(reason_of(classify(&bytes[..bytes.len() / 2], 1024, known)), "UNDECODABLE");
    }
}
