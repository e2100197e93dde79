//! Gossip events and dead-letter copies, built purely from what the journal and the cluster say.

use qdb_crd::{Phase as CrPhase, QuestDB};
use qdb_proto::Message;
use qdb_proto::v1::{self, Phase};

use crate::journal::{Outgoing, State, Topic};

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
    encode(build(subject, phase, reason, message, status))
}

/// An event about an applied instruction, naming the snapshot it took (Snapshot instructions).
pub fn event_about(
    subject: &Subject,
    phase: Phase,
    reason: &str,
    message: &str,
    status: Option<v1::DatabaseStatus>,
    snapshot: Option<&str>,
) -> Outgoing {
    let mut ev = build(subject, phase, reason, message, status);
    ev.snapshot_id = snapshot.unwrap_or_default().to_string();
    encode(ev)
}

fn build(
    subject: &Subject,
    phase: Phase,
    reason: &str,
    message: &str,
    status: Option<v1::DatabaseStatus>,
) -> v1::GossipEvent {
    v1::GossipEvent {
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
        superseded_by: String::new(),
        snapshot_id: String::new(),
    }
}

/// The event that ends an applied instruction replaced by the later instruction `by`.
pub fn superseded(
    subject: &Subject,
    by: &str,
    message: &str,
    status: Option<v1::DatabaseStatus>,
) -> Outgoing {
    let mut ev = build(subject, Phase::Superseded, SUPERSEDED_BY_LATER, message, status);
    ev.superseded_by = by.to_string();
    encode(ev)
}

/// The reason of an applied instruction replaced before it was observed Ready.
pub const SUPERSEDED_BY_LATER: &str = "SUPERSEDED_BY_LATER_INSTRUCTION";

fn encode(ev: v1::GossipEvent) -> Outgoing {
    let phase = ev.phase();
    let database_id = ev.database_id.clone();
    Outgoing {
        id: 0,
        topic: Topic::Gossip,
        // Keyed by database so one database's events stay in order on one partition.
        key: Some(database_id.clone().into_bytes()),
        database_id,
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

/// What a record takes beyond its key, value and headers (record and batch framing), with room
/// to spare.
const RECORD_OVERHEAD: usize = 1024;
/// The rejection message is for people: the first part says it.
const MAX_REASON_MESSAGE: usize = 1024;

/// The rejected bytes as received, with the reason and the source in headers (the original
/// headers kept), always small enough to publish: a dead letter that the broker refuses would
/// block every message queued behind it. The payload is cut to fit `max_bytes` (the publishable
/// size of one record) and then says so: `qdb.dlq.truncated` and `qdb.dlq.original.bytes`.
/// Original headers and key too large to keep beside it are dropped, and their count said.
pub fn dead_letter(
    source: &Source,
    payload: &[u8],
    database_id: &str,
    reason: &str,
    message: &str,
    max_bytes: usize,
) -> Outgoing {
    let size = |h: &[(String, String)]| h.iter().map(|(k, v)| k.len() + v.len() + 16).sum::<usize>();
    let mut headers = vec![
        ("qdb.reject.reason".to_string(), reason.to_string()),
        ("qdb.reject.message".to_string(), cut_str(message, MAX_REASON_MESSAGE).to_string()),
        ("qdb.source.topic".to_string(), source.topic.clone()),
        ("qdb.source.partition".to_string(), source.partition.to_string()),
        ("qdb.source.offset".to_string(), source.offset.to_string()),
    ];
    // Room for the headers that say what was dropped or cut, added below if needed.
    let mut used = RECORD_OVERHEAD + size(&headers) + 256;
    let key = source.key.clone().filter(|k| used + k.len() <= max_bytes / 4);
    used += key.as_ref().map_or(0, Vec::len);
    if used + size(&source.headers) <= max_bytes / 2 {
        used += size(&source.headers);
        headers.splice(0..0, source.headers.iter().cloned());
    } else {
        headers.push(("qdb.dlq.headers.dropped".to_string(), source.headers.len().to_string()));
    }
    let room = max_bytes.saturating_sub(used);
    let kept = if payload.len() > room {
        headers.push(("qdb.dlq.truncated".to_string(), "true".to_string()));
        headers.push(("qdb.dlq.original.bytes".to_string(), payload.len().to_string()));
        &payload[..room]
    } else {
        payload
    };
    Outgoing {
        id: 0,
        topic: Topic::DeadLetter,
        database_id: database_id.to_string(),
        key,
        headers,
        payload: kept.to_vec(),
    }
}

/// At most `max` bytes of `s`, cut at a character boundary.
fn cut_str(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The bytes a record of `out` takes on the wire, as far as the broker's limit goes (framing
/// apart).
pub fn record_bytes(out: &Outgoing) -> usize {
    out.payload.len()
        + out.key.as_ref().map_or(0, Vec::len)
        + out.headers.iter().map(|(k, v)| k.len() + v.len() + 16).sum::<usize>()
}

/// The gossip phase that announces a journal state again (for a duplicate delivery).
pub fn phase_of_state(state: State) -> Phase {
    match state {
        State::Pending => Phase::Accepted,
        State::Applied => Phase::Applied,
        State::Succeeded => Phase::Succeeded,
        State::Failed => Phase::Failed,
        State::Rejected => Phase::Rejected,
        State::Superseded => Phase::Superseded,
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
        let out = dead_letter(&src, b"\xff\x00", "", "UNDECODABLE", "bad wire type", 1_000_000);
        assert_eq!(out.topic, Topic::DeadLetter);
        assert_eq!(out.payload, b"\xff\x00");
        assert_eq!(out.key.as_deref(), Some(&b"k"[..]));
        let h: std::collections::HashMap<_, _> = out.headers.into_iter().collect();
        assert_eq!(h["trace"], "t1");
        assert_eq!(h["qdb.reject.reason"], "UNDECODABLE");
        assert_eq!(h["qdb.source.offset"], "41");
        assert!(!h.contains_key("qdb.dlq.truncated"));
    }

    #[test]
    fn dead_letter_always_fits_and_says_what_was_cut() {
        let max = 1_000_000;
        let src = Source {
            topic: "instructions".into(),
            partition: 4,
            offset: 7,
            key: Some(vec![b'k'; 2_000_000]),
            headers: vec![("big".into(), "x".repeat(900_000)), ("trace".into(), "t1".into())],
        };
        for len in [max - 100, max, max + 48, 8 * max] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let out = dead_letter(&src, &payload, "db", "OVERSIZED", &"m".repeat(10_000), max);
            assert!(record_bytes(&out) + RECORD_OVERHEAD <= max, "{len}: {}", record_bytes(&out));
            assert!(payload.starts_with(&out.payload), "a prefix of what was received");
            let h: std::collections::HashMap<_, _> = out.headers.iter().cloned().collect();
            assert_eq!(h["qdb.dlq.truncated"], "true");
            assert_eq!(h["qdb.dlq.original.bytes"], len.to_string());
            assert_eq!((h["qdb.source.partition"].as_str(), h["qdb.source.offset"].as_str()), ("4", "7"));
            assert_eq!(h["qdb.dlq.headers.dropped"], "2");
            assert!(out.key.is_none(), "a key too large to keep is dropped");
        }
        // A small message is copied whole, multi-byte text cut at a character boundary.
        let out = dead_letter(&src, b"abc", "db", "OVERSIZED", &"é".repeat(1000), max);
        assert_eq!(out.payload, b"abc");
        assert!(out.headers.iter().any(|(k, v)| k == "qdb.reject.message" && v.len() <= MAX_REASON_MESSAGE));
    }

    #[test]
    fn every_journal_state_has_its_own_phase() {
        let phases: std::collections::HashSet<_> = State::ALL.into_iter().map(phase_of_state).collect();
        assert_eq!(phases.len(), State::ALL.len());
        assert!(!phases.contains(&Phase::Unspecified));
        for s in State::ALL {
            assert_eq!(State::parse(s.as_str()), Some(s));
        }
    }
}
