// Closed-loop load driver for the Restate order saga.
// usage: node driver.mjs N C
// env: INGRESS (default http://127.0.0.1:18080), PRODUCTS (10), INITIAL_STOCK (1e12),
//      SEED (1 = reseed stock before the run, default 1), CHECK (1 = conservation check, default 1),
//      RESTATE_PID / SERVICE_PID (else read from run/*.pid), TAG (order-id prefix), QUIET,
//      SHAPE (objects|inline|inline-rust, must match the service's SHAPE; only changes how stock is seeded/read;
//             inline and inline-rust expose the same stockview service),
//      TUNED (only recorded in the result)
import * as http from "node:http";
import * as fs from "node:fs";

const N = Number(process.argv[2] ?? 1000);
const C = Number(process.argv[3] ?? 16);
const INGRESS = new URL(process.env.INGRESS ?? "http://127.0.0.1:18080");
const PRODUCTS = Number(process.env.PRODUCTS ?? 10);
const INITIAL_STOCK = Number(process.env.INITIAL_STOCK ?? 1e12);
const SEED = (process.env.SEED ?? "1") === "1";
const CHECK = (process.env.CHECK ?? "1") === "1";
const TAG = process.env.TAG ?? `r${Date.now().toString(36)}`;
const SHAPE = process.env.SHAPE ?? "objects";
const TUNED = process.env.TUNED === "1";
const INLINE = SHAPE === "inline" || SHAPE === "inline-rust"; // same handlers, Node vs Rust SDK
// participant state access per shape: Restate-durable objects vs in-process Maps (stockview)
const seedStock = (p, stock) =>
  INLINE ? post(`/stockview/seed`, { productId: p, stock }) : post(`/inventory/${p}/seed`, { stock });
const getStock = (p) =>
  INLINE ? post(`/stockview/get`, { productId: p }) : post(`/inventory/${p}/getStock`);
const getParticipants = () => (INLINE ? post(`/stockview/participants`, {}) : Promise.resolve(null));
const DIR = new URL(".", import.meta.url).pathname;
const CLK_TCK = 100;

const agent = new http.Agent({ keepAlive: true, maxSockets: Math.max(C, 4), maxFreeSockets: Math.max(C, 4) });

function post(path, body) {
  const data = body === undefined ? "" : JSON.stringify(body);
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        host: INGRESS.hostname, port: INGRESS.port, path, method: "POST", agent,
        headers: { "content-type": "application/json", "content-length": Buffer.byteLength(data) },
      },
      (res) => {
        const chunks = [];
        res.on("data", (c) => chunks.push(c));
        res.on("end", () => {
          const text = Buffer.concat(chunks).toString();
          if (res.statusCode !== 200) return reject(new Error(`HTTP ${res.statusCode} ${path}: ${text}`));
          try { resolve(text ? JSON.parse(text) : null); } catch (e) { reject(e); }
        });
      },
    );
    req.on("error", reject);
    req.end(data);
  });
}

function pidOf(envName, file) {
  if (process.env[envName]) return Number(process.env[envName]);
  try { return Number(fs.readFileSync(`${DIR}run/${file}`, "utf8").trim()); } catch { return null; }
}
function cpuTicks(pid) {
  if (!pid) return null;
  try {
    const s = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
    const f = s.slice(s.lastIndexOf(")") + 2).split(" "); // f[0] = field 3 (state)
    return Number(f[11]) + Number(f[12]); // utime (14) + stime (15)
  } catch { return null; }
}

// deterministic PRNG for order generation (mulberry32)
let seed = 12345;
function rnd() {
  seed |= 0; seed = (seed + 0x6d2b79f5) | 0;
  let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
  t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
}
function makeOrder() {
  const nItems = 1 + Math.floor(rnd() * 3);
  const pool = [...Array(PRODUCTS).keys()];
  const items = [];
  for (let i = 0; i < nItems && pool.length; i++) {
    const j = Math.floor(rnd() * pool.length);
    const p = pool.splice(j, 1)[0];
    items.push({ productId: `p${p}`, qty: 1 + Math.floor(rnd() * 5) });
  }
  return { items, amountCents: 100 + Math.floor(rnd() * 100000) };
}
function pct(sorted, q) {
  if (!sorted.length) return null;
  return sorted[Math.min(sorted.length - 1, Math.ceil(q * sorted.length) - 1)];
}
const r2 = (x) => (x == null ? null : Math.round(x * 100) / 100);

async function main() {
  const products = [...Array(PRODUCTS).keys()].map((i) => `p${i}`);
  if (SEED) for (const p of products) await seedStock(p, INITIAL_STOCK);
  const before = CHECK ? await Promise.all(products.map(getStock)) : null;
  const partBefore = CHECK ? await getParticipants() : null;

  const orders = Array.from({ length: N }, makeOrder);
  const lat = new Array(N);
  const done = []; // completion timestamps
  const outcomes = { shipped: 0, cancelled: 0 };
  const reasons = {};
  const shippedQty = Object.fromEntries(products.map((p) => [p, 0]));
  let errors = 0, firstError = null;

  const rsPid = pidOf("RESTATE_PID", "restate-server.pid");
  const svPid = pidOf("SERVICE_PID", "service.pid");
  const rs0 = cpuTicks(rsPid), sv0 = cpuTicks(svPid);
  const drv0 = process.cpuUsage();

  let next = 0;
  const t0 = performance.now();
  async function client() {
    while (true) {
      const i = next++;
      if (i >= N) return;
      const start = performance.now();
      try {
        const res = await post(`/orders/${TAG}-${i}/run`, orders[i]);
        const end = performance.now();
        lat[i] = end - start;
        done.push(end);
        outcomes[res.status] = (outcomes[res.status] ?? 0) + 1;
        if (res.reason) reasons[res.reason] = (reasons[res.reason] ?? 0) + 1;
        if (res.status === "shipped") for (const it of orders[i].items) shippedQty[it.productId] += it.qty;
      } catch (e) {
        errors++; firstError ??= String(e.message ?? e);
        done.push(performance.now());
      }
    }
  }
  await Promise.all(Array.from({ length: C }, client));
  const t1 = performance.now();

  const rs1 = cpuTicks(rsPid), sv1 = cpuTicks(svPid);
  const drv = process.cpuUsage(drv0);

  done.sort((a, b) => a - b);
  const skip = Math.floor(N * 0.05);
  const tStart = skip > 0 ? done[skip - 1] : t0;
  const steadyRate = (done.length - skip) / ((done[done.length - 1] - tStart) / 1000);
  const l = lat.filter((x) => x !== undefined).sort((a, b) => a - b);

  const cpu = (a, b) => (a == null || b == null ? null : (b - a) / CLK_TCK);
  const rsCpu = cpu(rs0, rs1), svCpu = cpu(sv0, sv1);
  const ok = N - errors;
  const out = {
    shape: SHAPE,
    tuned: TUNED,
    orders: N,
    concurrency: C,
    completed_ok: ok,
    errors,
    ...(firstError ? { first_error: firstError } : {}),
    wall_s: r2((t1 - t0) / 1000),
    sagas_per_s: r2(steadyRate),
    sagas_per_s_incl_warmup_5pct: r2(done.length / ((t1 - t0) / 1000)),
    latency_ms: { p50: r2(pct(l, 0.5)), p90: r2(pct(l, 0.9)), p99: r2(pct(l, 0.99)), max: r2(l[l.length - 1]), mean: r2(l.reduce((a, b) => a + b, 0) / (l.length || 1)) },
    outcomes,
    cancel_reasons: reasons,
    cpu_s: { restate_server: rsCpu, service: svCpu, total: rsCpu != null && svCpu != null ? r2(rsCpu + svCpu) : null, driver: r2((drv.user + drv.system) / 1e6) },
    cpu_ms_per_saga: {
      restate_server: rsCpu == null ? null : r2((rsCpu * 1000) / N),
      service: svCpu == null ? null : r2((svCpu * 1000) / N),
      total: rsCpu == null || svCpu == null ? null : r2(((rsCpu + svCpu) * 1000) / N),
    },
    pids: { restate_server: rsPid, service: svPid },
  };

  if (CHECK) {
    const after = await Promise.all(products.map(getStock));
    const partAfter = await getParticipants();
    const bad = [];
    for (let k = 0; k < products.length; k++) {
      const b = before[k], a = after[k], p = products[k];
      const netReserved = (a.reserved - b.reserved) - (a.released - b.released);
      // (1) initial - reserved-and-not-released == final  (from inventory's own counters)
      // (2) that net amount equals the quantity of shipped orders seen by the driver
      if (b.stock - netReserved !== a.stock || netReserved !== shippedQty[p]) {
        bad.push({ product: p, before: b.stock, after: a.stock, netReserved, shippedQty: shippedQty[p] });
      }
    }
    out.consistency = {
      ok: bad.length === 0 && errors === 0,
      products_checked: products.length,
      stock_delta_total: after.reduce((s, a, k) => s + (before[k].stock - a.stock), 0),
      shipped_qty_total: Object.values(shippedQty).reduce((a, b) => a + b, 0),
      ...(bad.length ? { mismatches: bad } : {}),
    };
    if (partBefore && partAfter) {
      // inline shape: in-process payment/shipment records must match the driver-observed outcomes
      const d = (k) => partAfter.payments[k] - partBefore.payments[k];
      const part = {
        charged: d("charged"), declined: d("declined"), refunded: d("refunded"),
        shipments: partAfter.shipments - partBefore.shipments,
      };
      part.ok =
        part.charged === (outcomes.shipped ?? 0) &&
        part.shipments === (outcomes.shipped ?? 0) &&
        part.declined === (reasons.payment_declined ?? 0) &&
        part.refunded === (reasons.shipping_failed ?? 0);
      out.consistency.participants = part;
      out.consistency.ok = out.consistency.ok && part.ok;
    }
  }
  if (!process.env.QUIET) console.log(JSON.stringify(out, null, 2));
  else console.log(JSON.stringify({ shape: SHAPE, tuned: TUNED, orders: N, concurrency: C, errors, wall_s: out.wall_s, sagas_per_s: out.sagas_per_s, outcomes, consistency_ok: out.consistency?.ok }));
  agent.destroy();
  process.exitCode = errors || (out.consistency && !out.consistency.ok) ? 1 : 0;
}
main().catch((e) => { console.error(e); process.exit(2); });
