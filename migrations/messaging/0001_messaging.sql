-- Shared messaging tables: every service database has the same outbox and inbox.
-- Each service folder links this file as its first migration, so the schema lives in one place.

create table outbox (
    outbox_id       uuid primary key,
    subject         text not null,
    headers         jsonb not null,
    payload         bytea not null,
    attempts        int not null default 0,
    next_attempt_at timestamptz not null default now(),
    last_error      text,
    created_at      timestamptz not null default now(),
    updated_at      timestamptz not null default now()
);
create index outbox_due_idx on outbox (next_attempt_at, created_at);

-- One wake-up per inserting statement, not per row: the relay only needs a hint.
create function outbox_notify() returns trigger language plpgsql as $$
begin
    perform pg_notify('outbox', '');
    return null;
end $$;
create trigger outbox_notify after insert on outbox
    for each statement execute function outbox_notify();

create table processed_message (
    message_id   uuid primary key,
    processed_at timestamptz not null default now()
);
create index processed_message_age_idx on processed_message (processed_at);
