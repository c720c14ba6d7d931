//! REST authentication: bearer JWTs with scopes, verified offline (ES256 PEM on the orchestrator,
//! RS256 JWKS on a participant).

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::json;

use saga_e2e_tests::{Stack, StackOptions, order_body, product};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

struct Claims<'a> {
    scope: &'a str,
    exp: i64,
    nbf: i64,
    iss: &'a str,
    aud: &'a str,
}

impl Default for Claims<'_> {
    fn default() -> Self {
        Claims {
            scope: "",
            exp: now() + 600,
            nbf: now() - 10,
            iss: "https://issuer.test",
            aud: "saga-api",
        }
    }
}

fn es256(c: Claims) -> String {
    let key =
        EncodingKey::from_ec_pem(&std::fs::read(fixture("es256-private.pem")).unwrap()).unwrap();
    let body = json!({"sub": "tester", "scope": c.scope, "exp": c.exp, "nbf": c.nbf, "iss": c.iss, "aud": c.aud});
    encode(&Header::new(Algorithm::ES256), &body, &key).unwrap()
}

fn rs256(scope: &str, kid: &str) -> String {
    let key =
        EncodingKey::from_rsa_pem(&std::fs::read(fixture("rs256-private.pem")).unwrap()).unwrap();
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.into());
    let body = json!({"sub": "tester", "scp": [scope], "exp": now() + 600});
    encode(&header, &body, &key).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_verified_and_scopes_enforced() {
    let pem = fixture("es256-public.pem").display().to_string();
    let jwks = fixture("jwks.json").display().to_string();
    let opts = StackOptions::default()
        .with("orchestrator", "AUTH_MODE", "jwt")
        .with("orchestrator", "AUTH_JWT_PUBLIC_KEY_FILE", &pem)
        .with("orchestrator", "AUTH_JWT_ISSUER", "https://issuer.test")
        .with("orchestrator", "AUTH_JWT_AUDIENCE", "saga-api")
        .with("payment", "AUTH_MODE", "jwt")
        .with("payment", "AUTH_JWKS_FILE", &jwks);
    let stack = Stack::start_with(opts).await;
    let tea = product("tea");
    stack.set_stock(&tea, 5).await;
    let body = order_body("ann", &[(&tea, 1, 100)]);
    let post = |token: Option<String>| {
        let mut req = stack
            .http
            .post(stack.url("orchestrator", "/orders"))
            .json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            let challenge = r
                .headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap().to_owned());
            let ctype = r.headers()["content-type"].to_str().unwrap().to_owned();
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            (status, challenge, ctype, body)
        }
    };

    let (s, challenge, ctype, problem) = post(None).await;
    assert_eq!((s, challenge.as_deref()), (401, Some("Bearer")));
    assert_eq!(ctype, "application/problem+json");
    assert_eq!(problem["status"], 401);

    let write = |c: Claims| {
        es256(Claims {
            scope: "orders:write orders:read",
            ..c
        })
    };
    for (bad, why) in [
        (
            write(Claims {
                exp: now() - 3600,
                ..Default::default()
            }),
            "expired",
        ),
        (
            write(Claims {
                nbf: now() + 3600,
                ..Default::default()
            }),
            "not yet valid",
        ),
        (
            write(Claims {
                iss: "https://evil.test",
                ..Default::default()
            }),
            "wrong issuer",
        ),
        (
            write(Claims {
                aud: "other-api",
                ..Default::default()
            }),
            "wrong audience",
        ),
        (
            rs256("orders:write", "test-rsa"),
            "signed by a key the orchestrator does not trust",
        ),
        (format!("{}x", write(Claims::default())), "bad signature"),
        ("not.a.jwt".to_string(), "garbage"),
    ] {
        let (s, challenge, _, _) = post(Some(bad)).await;
        assert_eq!(s, 401, "{why}");
        assert!(challenge.unwrap().contains("invalid_token"), "{why}");
    }

    let (s, challenge, _, problem) = post(Some(es256(Claims {
        scope: "orders:read",
        ..Default::default()
    })))
    .await;
    assert_eq!(s, 403, "{problem}");
    assert!(challenge.unwrap().contains("insufficient_scope"));

    let (s, _, _, order) = post(Some(write(Claims::default()))).await;
    assert_eq!(s, 202, "{order}");
    let id = order["id"].as_str().unwrap();

    // Reading needs orders:read; cancelling needs orders:admin.
    let get = stack
        .http
        .get(stack.url("orchestrator", &format!("/orders/{id}")));
    assert_eq!(get.try_clone().unwrap().send().await.unwrap().status(), 401);
    let read = es256(Claims {
        scope: "orders:read",
        ..Default::default()
    });
    assert_eq!(get.bearer_auth(&read).send().await.unwrap().status(), 200);
    let cancel = stack
        .http
        .post(stack.url("orchestrator", &format!("/orders/{id}/cancel")));
    let r = cancel
        .try_clone()
        .unwrap()
        .bearer_auth(write(Claims::default()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let admin = es256(Claims {
        scope: "orders:admin",
        ..Default::default()
    });
    let r = cancel.bearer_auth(&admin).send().await.unwrap();
    assert!(r.status() == 202 || r.status() == 409, "{}", r.status());

    // The participant checks RS256 tokens against its JWKS, by kid.
    let payment = stack.url("payment", &format!("/payments/{id}"));
    assert_eq!(stack.http.get(&payment).send().await.unwrap().status(), 401);
    let r = stack
        .http
        .get(&payment)
        .bearer_auth(rs256("orders:read", "test-rsa"))
        .send()
        .await
        .unwrap();
    assert!(r.status() == 200 || r.status() == 404, "{}", r.status());
    let r = stack
        .http
        .get(&payment)
        .bearer_auth(rs256("orders:read", "unknown-kid"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let chaos = stack.url("payment", "/chaos");
    let r = stack
        .http
        .get(&chaos)
        .bearer_auth(rs256("orders:read", "test-rsa"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "chaos controls need orders:admin");

    // Operations endpoints stay open.
    for svc in ["orchestrator", "payment"] {
        for path in ["/healthz", "/readyz", "/metrics"] {
            let r = stack.http.get(stack.url(svc, path)).send().await.unwrap();
            assert_eq!(r.status(), 200, "{svc}{path}");
        }
    }
}
