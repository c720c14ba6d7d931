create table product (
    product_id text primary key,
    available  bigint not null check (available >= 0),
    reserved   bigint not null default 0 check (reserved >= 0),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);

-- The decision for an order: 'reserved', 'rejected' or 'released'. A release that arrives before
-- its reservation leaves a 'released' row, so the late reservation is refused, never leaked.
create table reservation (
    order_id   uuid primary key,
    status     text not null check (status in ('reserved', 'rejected', 'released')),
    lines      jsonb not null,
    reason     text,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
