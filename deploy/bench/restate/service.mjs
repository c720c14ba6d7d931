// Order saga on Restate: orchestrator + participants in one Node process.
// Two shapes, selected by env SHAPE (default "objects"):
//
// SHAPE=objects  -- every participant step is a separate Restate Virtual Object invocation
//   orders    (Virtual Object, key = orderId)   run(order) -> {orderId,status,reason}
//   inventory (Virtual Object, key = productId) reserve/release/seed, getStock (shared)
//   payment   (Virtual Object, key = orderId)   charge/refund
//   shipping  (Virtual Object, key = orderId)   ship
//   Every participant call is an awaited durable Restate call (journaled).
//
// SHAPE=inline   -- "participants inside the service process"
//   orders    (Virtual Object, key = orderId)   run(order) -> {orderId,status,reason}
//     the whole saga is ONE invocation; each participant step is a durable side effect
//     ctx.run("reserve"|"charge"|"ship"|"release"|"refund", ...) calling plain in-process code.
//   stockview (Service)  get({productId}) / seed({productId, stock}) / participants()
//     plain reads/writes of the in-process participant state, for the driver's checks.
//   Participant state lives in this process's memory (Maps below): it is NOT durable across a
//   service restart (the journal of each saga is; the participants are in-memory stand-ins).
import * as http2 from "node:http2";
import * as restate from "@restatedev/restate-sdk";

const PAYMENT_SUCCESS_RATE = Number(process.env.PAYMENT_SUCCESS_RATE ?? "0.9");
const SHIPPING_SUCCESS_RATE = Number(process.env.SHIPPING_SUCCESS_RATE ?? "1.0");
const PORT = Number(process.env.SERVICE_PORT ?? "19080");
const HOST = process.env.SERVICE_HOST ?? "127.0.0.1";
const SHAPE = process.env.SHAPE ?? "objects";
if (SHAPE !== "objects" && SHAPE !== "inline") throw new Error(`unknown SHAPE=${SHAPE} (objects|inline)`);

// ---------------- inventory: durable stock per product ----------------
const inventory = restate.object({
  name: "inventory",
  handlers: {
    // {qty} -> {ok, stock}
    reserve: async (ctx, req) => {
      const qty = req.qty;
      const stock = (await ctx.get("stock")) ?? 0;
      if (!Number.isInteger(qty) || qty <= 0 || stock < qty) {
        return { ok: false, stock };
      }
      ctx.set("stock", stock - qty);
      ctx.set("reserved", ((await ctx.get("reserved")) ?? 0) + qty);
      return { ok: true, stock: stock - qty };
    },
    // {qty} -> {stock}
    release: async (ctx, req) => {
      const stock = ((await ctx.get("stock")) ?? 0) + req.qty;
      ctx.set("stock", stock);
      ctx.set("released", ((await ctx.get("released")) ?? 0) + req.qty);
      return { stock };
    },
    // {stock} -> resets stock and counters (used by the driver before a run)
    seed: async (ctx, req) => {
      ctx.set("stock", req.stock);
      ctx.set("initial", req.stock);
      ctx.set("reserved", 0);
      ctx.set("released", 0);
      return { stock: req.stock };
    },
    getStock: restate.handlers.object.shared(async (ctx) => ({
      product: ctx.key,
      initial: (await ctx.get("initial")) ?? 0,
      stock: (await ctx.get("stock")) ?? 0,
      reserved: (await ctx.get("reserved")) ?? 0,
      released: (await ctx.get("released")) ?? 0,
    })),
  },
});

// ---------------- payment: durable charge record per order ----------------
const payment = restate.object({
  name: "payment",
  handlers: {
    // {amountCents} -> {ok}
    charge: async (ctx, req) => {
      // ctx.rand is seeded from the invocation id: deterministic on replay.
      const ok = ctx.rand.random() < PAYMENT_SUCCESS_RATE;
      ctx.set("charge", { amountCents: req.amountCents, status: ok ? "charged" : "declined" });
      return { ok };
    },
    refund: async (ctx) => {
      const c = await ctx.get("charge");
      if (c && c.status === "charged") {
        ctx.set("charge", { ...c, status: "refunded" });
      }
      return { ok: true };
    },
  },
});

// ---------------- shipping: durable shipment record per order ----------------
const shipping = restate.object({
  name: "shipping",
  handlers: {
    // {items} -> {ok}
    ship: async (ctx, req) => {
      const ok = SHIPPING_SUCCESS_RATE >= 1 ? true : ctx.rand.random() < SHIPPING_SUCCESS_RATE;
      if (ok) ctx.set("shipment", { items: req.items.length, status: "shipped" });
      return { ok };
    },
  },
});

// ---------------- orders: the saga orchestrator ----------------
// One saga for both shapes; `stepsOf(ctx, orderId)` says how each participant step is made.
const ordersObject = (stepsOf) => restate.object({
  name: "orders",
  handlers: {
    // {items:[{productId, qty}], amountCents} -> {orderId, status, reason}
    run: async (ctx, order) => {
      const orderId = ctx.key;
      const steps = stepsOf(ctx, orderId);
      ctx.set("order", order);
      const finish = (status, reason) => {
        ctx.set("status", status);
        return { orderId, status, reason };
      };
      const releaseAll = async (reserved) => {
        for (const it of reserved) await steps.release(it);
      };

      // (a) reserve inventory, line by line
      const reserved = [];
      for (const it of order.items) {
        const r = await steps.reserve(it);
        if (!r.ok) {
          await releaseAll(reserved);
          return finish("cancelled", "out_of_stock");
        }
        reserved.push(it);
      }

      // (b) charge payment
      const p = await steps.charge(order.amountCents);
      if (!p.ok) {
        await releaseAll(reserved);
        return finish("cancelled", "payment_declined");
      }

      // (c) ship
      const s = await steps.ship(order.items);
      if (!s.ok) {
        await steps.refund();
        await releaseAll(reserved);
        return finish("cancelled", "shipping_failed");
      }
      return finish("shipped", null);
    },
    status: restate.handlers.object.shared(async (ctx) => ({
      orderId: ctx.key,
      status: (await ctx.get("status")) ?? null,
    })),
  },
});

// SHAPE=objects: every step is an invocation of a participant's Virtual Object.
const orders = ordersObject((ctx, orderId) => ({
  reserve: (it) => ctx.objectClient(inventory, it.productId).reserve({ qty: it.qty }),
  release: (it) => ctx.objectClient(inventory, it.productId).release({ qty: it.qty }),
  charge: (amountCents) => ctx.objectClient(payment, orderId).charge({ amountCents }),
  refund: () => ctx.objectClient(payment, orderId).refund(),
  ship: (items) => ctx.objectClient(shipping, orderId).ship({ items }),
}));

// =====================================================================================
// SHAPE=inline: participants are plain in-process code; their calls are journaled by
// Restate as ctx.run side effects of the single orders/<orderId>/run invocation.
// =====================================================================================
const mem = {
  stock: new Map(),     // productId -> {initial, stock, reserved, released}
  payments: new Map(),  // orderId   -> {amountCents, status: charged|declined|refunded}
  shipments: new Map(), // orderId   -> {items, status: shipped}
  applied: new Map(),   // opKey -> result: makes each participant op idempotent, because
                        // ctx.run is at-least-once (an action can re-run if the failure
                        // happens between running it and its result becoming durable).
};
const once = (opKey, fn) => {
  if (mem.applied.has(opKey)) return mem.applied.get(opKey);
  const r = fn();
  mem.applied.set(opKey, r);
  return r;
};
const stockRow = (productId) => {
  let row = mem.stock.get(productId);
  if (!row) { row = { initial: 0, stock: 0, reserved: 0, released: 0 }; mem.stock.set(productId, row); }
  return row;
};
const participants = {
  reserve: (orderId, productId, qty) => once(`reserve/${orderId}/${productId}`, () => {
    const row = stockRow(productId);
    if (!Number.isInteger(qty) || qty <= 0 || row.stock < qty) return { ok: false, stock: row.stock };
    row.stock -= qty; row.reserved += qty;
    return { ok: true, stock: row.stock };
  }),
  release: (orderId, productId, qty) => once(`release/${orderId}/${productId}`, () => {
    const row = stockRow(productId);
    row.stock += qty; row.released += qty;
    return { stock: row.stock };
  }),
  // Math.random is fine here: the decision is the journaled result of ctx.run("charge"),
  // and `once` returns the same decision if the action is re-run.
  charge: (orderId, amountCents) => once(`charge/${orderId}`, () => {
    const ok = Math.random() < PAYMENT_SUCCESS_RATE;
    mem.payments.set(orderId, { amountCents, status: ok ? "charged" : "declined" });
    return { ok };
  }),
  refund: (orderId) => once(`refund/${orderId}`, () => {
    const c = mem.payments.get(orderId);
    if (c && c.status === "charged") c.status = "refunded";
    return { ok: true };
  }),
  ship: (orderId, items) => once(`ship/${orderId}`, () => {
    const ok = SHIPPING_SUCCESS_RATE >= 1 ? true : Math.random() < SHIPPING_SUCCESS_RATE;
    if (ok) mem.shipments.set(orderId, { items: items.length, status: "shipped" });
    return { ok };
  }),
};

// One journaled side effect per step (per line for reserve and release, as in objects).
const ordersInline = ordersObject((ctx, orderId) => ({
  reserve: (it) => ctx.run("reserve", () => participants.reserve(orderId, it.productId, it.qty)),
  release: (it) => ctx.run("release", () => participants.release(orderId, it.productId, it.qty)),
  charge: (amountCents) => ctx.run("charge", () => participants.charge(orderId, amountCents)),
  refund: () => ctx.run("refund", () => participants.refund(orderId)),
  ship: (items) => ctx.run("ship", () => participants.ship(orderId, items)),
}));

// Plain reads/writes of the in-process participant state (used by the driver only).
const stockview = restate.service({
  name: "stockview",
  handlers: {
    // {productId} -> {product, initial, stock, reserved, released}
    get: async (ctx, req) => ({ product: req.productId, ...stockRow(req.productId) }),
    // {productId, stock} -> resets stock and counters (idempotent)
    seed: async (ctx, req) => {
      mem.stock.set(req.productId, { initial: req.stock, stock: req.stock, reserved: 0, released: 0 });
      return { stock: req.stock };
    },
    // -> {payments: {charged, declined, refunded}, shipments}
    participants: async () => {
      const payments = { charged: 0, declined: 0, refunded: 0 };
      for (const c of mem.payments.values()) payments[c.status]++;
      return { payments, shipments: mem.shipments.size };
    },
  },
});

const endpoint =
  SHAPE === "inline"
    ? restate.endpoint().bind(ordersInline).bind(stockview)
    : restate.endpoint().bind(orders).bind(inventory).bind(payment).bind(shipping);
const server = http2.createServer(endpoint.http2Handler());
server.listen(PORT, HOST, () => {
  console.log(`restate service endpoint listening on ${HOST}:${PORT} (shape ${SHAPE}, payment success rate ${PAYMENT_SUCCESS_RATE}, shipping ${SHIPPING_SUCCESS_RATE})`);
});
const stop = () => { server.close(); process.exit(0); };
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
