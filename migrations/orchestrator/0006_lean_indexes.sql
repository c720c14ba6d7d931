-- Every saga step updates its order row, and every index on it takes a new entry: keep only the
-- indexes that earn their cost.
-- Most orders come without an Idempotency-Key: index only the keys that exist.
alter table saga_order drop constraint saga_order_idempotency_key_key;
create unique index saga_order_idempotency_key on saga_order (idempotency_key)
    where idempotency_key is not null;
-- History is only ever read per order: one index keyed (order_id, id) instead of two.
alter table saga_transition drop constraint saga_transition_pkey;
alter table saga_transition add primary key (order_id, saga_transition_id);
drop index saga_transition_order_idx;
