-- A batch's outbox row holds dozens of messages and is compressed on every insert; lz4 costs a
-- fraction of the default pglz's CPU. A server built without lz4 keeps pglz.
do $$
begin
    alter table outbox alter column payloads set compression lz4;
    alter table outbox alter column headers set compression lz4;
exception when feature_not_supported then
    raise notice 'lz4 is not available; the outbox keeps pglz compression';
end $$;
