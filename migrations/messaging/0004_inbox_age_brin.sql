-- Inbox entries are appended in time order and only ever pruned by age: a BRIN index finds the
-- old ones for a fraction of what a B-tree costs on every insert.
drop index processed_message_age_idx;
create index processed_message_age_brin on processed_message using brin (processed_at);
