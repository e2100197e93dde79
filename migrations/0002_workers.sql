-- Work distribution between provisioner replicas and a transactional outbox for every topic.

-- A replica works on a database only while it holds its lease; a replica that dies loses it when
-- the lease runs out, and any other replica then carries on with that database's journal.
ALTER TABLE databases ADD COLUMN lease_owner TEXT;
ALTER TABLE databases ADD COLUMN lease_until TIMESTAMPTZ;

-- The last progress announced for an applied instruction, so a status change is gossiped once.
ALTER TABLE instructions ADD COLUMN progress TEXT NOT NULL DEFAULT '';

-- Instructions waiting on the cluster (applied, not yet terminal), checked against status.
CREATE INDEX instructions_applied ON instructions (database_id) WHERE state = 'applied';

-- The outbox carries dead-letter copies too, so a rejection and its copy commit together with
-- the Kafka offset they answer. `topic` is a role ('gossip' or 'dlq'), resolved to a topic name
-- by the replica that publishes it.
ALTER TABLE gossip_outbox RENAME TO outbox;
ALTER TABLE outbox ADD COLUMN topic TEXT NOT NULL DEFAULT 'gossip' CHECK (topic IN ('gossip', 'dlq'));
ALTER TABLE outbox ADD COLUMN key BYTEA;
ALTER TABLE outbox ADD COLUMN headers JSONB NOT NULL DEFAULT '[]';

-- Instructions waiting for their turn to be applied.
CREATE INDEX instructions_pending ON instructions (next_attempt_at) WHERE state = 'pending';
