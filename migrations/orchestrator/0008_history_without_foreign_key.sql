-- History rows are written only in the statement that inserts or updates their order, and orders
-- are never deleted, so the foreign key only cost a lookup and a row lock per history row.
alter table saga_transition drop constraint saga_transition_order_id_fkey;
