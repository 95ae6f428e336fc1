//! Bearer-token authentication: HS256 JWTs with `sub`, `tenant`, `scopes` and `exp`, verified
//! into the application's [`Actor`].

use std::fmt;
use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tracktrace_app::access::{Actor, Scope};
use tracktrace_core::TenantId;

use crate::error::ApiError;

/// The claims of a tracktrace token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Subject: the client system or user.
    pub sub: String,
    /// The tenant the token acts for.
    pub tenant: String,
    /// Granted scopes (wire names).
    pub scopes: Vec<String>,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
}

/// The authenticated caller of a request: the application's [`Actor`], extracted from the
/// bearer token (see `FromRequestParts` in [`crate::extract`]), and when the token expires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// Who.
    pub actor: Actor,
    /// The token's expiry, seconds since the epoch (open event streams end then).
    pub expires_at: u64,
}

impl std::ops::Deref for Principal {
    type Target = Actor;
    fn deref(&self) -> &Actor {
        &self.actor
    }
}

/// HS256 signing and verification keys.
#[derive(Clone)]
pub struct JwtKeys {
    enc: EncodingKey,
    dec: DecodingKey,
    validation: Validation,
}

impl fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JwtKeys(..)")
    }
}

/// Why the secret could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// Reading or writing the secret file failed.
    #[error("jwt secret file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The secret is too short.
    #[error("the jwt secret must be at least 32 bytes")]
    TooShort,
}

impl JwtKeys {
    /// Keys from a shared secret (at least 32 bytes).
    pub fn from_secret(secret: &[u8]) -> Result<Self, SecretError> {
        if secret.len() < 32 {
            return Err(SecretError::TooShort);
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Ok(Self {
            enc: EncodingKey::from_secret(secret),
            dec: DecodingKey::from_secret(secret),
            validation,
        })
    }

    /// The secret kept in `<dir>/jwt-secret`, created (random, mode 0600) on first use.
    pub fn load_or_create(dir: &Path) -> Result<Self, SecretError> {
        let path = dir.join("jwt-secret");
        let io = |source| SecretError::Io {
            path: path.display().to_string(),
            source,
        };
        match std::fs::read_to_string(&path) {
            Ok(s) => Self::from_secret(s.trim().as_bytes()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir).map_err(io)?;
                // UUIDv4 draws from the OS CSPRNG (getrandom): 2 × 122 random bits.
                let secret = format!(
                    "{}{}",
                    uuid::Uuid::new_v4().simple(),
                    uuid::Uuid::new_v4().simple()
                );
                write_private(&path, secret.as_bytes()).map_err(io)?;
                // Another process may have won the race: read back what is stored.
                let s = std::fs::read_to_string(&path).map_err(io)?;
                Self::from_secret(s.trim().as_bytes())
            }
            Err(e) => Err(io(e)),
        }
    }

    /// Signs a token.
    pub fn sign(&self, claims: &Claims) -> String {
        // HS256 signing of serializable claims cannot fail with a valid key.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.enc).unwrap_or_default()
    }

    /// Verifies a bearer token (signature, algorithm, expiry) and parses its claims (unknown
    /// scopes are ignored).
    pub fn verify(&self, token: &str) -> Result<Principal, ApiError> {
        use jsonwebtoken::errors::ErrorKind;
        let data =
            jsonwebtoken::decode::<Claims>(token, &self.dec, &self.validation).map_err(|e| {
                ApiError::Unauthorized(match e.kind() {
                    ErrorKind::ExpiredSignature => "the token has expired".into(),
                    ErrorKind::InvalidSignature => "the token signature is invalid".into(),
                    _ => format!("the token is invalid ({e})"),
                })
            })?;
        let c = data.claims;
        let tenant = TenantId::parse(c.tenant.as_str())
            .map_err(|e| ApiError::Unauthorized(format!("the token's tenant is invalid ({e})")))?;
        let scopes = c
            .scopes
            .iter()
            .filter_map(|s| s.parse::<Scope>().ok())
            .collect();
        Ok(Principal {
            actor: Actor::new(c.sub, tenant, scopes),
            expires_at: c.exp,
        })
    }
}

/// Seconds since the epoch now.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(unix)]
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(mut f) => {
            f.write_all(data)?;
            f.sync_all()
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(not(unix))]
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: u64) -> Claims {
        Claims {
            sub: "t".into(),
            tenant: "acme".into(),
            scopes: vec!["events:write".into(), "bogus".into()],
            exp,
        }
    }

    #[test]
    fn sign_verify_expire_and_tamper() {
        let k = JwtKeys::from_secret(&[7u8; 32]).unwrap();
        let p = k.verify(&k.sign(&claims(now_secs() + 60))).unwrap();
        assert_eq!(p.scopes, vec![Scope::EventsWrite]);
        assert!(p.require(Scope::TraceRead).is_err());
        let expired = k.sign(&claims(now_secs() - 3600));
        assert!(
            matches!(k.verify(&expired), Err(ApiError::Unauthorized(m)) if m.contains("expired"))
        );
        let other = JwtKeys::from_secret(&[8u8; 32]).unwrap();
        let forged = other.sign(&claims(now_secs() + 60));
        assert!(
            matches!(k.verify(&forged), Err(ApiError::Unauthorized(m)) if m.contains("signature"))
        );
        assert!(k.verify("not.a.token").is_err());
        assert!(JwtKeys::from_secret(b"short").is_err());
    }

    #[test]
    fn secret_file_is_created_once_with_0600() {
        let dir = tempfile::tempdir().unwrap();
        let a = JwtKeys::load_or_create(dir.path()).unwrap();
        let b = JwtKeys::load_or_create(dir.path()).unwrap();
        let t = a.sign(&claims(now_secs() + 60));
        assert!(b.verify(&t).is_ok());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("jwt-secret"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
