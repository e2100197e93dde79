-- The spec the provisioner last applied to each database. The provisioner is the only writer of
-- spec, so a modify is resolved against this instead of reading the resource back from the
-- cluster first: one API request per instruction instead of two.
ALTER TABLE databases ADD COLUMN spec JSONB;
