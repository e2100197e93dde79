-- A database's instructions in sequence order, whatever their state: finding the instruction that
-- superseded another (journal::successor) read every row of the journal without it, 1.7 ms at
-- 2,400 rows and growing with the retention.
CREATE INDEX instructions_by_database ON instructions (database_id, sequence);
