-- Rows written for the fast path (published by their writer right after commit) are due for the
-- relay only after a grace period; wake the relay only for rows due at once.
drop trigger outbox_notify on outbox;
create trigger outbox_notify after insert on outbox
    for each row when (new.next_attempt_at <= now()) execute function outbox_notify();
