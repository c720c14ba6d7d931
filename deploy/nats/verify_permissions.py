#!/usr/bin/env python3
"""Checks the NATS permissions in deploy/nats/accounts.conf against a running nats-server.

Starts nothing: point it at a server started with deploy/nats/nats-server.conf (or
cluster.conf) and give it the same password variables the server got:

    pip install nats-py
    export ORCHESTRATOR_NATS_PASSWORD=... INVENTORY_NATS_PASSWORD=... PAYMENT_NATS_PASSWORD=...
    export SHIPPING_NATS_PASSWORD=... SAGACTL_NATS_PASSWORD=...
    python3 deploy/nats/verify_permissions.py --server nats://127.0.0.1:4222

It connects as every user and sends the same JetStream API requests the services send with
async-nats 0.51 (stream create-or-update, durable pull consumer create/info/fetch/ack, JetStream
publish with PubAck), and checks that what a user must not do is refused with a
"Permissions Violation" (or, for a consumer created with a mismatching filter, a JetStream error).
Every connection uses the inbox prefix `_INBOX_<user>` (as the services do with async-nats'
`custom_inbox_prefix`), the only subjects besides `orders.>` (sagactl) a user may subscribe to.

Run it against a fresh or staging server, not production: it creates the four streams and the
durable consumers if missing (existing ones are re-submitted unchanged), publishes a few test
messages (header Verify-Permissions: 1) and consumes or deletes them again, except one
`orders.verify.v1` event that stays in ORDERS until it ages out.

Exit status 0 when every check passes; WARN lines are known limitations, not failures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid

import nats
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

STREAMS = {
    # name: (subjects, retention, max_age in seconds or 0) -- as in shared-events/src/nats.rs
    "SAGA_CMD": (["saga.cmd.>"], "workqueue", 0),
    "SAGA_REPLY": (["saga.reply.>"], "workqueue", 0),
    "ORDERS": (["orders.>"], "limits", 7 * 24 * 3600),
    "SAGA_DLQ": (["saga.dlq.>"], "limits", 30 * 24 * 3600),
}
SERVICES = ["orchestrator", "inventory", "payment", "shipping"]
PARTICIPANTS = ["inventory", "payment", "shipping"]
USERS = SERVICES + ["sagactl"]
# Durable pull consumer of each service: (stream, durable, filter)
CONSUMERS = {
    "orchestrator": ("SAGA_REPLY", "orchestrator", "saga.reply.>"),
    **{p: ("SAGA_CMD", p, f"saga.cmd.{p}.>") for p in PARTICIPANTS},
}
NS = 1_000_000_000


def inbox_prefix(user: str) -> str:
    """Per-user inbox prefix; accounts.conf lets each user subscribe only to `_INBOX_<user>.>`."""
    return f"_INBOX_{user}"

TEST_HEADERS = {"Verify-Permissions": "1"}


class Checks:
    def __init__(self) -> None:
        self.failed = 0
        self.passed = 0
        self.warned = 0

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        if ok:
            self.passed += 1
        else:
            self.failed += 1
        print(f"{'PASS' if ok else 'FAIL'}  {what}" + (f"  ({detail})" if detail else ""), flush=True)
        return ok

    def warn(self, what: str) -> None:
        self.warned += 1
        print(f"WARN  {what}", flush=True)


class User:
    """One connection; collects the asynchronous permission errors the server sends."""

    def __init__(self, name: str, timeout: float, deny_timeout: float) -> None:
        self.name = name
        self.timeout = timeout
        self.deny_timeout = deny_timeout
        self.errors: list[str] = []
        self.nc: nats.NATS | None = None

    async def connect(self, server: str, password: str | None) -> None:
        async def on_error(e: Exception) -> None:
            self.errors.append(str(e))

        self.nc = await nats.connect(
            servers=[server],
            user=self.name,
            password=password,
            name=f"verify-permissions-{self.name}",
            inbox_prefix=inbox_prefix(self.name),
            error_cb=on_error,
            allow_reconnect=False,
            connect_timeout=3,
        )
        self.js = self.nc.jetstream(timeout=self.timeout)

    async def settle(self) -> None:
        # -ERR for a refused PUB/SUB arrives before the PONG of this flush.
        await self.nc.flush(timeout=self.timeout)
        await asyncio.sleep(0.05)

    def violation(self, kind: str, subject: str, mark: int) -> bool:
        """kind: 'Publish' or 'Subscription'."""
        # nats-py hands the server's -ERR text over lower-cased.
        needle = f'permissions violation for {kind} to "{subject}"'.lower()
        return any(needle in e.lower() for e in self.errors[mark:])

    async def api(self, subject: str, body: object | None = None, timeout: float | None = None):
        """JetStream API request -> ('ok', json) | ('error', json) | ('timeout', None)."""
        payload = b"" if body is None else json.dumps(body).encode()
        try:
            msg = await self.nc.request(subject, payload, timeout=timeout or self.timeout)
        except (NatsTimeoutError, NoRespondersError):
            return "timeout", None
        data = json.loads(msg.data) if msg.data else {}
        return ("error" if "error" in data else "ok"), data

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.close()


# ----------------------------------------------------------------------------- helpers


async def expect_allowed_api(c: Checks, u: User, subject: str, body=None, what: str = "") -> dict | None:
    mark = len(u.errors)
    status, data = await u.api(subject, body)
    await u.settle()
    denied = u.violation("Publish", subject, mark)
    ok = status == "ok" and not denied
    detail = "" if ok else f"status={status} denied={denied} {json.dumps(data)[:200] if data else ''}"
    c.check(ok, f"{u.name}: allowed {what or subject}", detail)
    return data if ok else None


async def expect_denied_pub(c: Checks, u: User, subject: str, body=None, what: str = "") -> None:
    """A request that must be dropped by the server with a publish permissions violation."""
    mark = len(u.errors)
    status, data = await u.api(subject, body, timeout=u.deny_timeout)
    await u.settle()
    denied = u.violation("Publish", subject, mark)
    c.check(denied and status == "timeout", f"{u.name}: denied {what or 'publish ' + subject}",
            "" if denied else f"no violation; status={status} {json.dumps(data)[:200] if data else ''}")


async def expect_denied_js_publish(c: Checks, u: User, subject: str, what: str = "") -> None:
    mark = len(u.errors)
    try:
        ack = await u.js.publish(subject, b"{}", timeout=u.deny_timeout,
                                 headers={**TEST_HEADERS, "Nats-Msg-Id": f"verify-{uuid.uuid4()}"})
        got = f"PubAck stream={ack.stream} seq={ack.seq}"
    except (NatsTimeoutError, NoRespondersError, NatsError) as e:
        got = type(e).__name__
    await u.settle()
    denied = u.violation("Publish", subject, mark)
    c.check(denied and not got.startswith("PubAck"),
            f"{u.name}: denied {what or 'JetStream publish to ' + subject}", f"client saw {got}")


async def expect_allowed_js_publish(c: Checks, u: User, subject: str, stream: str) -> int | None:
    mark = len(u.errors)
    try:
        ack = await u.js.publish(subject, json.dumps({"verify": True}).encode(),
                                 headers={**TEST_HEADERS, "Nats-Msg-Id": f"verify-{uuid.uuid4()}"})
    except Exception as e:  # noqa: BLE001
        await u.settle()
        c.check(False, f"{u.name}: JetStream publish to {subject} gets a PubAck",
                f"{type(e).__name__} {e}; violation={u.violation('Publish', subject, mark)}")
        return None
    c.check(ack.stream == stream, f"{u.name}: JetStream publish to {subject} gets a PubAck",
            f"stream={ack.stream} seq={ack.seq}")
    return ack.seq


async def expect_denied_sub(c: Checks, u: User, subject: str) -> None:
    mark = len(u.errors)
    sub = await u.nc.subscribe(subject)
    await u.settle()
    c.check(u.violation("Subscription", subject, mark), f"{u.name}: denied subscribe {subject}")
    try:
        await sub.unsubscribe()
    except Exception:  # noqa: BLE001
        pass


async def pull_one(u: User, stream: str, durable: str, expires: float = 2.0):
    """One MSG.NEXT request, as async-nats' fetch/messages do. Returns (msg|None, status)."""
    subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
    payload = json.dumps({"batch": 1, "expires": int(expires * NS)}).encode()
    # Not nc.request(): a delivered message carries its stream subject, not the inbox, so the
    # request multiplexer would not recognise it. A dedicated inbox, as the clients do.
    inbox = u.nc.new_inbox()
    sub = await u.nc.subscribe(inbox)
    try:
        await u.nc.publish(subject, payload, reply=inbox)
        msg = await sub.next_msg(timeout=expires + 1)
    except NatsTimeoutError:
        return None, "timeout"
    finally:
        await sub.unsubscribe()
    status = msg.headers.get("Status") if msg.headers else None
    if status:
        return None, f"status {status} {msg.headers.get('Description', '')}"
    return msg, "message"


async def ack(u: User, msg) -> bool:
    mark = len(u.errors)
    try:
        await u.nc.request(msg.reply, b"+ACK", timeout=u.timeout)  # double ack: server confirms
        ok = True
    except (NatsTimeoutError, NoRespondersError):
        ok = False
    await u.settle()
    return ok and not u.violation("Publish", msg.reply, mark)


async def drain_test_messages(u: User, stream: str, durable: str) -> int:
    """Pulls and acks whatever our test left on a work-queue consumer (own durable only)."""
    n = 0
    while True:
        msg, _ = await pull_one(u, stream, durable, expires=0.5)
        if msg is None:
            return n
        await ack(u, msg)
        n += 1


async def _ignore(_e: Exception) -> None:
    pass


def stream_config(name: str, replicas: int) -> dict:
    subjects, retention, max_age = STREAMS[name]
    cfg = {
        "name": name,
        "subjects": subjects,
        "retention": retention,
        "storage": "file",
        "duplicate_window": 120 * NS,
        "num_replicas": replicas,
    }
    if max_age:
        cfg["max_age"] = max_age * NS
    return cfg


# ----------------------------------------------------------------------------- checks


async def check_topology(c: Checks, u: User, replicas: int) -> None:
    """ensure_streams (UPDATE, CREATE on 404, INFO) and the service's durable consumer."""
    for name in STREAMS:
        mark = len(u.errors)
        status, data = await u.api(f"$JS.API.STREAM.INFO.{name}")
        await u.settle()
        if status == "timeout" or u.violation("Publish", f"$JS.API.STREAM.INFO.{name}", mark):
            c.check(False, f"{u.name}: allowed STREAM.INFO.{name}", f"status={status}")
            continue
        if status == "ok":
            # Exists: re-submit its own config, i.e. an UPDATE that changes nothing.
            await expect_allowed_api(c, u, f"$JS.API.STREAM.UPDATE.{name}", data["config"],
                                     what=f"STREAM.UPDATE.{name} (unchanged config)")
        else:
            # Missing: what async-nats' create_or_update_stream does, UPDATE -> 404 -> CREATE.
            mark = len(u.errors)
            st, d = await u.api(f"$JS.API.STREAM.UPDATE.{name}", stream_config(name, replicas))
            await u.settle()
            c.check(st == "error" and d["error"].get("code") == 404
                    and not u.violation("Publish", f"$JS.API.STREAM.UPDATE.{name}", mark),
                    f"{u.name}: allowed STREAM.UPDATE.{name} (answers 404)", f"status={st}")
            await expect_allowed_api(c, u, f"$JS.API.STREAM.CREATE.{name}", stream_config(name, replicas),
                                     what=f"STREAM.CREATE.{name}")
        await expect_allowed_api(c, u, f"$JS.API.STREAM.INFO.{name}", what=f"STREAM.INFO.{name}")

    if u.name not in CONSUMERS:
        return
    stream, durable, flt = CONSUMERS[u.name]
    status, data = await u.api(f"$JS.API.CONSUMER.INFO.{stream}.{durable}")
    if status == "ok":
        config = data["config"]  # re-submit unchanged
    else:
        config = {
            "durable_name": durable,
            "filter_subject": flt,
            "deliver_policy": "all",
            "ack_policy": "explicit",
            "ack_wait": 30 * NS,
            "max_deliver": 6,
            "max_ack_pending": 256,
            "replay_policy": "instant",
        }
    body = {"stream_name": stream, "config": config, "action": ""}
    await expect_allowed_api(c, u, f"$JS.API.CONSUMER.CREATE.{stream}.{durable}.{flt}", body,
                             what=f"CONSUMER.CREATE.{stream}.{durable}.{flt} (durable {durable})")
    await expect_allowed_api(c, u, f"$JS.API.CONSUMER.INFO.{stream}.{durable}",
                             what=f"CONSUMER.INFO.{stream}.{durable}")
    await expect_allowed_api(c, u, "$JS.API.INFO", what="$JS.API.INFO (account info)")


async def check_common_denials(c: Checks, u: User) -> None:
    await expect_denied_pub(c, u, "$JS.API.STREAM.DELETE.SAGA_CMD", {})
    await expect_denied_pub(c, u, "$JS.API.STREAM.PURGE.SAGA_DLQ", {})
    await expect_denied_pub(c, u, "$JS.API.STREAM.CREATE.EVIL", stream_config("SAGA_CMD", 1) | {"name": "EVIL"})
    await expect_denied_pub(c, u, "$JS.API.STREAM.LIST", {})
    await expect_denied_pub(c, u, "$JS.API.CONSUMER.DELETE.SAGA_CMD.payment", {})


async def run(args) -> int:
    c = Checks()
    passwords = {n: os.environ.get(f"{n.upper()}_NATS_PASSWORD") for n in USERS}
    missing = [f"{n.upper()}_NATS_PASSWORD" for n, p in passwords.items() if not p]
    if missing:
        print(f"missing environment variables: {', '.join(missing)}", file=sys.stderr)
        return 2

    # --- authentication
    try:
        nc = await nats.connect(servers=[args.server], allow_reconnect=False, connect_timeout=3,
                                inbox_prefix=inbox_prefix("anonymous"), error_cb=_ignore)
        await nc.close()
        c.check(False, "anonymous connection refused")
    except Exception as e:  # noqa: BLE001
        c.check("Authorization Violation" in str(e), "anonymous connection refused", str(e))
    try:
        nc = await nats.connect(servers=[args.server], user="payment", password="wrong-" + uuid.uuid4().hex,
                                allow_reconnect=False, connect_timeout=3,
                                inbox_prefix=inbox_prefix("payment"), error_cb=_ignore)
        await nc.close()
        c.check(False, "wrong password refused")
    except Exception as e:  # noqa: BLE001
        c.check("Authorization Violation" in str(e), "wrong password refused", str(e))

    users: dict[str, User] = {}
    try:
        for n in USERS:
            u = User(n, args.timeout, args.deny_timeout)
            await u.connect(args.server, passwords[n])
            users[n] = u
        c.check(True, "all five users connect")
        for n, u in users.items():
            inbox = u.nc.new_inbox()
            c.check(inbox.startswith(inbox_prefix(n) + "."), f"{n}: uses inbox prefix {inbox_prefix(n)}", inbox)
        orch, inv, pay, ship, ctl = (users[n] for n in USERS)

        # --- start-up topology, every service (orchestrator first: it creates what is missing)
        for n in SERVICES:
            await check_topology(c, users[n], args.replicas)

        # --- payment: the cases from the brief
        await expect_allowed_js_publish(c, pay, "saga.reply.payment.charged.v1", "SAGA_REPLY")
        await expect_denied_js_publish(c, pay, "saga.reply.inventory.reserved.v1",
                                       "JetStream publish of another participant's reply saga.reply.inventory.reserved.v1")
        await expect_denied_sub(c, pay, "saga.cmd.inventory.>")
        await expect_denied_sub(c, pay, "saga.cmd.>")
        await expect_denied_sub(c, pay, "saga.reply.>")

        # commands for inventory and payment, published by the orchestrator
        await expect_allowed_js_publish(c, orch, "saga.cmd.inventory.reserve.v1", "SAGA_CMD")
        await expect_allowed_js_publish(c, orch, "saga.cmd.payment.charge.v1", "SAGA_CMD")

        # eavesdropping on other users' inboxes: refused (per-user inbox prefixes, see accounts.conf).
        # The subscriptions stay open while inventory pulls its command, to show nothing leaks.
        spies = []
        for subject in ("_INBOX.>", "_INBOX_inventory.>"):
            mark = len(pay.errors)
            spies.append(await pay.nc.subscribe(subject))
            await pay.settle()
            c.check(pay.violation("Subscription", subject, mark), f"payment: denied subscribe {subject}")

        await expect_denied_pub(c, pay, "$JS.API.CONSUMER.MSG.NEXT.SAGA_CMD.inventory",
                                {"batch": 1, "expires": NS}, "pull from durable inventory (MSG.NEXT.SAGA_CMD.inventory)")
        msg, how = await pull_one(pay, "SAGA_CMD", "payment")
        c.check(msg is not None and msg.subject == "saga.cmd.payment.charge.v1",
                "payment: pulls its own command from durable payment", how if msg is None else msg.subject)
        if msg is not None:
            c.check(msg.reply.startswith("$JS.ACK.SAGA_CMD.payment."), "ack subject has the form "
                    "$JS.ACK.<stream>.<durable>.… covered by the ack permission", msg.reply)
            mark = len(pay.errors)
            forged = msg.reply.replace("SAGA_CMD.payment.", "SAGA_CMD.inventory.", 1)
            await pay.nc.publish(forged, b"+ACK")
            await pay.settle()
            c.check(pay.violation("Publish", forged, mark), "payment: denied ack on durable inventory", forged)
            c.check(await ack(pay, msg), "payment: acks on $JS.ACK.SAGA_CMD.payment.>")

        inv_msg, how = await pull_one(inv, "SAGA_CMD", "inventory")
        c.check(inv_msg is not None and inv_msg.subject == "saga.cmd.inventory.reserve.v1",
                "inventory: its command was not taken by payment; pulls it", how)
        if inv_msg is not None:
            c.check(await ack(inv, inv_msg), "inventory: acks on $JS.ACK.SAGA_CMD.inventory.>")
        await asyncio.sleep(0.1)
        for spy in spies:
            seen = []
            while True:
                try:
                    m = await spy.next_msg(timeout=0.05)
                    seen.append(m.subject)
                except Exception:  # noqa: BLE001
                    break
            try:
                await spy.unsubscribe()
            except Exception:  # noqa: BLE001
                pass
            c.check(not seen, f"payment: its refused {spy.subject} subscription received nothing",
                    f"saw {len(seen)}: {', '.join(sorted(set(seen)))}" if seen else "")

        # more things payment must not do
        await expect_denied_pub(c, pay, "$JS.API.CONSUMER.CREATE.SAGA_CMD.inventory.saga.cmd.inventory.>",
                                {"stream_name": "SAGA_CMD", "config": {"durable_name": "inventory",
                                 "filter_subject": "saga.cmd.inventory.>", "ack_policy": "explicit"}, "action": ""},
                                "create/update durable inventory")
        await expect_denied_pub(c, pay, "$JS.API.CONSUMER.DURABLE.CREATE.SAGA_CMD.payment",
                                {"stream_name": "SAGA_CMD", "config": {"durable_name": "payment",
                                 "filter_subject": "saga.cmd.inventory.>", "ack_policy": "explicit"}},
                                "legacy DURABLE.CREATE (filter only in the body)")
        await expect_denied_pub(c, pay, "$JS.API.CONSUMER.CREATE.SAGA_CMD.spy",
                                {"stream_name": "SAGA_CMD", "config": {"ack_policy": "explicit"}},
                                "create another (ephemeral/named) consumer")
        await expect_denied_pub(c, pay, "$JS.API.CONSUMER.INFO.SAGA_CMD.inventory", {},
                                "CONSUMER.INFO.SAGA_CMD.inventory")
        for body_cfg, what in [
            ({"filter_subject": "saga.cmd.inventory.>"}, "filter_subject"),
            ({"filter_subjects": ["saga.cmd.inventory.>"]}, "filter_subjects"),
        ]:
            cfg = {"durable_name": "payment", "ack_policy": "explicit", **body_cfg}
            status, data = await pay.api("$JS.API.CONSUMER.CREATE.SAGA_CMD.payment.saga.cmd.payment.>",
                                         {"stream_name": "SAGA_CMD", "config": cfg, "action": ""})
            c.check(status == "error", f"payment: server rejects its own durable with a foreign {what} in the body",
                    (data or {}).get("error", {}).get("description", status))
        await expect_denied_js_publish(c, pay, "saga.cmd.inventory.reserve.v1", "forge a command (saga.cmd.inventory.reserve.v1)")
        await expect_denied_js_publish(c, pay, "orders.completed.v1")
        await expect_denied_js_publish(c, pay, "saga.dlq.saga.cmd.inventory.reserve.v1",
                                       "dead-letter for inventory (saga.dlq.saga.cmd.inventory.reserve.v1)")
        await expect_denied_pub(c, pay, "$JS.API.STREAM.MSG.GET.SAGA_DLQ", {"seq": 1})
        await expect_denied_sub(c, pay, "orders.>")
        await check_common_denials(c, pay)

        # --- inventory and shipping: replies, own dead letters, no foreign replies
        for p, other in [("inventory", "payment"), ("shipping", "inventory")]:
            u = users[p]
            await expect_allowed_js_publish(c, u, f"saga.reply.{p}.verify.v1", "SAGA_REPLY")
            await expect_denied_js_publish(c, u, f"saga.reply.{other}.verify.v1")
            await expect_denied_pub(c, u, f"$JS.API.CONSUMER.MSG.NEXT.SAGA_CMD.{other}", {"batch": 1, "expires": NS})
            await expect_denied_sub(c, u, f"saga.cmd.{other}.>")

        # --- payment dead-letters its command; sagactl lists, replays, deletes it
        dlq_subject = "saga.dlq.saga.cmd.payment.charge.v1"
        mark = len(pay.errors)
        ack_dlq = await pay.js.publish(dlq_subject, b'{"verify":true}', headers={
            **TEST_HEADERS, "Dlq-Subject": "saga.cmd.payment.charge.v1", "Dlq-Error": "verify-permissions"})
        c.check(ack_dlq.stream == "SAGA_DLQ" and not pay.violation("Publish", dlq_subject, mark),
                f"payment: JetStream publish of its dead letter {dlq_subject}", f"seq={ack_dlq.seq}")

        await expect_allowed_api(c, ctl, "$JS.API.STREAM.INFO.SAGA_DLQ", what="STREAM.INFO.SAGA_DLQ")
        for s in ("SAGA_CMD", "SAGA_REPLY", "ORDERS"):
            await expect_allowed_api(c, ctl, f"$JS.API.STREAM.INFO.{s}", what=f"STREAM.INFO.{s} (chaos)")
        got = await expect_allowed_api(c, ctl, "$JS.API.STREAM.MSG.GET.SAGA_DLQ", {"seq": ack_dlq.seq},
                                       what="STREAM.MSG.GET.SAGA_DLQ")
        if got:
            c.check(got["message"]["subject"] == dlq_subject, "sagactl: reads the dead letter",
                    got["message"]["subject"])
        await expect_allowed_js_publish(c, ctl, "saga.cmd.payment.charge.v1", "SAGA_CMD")
        await expect_allowed_js_publish(c, ctl, "saga.reply.payment.charged.v1", "SAGA_REPLY")
        await expect_allowed_api(c, ctl, "$JS.API.STREAM.MSG.DELETE.SAGA_DLQ", {"seq": ack_dlq.seq},
                                 what="STREAM.MSG.DELETE.SAGA_DLQ")
        orders_sub = await ctl.nc.subscribe("orders.>")
        await ctl.settle()
        await expect_allowed_js_publish(c, orch, "orders.verify.v1", "ORDERS")
        try:
            m = await orders_sub.next_msg(timeout=2)
            c.check(m.subject == "orders.verify.v1", "sagactl: subscribes orders.> and receives order events")
        except Exception as e:  # noqa: BLE001
            c.check(False, "sagactl: subscribes orders.> and receives order events", type(e).__name__)
        await orders_sub.unsubscribe()
        await expect_denied_pub(c, ctl, "$JS.API.STREAM.UPDATE.SAGA_DLQ", stream_config("SAGA_DLQ", 1))
        await expect_denied_pub(c, ctl, "$JS.API.STREAM.MSG.GET.SAGA_CMD", {"seq": 1})
        await expect_denied_pub(c, ctl, "$JS.API.CONSUMER.CREATE.SAGA_DLQ", {"stream_name": "SAGA_DLQ", "config": {}})
        await expect_denied_js_publish(c, ctl, "orders.completed.v1")
        await expect_denied_js_publish(c, ctl, "saga.dlq.saga.cmd.payment.charge.v1")
        await expect_denied_sub(c, ctl, "saga.cmd.>")
        await check_common_denials(c, ctl)

        # --- orchestrator: consumes replies, publishes its dead letters, forges no replies
        await expect_allowed_js_publish(c, orch, "saga.dlq.saga.reply.payment.charged.v1", "SAGA_DLQ")
        await expect_denied_js_publish(c, orch, "saga.reply.payment.charged.v1", "forge a reply (saga.reply.payment.charged.v1)")
        await expect_denied_js_publish(c, orch, "saga.dlq.saga.cmd.payment.charge.v1")
        await expect_denied_pub(c, orch, "$JS.API.CONSUMER.MSG.NEXT.SAGA_CMD.payment", {"batch": 1, "expires": NS})
        await expect_denied_pub(c, orch, "$JS.API.STREAM.MSG.DELETE.SAGA_DLQ", {"seq": 1})
        await expect_denied_sub(c, orch, "saga.cmd.>")
        await check_common_denials(c, orch)
        msg, how = await pull_one(orch, "SAGA_REPLY", "orchestrator")
        c.check(msg is not None and msg.subject.startswith("saga.reply."),
                "orchestrator: pulls a reply from durable orchestrator", how if msg is None else msg.subject)
        if msg is not None:
            c.check(await ack(orch, msg), "orchestrator: acks on $JS.ACK.SAGA_REPLY.orchestrator.>")

        # --- clean up what the test left (own durables only; the latest dead letter via sagactl)
        left = await drain_test_messages(orch, "SAGA_REPLY", "orchestrator")
        for p in PARTICIPANTS:
            left += await drain_test_messages(users[p], "SAGA_CMD", p)
        status, data = await ctl.api("$JS.API.STREAM.INFO.SAGA_DLQ")
        if status == "ok":
            last = data["state"]["last_seq"]
            got = (await ctl.api("$JS.API.STREAM.MSG.GET.SAGA_DLQ", {"seq": last}))[1]
            if "message" in got and got["message"]["subject"] == "saga.dlq.saga.reply.payment.charged.v1":
                await ctl.api("$JS.API.STREAM.MSG.DELETE.SAGA_DLQ", {"seq": last})
        print(f"(cleaned up {left} test messages from work queues)")

        unexpected = [e for u in users.values() for e in u.errors if "permissions violation" not in e.lower()]
        c.check(not unexpected, "no unexpected asynchronous errors", "; ".join(unexpected)[:300])
    finally:
        for u in users.values():
            await u.close()

    print(f"\n{c.passed} passed, {c.failed} failed, {c.warned} warnings")
    return 1 if c.failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", default=os.environ.get("NATS_URL", "nats://127.0.0.1:4222"),
                    help="server URL (default: $NATS_URL or nats://127.0.0.1:4222)")
    ap.add_argument("--replicas", type=int, default=1, help="replicas for streams this script creates")
    ap.add_argument("--timeout", type=float, default=3.0, help="request timeout in seconds")
    ap.add_argument("--deny-timeout", type=float, default=0.5,
                    help="how long a refused request waits for an answer that must not come")
    return asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
