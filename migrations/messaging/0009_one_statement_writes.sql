-- A handler may write a whole batch in one statement that commits on its own (no BEGIN and
-- COMMIT round trips): inbox entries, its state changes and the outbox row together. It ends the
-- statement with this check: when fewer rows were written than planned (a saga changed since it
-- was read, a decision had been claimed before) or fewer inbox entries were new than messages
-- (a redelivery), the whole statement aborts, nothing of the batch is written, and the handler
-- retries or takes its transactional path.
create function one_statement_check(written bigint, planned bigint, recorded bigint, messages bigint)
returns bigint language plpgsql as $$
begin
    if written <> planned or recorded <> messages then
        raise exception 'batch changed concurrently: % of % rows written, % of % messages new',
            written, planned, recorded, messages
            using errcode = 'serialization_failure';
    end if;
    return written;
end $$;
