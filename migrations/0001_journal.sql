-- The provisioner's journal: every instruction it has seen, the per-database sequence fence, and
-- the gossip outbox. An instruction is durable here before its Kafka offset is stored.

-- One row per instruction id (the idempotency key): a redelivered or duplicated message finds
-- its row and is answered with the recorded outcome instead of acting again.
CREATE TABLE instructions (
    id               TEXT PRIMARY KEY,
    database_id      TEXT NOT NULL,
    cluster          TEXT NOT NULL,
    sequence         BIGINT NOT NULL,
    operation        TEXT NOT NULL,
    -- The encoded Instruction as received, so work resumes after any restart or rebalance.
    payload          BYTEA NOT NULL,
    state            TEXT NOT NULL CHECK (state IN
                         ('pending', 'applied', 'succeeded', 'failed', 'rejected', 'superseded')),
    reason           TEXT NOT NULL DEFAULT '',
    message          TEXT NOT NULL DEFAULT '',
    attempts         INTEGER NOT NULL DEFAULT 0,
    -- The resource generation the apply produced; success is observedGeneration >= this + Ready.
    generation       BIGINT,
    next_attempt_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    deadline_at      TIMESTAMPTZ,
    received_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    applied_at       TIMESTAMPTZ,
    finished_at      TIMESTAMPTZ,
    source_partition INTEGER,
    source_offset    BIGINT
);

-- Open work, in per-database sequence order.
CREATE INDEX instructions_open ON instructions (database_id, sequence)
    WHERE state IN ('pending', 'applied');

-- The sequence fence: the highest sequence accepted per database. An instruction at or below it
-- is stale (superseded) and never applied.
CREATE TABLE databases (
    database_id   TEXT PRIMARY KEY,
    cluster       TEXT NOT NULL,
    last_sequence BIGINT NOT NULL
);

-- Transactional outbox: gossip events are written in the same transaction as the state change
-- they report, and drained to Kafka with FOR UPDATE SKIP LOCKED by any replica.
CREATE TABLE gossip_outbox (
    id          BIGSERIAL PRIMARY KEY,
    database_id TEXT NOT NULL,
    payload     BYTEA NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
