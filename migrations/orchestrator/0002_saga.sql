-- One row per order: the order as submitted plus its saga state.
create table saga_order (
    order_id          uuid primary key,
    customer_id       text not null,
    items             jsonb not null,
    total_cents       bigint not null check (total_cents >= 0),
    -- Serde form of the statig state; `status` mirrors it for queries and indexes.
    state             jsonb not null,
    status            text not null,
    version           bigint not null default 0,
    cancel_reason     text,
    cancel_detail     text,
    -- When the current step's answer is overdue (null when nothing is awaited).
    deadline_at       timestamptz,
    -- W3C trace context of the saga, so steps fired later (deadlines) continue its trace.
    trace_context     jsonb not null default '{}',
    idempotency_key   text unique,
    request_fingerprint text,
    created_at        timestamptz not null default now(),
    updated_at        timestamptz not null default now()
);
create index saga_order_status_idx on saga_order (status, order_id desc);
create index saga_order_deadline_idx on saga_order (deadline_at) where deadline_at is not null;

create table saga_transition (
    saga_transition_id bigserial primary key,
    order_id           uuid not null references saga_order (order_id),
    from_status        text,
    to_status          text not null,
    event              text not null,
    created_at         timestamptz not null default now(),
    updated_at         timestamptz not null default now()
);
create index saga_transition_order_idx on saga_transition (order_id, saga_transition_id);
