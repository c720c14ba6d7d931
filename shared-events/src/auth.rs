//! REST authentication: bearer JWTs (RS256, ES256) verified offline against a PEM public key or
//! a JWKS file, with `exp`, `nbf`, `iss` and `aud` checks, and scopes per route
//! (`orders:read`, `orders:write`, `orders:admin`). `AUTH_MODE=none` turns it off for local
//! development, with a warning at start-up.

use std::marker::PhantomData;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::request::Parts;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::Deserialize;

use crate::http::Problem;

/// Whether requests must carry a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// Bearer JWTs are required.
    Jwt,
    /// No authentication (local development only).
    None,
}

/// Authentication settings.
#[derive(Debug, Clone, clap::Args)]
pub struct AuthArgs {
    /// `jwt` (bearer tokens required) or `none` (local development only).
    #[arg(long, env = "AUTH_MODE", value_enum, default_value = "none")]
    pub auth_mode: AuthMode,
    /// PEM public key (RSA for RS256, P-256 for ES256) that signs the tokens.
    #[arg(long, env = "AUTH_JWT_PUBLIC_KEY_FILE")]
    pub auth_jwt_public_key_file: Option<PathBuf>,
    /// JWKS file with the signing keys (selected by `kid`).
    #[arg(long, env = "AUTH_JWKS_FILE")]
    pub auth_jwks_file: Option<PathBuf>,
    /// Required `iss`, when set.
    #[arg(long, env = "AUTH_JWT_ISSUER")]
    pub auth_jwt_issuer: Option<String>,
    /// Required `aud`, when set.
    #[arg(long, env = "AUTH_JWT_AUDIENCE")]
    pub auth_jwt_audience: Option<String>,
}

/// Invalid authentication configuration; stops the service at start-up.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    /// `AUTH_MODE=jwt` without a key.
    #[error("AUTH_MODE=jwt needs AUTH_JWT_PUBLIC_KEY_FILE or AUTH_JWKS_FILE")]
    NoKey,
    /// A key file could not be read.
    #[error("{var}: cannot read {path}: {source}")]
    Read {
        /// The variable naming the file.
        var: &'static str,
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A key file holds no usable key.
    #[error("{var}: {reason}")]
    Key {
        /// The variable naming the file.
        var: &'static str,
        /// Why.
        reason: String,
    },
}

struct Key {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

/// Verifies bearer tokens.
pub struct Authenticator {
    keys: Vec<Key>,
    issuer: Option<String>,
    audience: Option<String>,
}

/// The claims this service reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Claims {
    /// Subject (who).
    #[serde(default)]
    pub sub: Option<String>,
    /// Space-separated scopes (OAuth 2 `scope`).
    #[serde(default)]
    pub scope: Option<String>,
    /// Scopes as an array (`scp`, as some issuers emit).
    #[serde(default)]
    pub scp: Option<Vec<String>>,
}

impl Claims {
    fn has_scope(&self, wanted: &str) -> bool {
        self.scope
            .as_deref()
            .map(|s| s.split_whitespace().any(|x| x == wanted))
            .unwrap_or(false)
            || self
                .scp
                .as_ref()
                .map(|v| v.iter().any(|x| x == wanted))
                .unwrap_or(false)
    }
}

/// Why a token was refused (401).
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// No `Authorization: Bearer` header.
    #[error("missing bearer token")]
    Missing,
    /// Bad signature, expired, not yet valid, wrong issuer or audience, unknown key.
    #[error("invalid token: {0}")]
    Invalid(String),
}

impl Authenticator {
    /// Builds the authenticator; `None` when `AUTH_MODE=none` (after warning).
    pub fn from_args(args: &AuthArgs) -> Result<Option<Arc<Self>>, AuthConfigError> {
        if args.auth_mode == AuthMode::None {
            tracing::warn!(
                "AUTH_MODE=none: the API accepts requests without credentials; for local development only"
            );
            return Ok(None);
        }
        let mut keys = Vec::new();
        if let Some(path) = &args.auth_jwt_public_key_file {
            let var = "AUTH_JWT_PUBLIC_KEY_FILE";
            let pem = read(var, path)?;
            let key = if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
                Key {
                    kid: None,
                    algorithm: Algorithm::RS256,
                    key: k,
                }
            } else if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
                Key {
                    kid: None,
                    algorithm: Algorithm::ES256,
                    key: k,
                }
            } else {
                return Err(AuthConfigError::Key {
                    var,
                    reason: "not an RSA or EC public key in PEM form".into(),
                });
            };
            keys.push(key);
        }
        if let Some(path) = &args.auth_jwks_file {
            let var = "AUTH_JWKS_FILE";
            let set: JwkSet =
                serde_json::from_slice(&read(var, path)?).map_err(|e| AuthConfigError::Key {
                    var,
                    reason: format!("not a JWKS document: {e}"),
                })?;
            for jwk in &set.keys {
                let algorithm = match &jwk.algorithm {
                    AlgorithmParameters::RSA(_) => Algorithm::RS256,
                    AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
                        Algorithm::ES256
                    }
                    _ => continue,
                };
                let key = DecodingKey::from_jwk(jwk).map_err(|e| AuthConfigError::Key {
                    var,
                    reason: e.to_string(),
                })?;
                keys.push(Key {
                    kid: jwk.common.key_id.clone(),
                    algorithm,
                    key,
                });
            }
            if keys.is_empty() {
                return Err(AuthConfigError::Key {
                    var,
                    reason: "no RS256 or ES256 key".into(),
                });
            }
        }
        if keys.is_empty() {
            return Err(AuthConfigError::NoKey);
        }
        Ok(Some(Arc::new(Authenticator {
            keys,
            issuer: args.auth_jwt_issuer.clone(),
            audience: args.auth_jwt_audience.clone(),
        })))
    }

    /// Verifies a token: signature, `exp`, `nbf`, and `iss`/`aud` when configured.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let header = decode_header(token).map_err(|e| TokenError::Invalid(e.to_string()))?;
        let mut last = TokenError::Invalid("no key matches the token".into());
        for key in self.keys.iter().filter(|k| {
            k.algorithm == header.alg
                && (header.kid.is_none() || k.kid.is_none() || k.kid == header.kid)
        }) {
            let mut v = Validation::new(key.algorithm);
            v.validate_nbf = true;
            v.leeway = 30;
            match &self.audience {
                Some(aud) => v.set_audience(&[aud]),
                None => v.validate_aud = false,
            }
            if let Some(iss) = &self.issuer {
                v.set_issuer(&[iss]);
            }
            match decode::<Claims>(token, &key.key, &v) {
                Ok(data) => return Ok(data.claims),
                Err(e) => last = TokenError::Invalid(e.to_string()),
            }
        }
        Err(last)
    }
}

fn read(var: &'static str, path: &PathBuf) -> Result<Vec<u8>, AuthConfigError> {
    std::fs::read(path).map_err(|source| AuthConfigError::Read {
        var,
        path: path.display().to_string(),
        source,
    })
}

/// The authenticator a service runs with, placed in request extensions by [`layer`].
#[derive(Clone)]
pub struct AuthState(pub Option<Arc<Authenticator>>);

/// Adds the authenticator to every request, for the [`Authorized`] extractor.
pub fn layer(auth: Option<Arc<Authenticator>>) -> axum::Extension<AuthState> {
    axum::Extension(AuthState(auth))
}

/// A scope a route requires.
pub trait Scope: Send + Sync + 'static {
    /// Its name in tokens.
    const NAME: &'static str;
}

/// `orders:read`: read orders, payments, shipments and products.
pub struct Read;
impl Scope for Read {
    const NAME: &'static str = "orders:read";
}

/// `orders:write`: create orders.
pub struct Write;
impl Scope for Write {
    const NAME: &'static str = "orders:write";
}

/// `orders:admin`: cancel and retry orders, set stock, change chaos settings, dead letters.
pub struct Admin;
impl Scope for Admin {
    const NAME: &'static str = "orders:admin";
}

/// Extractor that admits a request carrying a valid token with scope `S` (or any request when
/// authentication is off). Put it first in a handler's arguments so 401/403 come before any
/// body validation.
pub struct Authorized<S: Scope>(pub Option<Claims>, PhantomData<S>);

impl<S: Scope, St: Send + Sync> FromRequestParts<St> for Authorized<S> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _state: &St) -> Result<Self, Self::Rejection> {
        let Some(AuthState(Some(auth))) = parts.extensions.get::<AuthState>().cloned() else {
            return Ok(Authorized(None, PhantomData));
        };
        let token = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or(TokenError::Missing);
        let claims = token.and_then(|t| auth.verify(t)).map_err(|e| {
            let mut p = Problem::new(StatusCode::UNAUTHORIZED, e.to_string());
            p.www_authenticate = Some(match e {
                TokenError::Missing => "Bearer".into(),
                TokenError::Invalid(_) => "Bearer error=\"invalid_token\"".into(),
            });
            p
        })?;
        if !claims.has_scope(S::NAME) {
            let mut p = Problem::new(
                StatusCode::FORBIDDEN,
                format!("the token lacks scope {}", S::NAME),
            );
            p.www_authenticate = Some(format!(
                "Bearer error=\"insufficient_scope\", scope=\"{}\"",
                S::NAME
            ));
            return Err(p);
        }
        Ok(Authorized(Some(claims), PhantomData))
    }
}
