//! Gossip events and dead-letter copies, built purely from what the journal and the cluster say.

use qdb_crd::{Phase as CrPhase, QuestDB};
use qdb_proto::Message;
use qdb_proto::v1::{self, Phase};

use crate::journal::{Outgoing, Topic};

/// The instruction an event is about.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subject {
    pub instruction_id: String,
    pub database_id: String,
    pub cluster: String,
    pub sequence: u64,
}

impl Subject {
    pub fn of(ins: &v1::Instruction) -> Self {
        Subject {
            instruction_id: ins.instruction_id.clone(),
            database_id: ins.database_id.clone(),
            cluster: ins.cluster.clone(),
            sequence: ins.sequence,
        }
    }
}

/// A gossip event ready for the outbox.
pub fn event(
    subject: &Subject,
    phase: Phase,
    reason: &str,
    message: &str,
    status: Option<v1::DatabaseStatus>,
) -> Outgoing {
    let ev = v1::GossipEvent {
        event_id: uuid::Uuid::new_v4().to_string(),
        instruction_id: subject.instruction_id.clone(),
        database_id: subject.database_id.clone(),
        cluster: subject.cluster.clone(),
        sequence: subject.sequence,
        phase: phase as i32,
        reason: reason.to_string(),
        message: message.to_string(),
        status,
        emitted_at_ms: now_ms(),
    };
    Outgoing {
        id: 0,
        topic: Topic::Gossip,
        database_id: subject.database_id.clone(),
        // Keyed by database so one database's events stay in order on one partition.
        key: Some(subject.database_id.clone().into_bytes()),
        headers: vec![("qdb.phase".into(), phase.as_str_name().into())],
        payload: ev.encode_to_vec(),
    }
}

/// Where a rejected message came from, for its dead-letter copy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Source {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, String)>,
}

/// The rejected bytes as received, with the reason in headers (the original headers kept).
pub fn dead_letter(
    source: &Source,
    payload: &[u8],
    database_id: &str,
    reason: &str,
    message: &str,
) -> Outgoing {
    let mut headers = source.headers.clone();
    headers.extend([
        ("qdb.reject.reason".to_string(), reason.to_string()),
        ("qdb.reject.message".to_string(), message.to_string()),
        ("qdb.source.topic".to_string(), source.topic.clone()),
        ("qdb.source.partition".to_string(), source.partition.to_string()),
        ("qdb.source.offset".to_string(), source.offset.to_string()),
    ]);
    Outgoing {
        id: 0,
        topic: Topic::DeadLetter,
        database_id: database_id.to_string(),
        key: source.key.clone(),
        headers,
        payload: payload.to_vec(),
    }
}

/// The gossip phase that announces a journal state again (for a duplicate delivery).
pub fn phase_of_state(state: &str) -> Phase {
    match state {
        "pending" => Phase::Accepted,
        "applied" => Phase::Applied,
        "succeeded" => Phase::Succeeded,
        "failed" => Phase::Failed,
        "rejected" => Phase::Rejected,
        "superseded" => Phase::Superseded,
        _ => Phase::Unspecified,
    }
}

/// What the backend sees of a database's status.
pub fn database_status(qdb: &QuestDB) -> v1::DatabaseStatus {
    let Some(status) = &qdb.status else {
        return v1::DatabaseStatus { questdb_version: qdb.spec.version.clone(), ..Default::default() };
    };
    v1::DatabaseStatus {
        phase: status.phase.map(CrPhase::as_str).unwrap_or_default().to_string(),
        ready: status.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"),
        questdb_version: qdb.spec.version.clone(),
        node_ip: status.node.as_ref().and_then(|n| n.private_ip.clone()).unwrap_or_default(),
        dns_name: status.dns.as_ref().map(|d| d.name.clone()).unwrap_or_default(),
        endpoints: status.endpoints.as_ref().map(|e| v1::Endpoints {
            http: e.http.clone(),
            pgwire: e.pgwire.clone(),
            ilp: e.ilp.clone(),
        }),
        observed_generation: status.observed_generation.unwrap_or_default(),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_is_keyed_by_database_and_decodes() {
        let s = Subject {
            instruction_id: "i-1".into(),
            database_id: "db-1".into(),
            cluster: "a".into(),
            sequence: 3,
        };
        let out = event(&s, Phase::Applied, "", "done", None);
        assert_eq!(out.topic, Topic::Gossip);
        assert_eq!(out.key.as_deref(), Some(&b"db-1"[..]));
        let ev = v1::GossipEvent::decode(out.payload.as_slice()).unwrap();
        assert_eq!((ev.instruction_id.as_str(), ev.sequence, ev.phase()), ("i-1", 3, Phase::Applied));
        assert!(!ev.event_id.is_empty() && ev.emitted_at_ms > 0);
    }

    #[test]
    fn dead_letter_keeps_bytes_key_and_headers() {
        let src = Source {
            topic: "instructions".into(),
            partition: 2,
            offset: 41,
            key: Some(b"k".to_vec()),
            headers: vec![("trace".into(), "t1".into())],
        };
        let out = dead_letter(&src, b"\xff\x00", "", "UNDECODABLE", "bad wire type");
        assert_eq!(out.topic, Topic::DeadLetter);
        assert_eq!(out.payload, b"\xff\x00");
        assert_eq!(out.key.as_deref(), Some(&b"k"[..]));
        let h: std::collections::HashMap<_, _> = out.headers.into_iter().collect();
        assert_eq!(h["trace"], "t1");
        assert_eq!(h["qdb.reject.reason"], "UNDECODABLE");
        assert_eq!(h["qdb.source.offset"], "41");
    }

    #[test]
    fn every_journal_state_has_a_phase() {
        for s in ["pending", "applied", "succeeded", "failed", "rejected", "superseded"] {
            assert_ne!(phase_of_state(s), Phase::Unspecified, "{s}");
        }
    }
}
