-- A batch of replies is written by one statement that commits on its own (no BEGIN and COMMIT
-- round trips): the inbox entries, the saga states (if unchanged since read), history and the
-- outbox row. When a saga changed since it was read, or a reply was recorded meanwhile, this
-- aborts the whole statement, so nothing of the batch is written and the batch is retried.
create function saga_write_check(updated bigint, expected bigint, recorded bigint, replies bigint)
returns bigint language plpgsql as $$
begin
    if updated <> expected or recorded <> replies then
        raise exception 'saga batch changed concurrently: % of % sagas updated, % of % replies new',
            updated, expected, recorded, replies
            using errcode = 'serialization_failure';
    end if;
    return updated;
end $$;
