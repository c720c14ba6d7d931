-- One outbox row per transaction instead of one per message: a batch that sends forty messages
-- writes one row and one index entry, and deletes one row once JetStream acknowledged them all.
-- Each message keeps its own `Nats-Msg-Id` in its headers. The row's id is its first message's.
alter table outbox alter column subject type text[] using array[subject];
alter table outbox rename column subject to subjects;
alter table outbox alter column headers type jsonb using jsonb_build_array(headers);
alter table outbox alter column payload type bytea[] using array[payload];
alter table outbox rename column payload to payloads;
