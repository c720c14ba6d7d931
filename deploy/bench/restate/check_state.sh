#!/usr/bin/env bash
# Cross-checks durable participant state via Restate's admin SQL API (run while processes are up,
# e.g. after `./run.sh N C keep`). Covers every order in the data dir (warm-up + measurement).
# With SHAPE=inline or inline-rust (export it as for run.sh) the participant part is read from the service process.
# Expect: orders shipped == payment charged == shipments; orders cancelled == payment declined + refunded.
q() { curl -s -m 30 -X POST http://127.0.0.1:19070/query -H 'content-type: application/json' \
        -H 'accept: application/json' -d "{\"query\":\"$1\"}"; echo; }
echo "orders by status:";    q "SELECT value_utf8 AS status, count(*) AS n FROM state WHERE service_name='orders' AND key='status' GROUP BY value_utf8"
if [ "${SHAPE:-objects}" = inline ] || [ "${SHAPE:-objects}" = inline-rust ]; then
  # SHAPE=inline / inline-rust: participant state is in the service process's memory, read it via stockview.
  i() { curl -s -m 10 -X POST "http://127.0.0.1:18080/stockview/$1" -H 'content-type: application/json' -d "$2"; echo; }
  echo "in-process payments/shipments:"; i participants '{}'
  echo "in-process inventory per product:"
  for p in $(seq 0 $((${PRODUCTS:-10} - 1))); do i get "{\"productId\":\"p$p\"}"; done
  exit 0
fi
echo "payment records:";     q "SELECT CASE WHEN value_utf8 LIKE '%charged%' THEN 'charged' WHEN value_utf8 LIKE '%declined%' THEN 'declined' ELSE 'refunded' END AS s, count(*) AS n FROM state WHERE service_name='payment' AND key='charge' GROUP BY 1"
echo "shipments:";           q "SELECT count(*) AS n FROM state WHERE service_name='shipping' AND key='shipment'"
echo "inventory per product:"; q "SELECT service_key AS product, key, value_utf8 FROM state WHERE service_name='inventory' ORDER BY service_key, key"
