-- Outbox messages that can never be published (the broker refuses the record itself, e.g. too
-- large) are set aside here with the reason, instead of blocking every message queued after
-- them. Kept for people to inspect or re-queue; nothing reads them automatically.
CREATE TABLE outbox_parked (
    id          BIGINT PRIMARY KEY,
    topic       TEXT NOT NULL,
    database_id TEXT NOT NULL,
    key         BYTEA,
    headers     JSONB NOT NULL,
    payload     BYTEA NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    parked_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    reason      TEXT NOT NULL
);
