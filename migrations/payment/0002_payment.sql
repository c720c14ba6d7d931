-- The decision for an order: 'charged', 'declined', 'refunded', or 'voided' (a refund that came
-- before any charge; the late charge is then declined).
create table payment (
    order_id     uuid primary key,
    status       text not null check (status in ('charged', 'declined', 'refunded', 'voided')),
    amount_cents bigint not null check (amount_cents >= 0),
    customer_id  text not null,
    reason       text,
    created_at   timestamptz not null default now(),
    updated_at   timestamptz not null default now()
);
