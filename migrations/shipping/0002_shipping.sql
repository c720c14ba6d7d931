-- The decision for an order: 'shipped', 'failed', or 'cancelled' (cancelled before it went out;
-- a late ship command then fails).
create table shipment (
    order_id    uuid primary key,
    status      text not null check (status in ('shipped', 'failed', 'cancelled')),
    customer_id text not null,
    reason      text,
    created_at  timestamptz not null default now(),
    updated_at  timestamptz not null default now()
);
