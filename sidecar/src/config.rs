//! Typed settings, read once from the environment (and `.env`) and validated at
//! start, so a typo fails the launch with the variable's name instead of failing
//! the first request.

use std::net::SocketAddr;
use std::time::Duration;

pub use bridge_protocol::Secret;

#[derive(Debug, Clone)]
pub struct Settings {
    /// Connection string; may hold credentials, hence a secret.
    pub mongodb_uri: Secret,
    pub mongodb_db: String,
    pub admin_token: Secret,
    /// When set, `/internal/*` also requires this value in `x-bridge-internal-token`.
    pub internal_token: Option<Secret>,
    /// Loopback by default: the internal API must not face the network.
    pub listen: SocketAddr,
    pub log_level: String,
    pub log_file: String,
    /// How long a hold may stay unsettled before the sweeper charges it.
    pub hold_ttl: Duration,
    /// How long release and charge marks stand on a key: they guard calls that
    /// may still be on their way, and bound the key's document.
    pub mark_ttl: Duration,
    pub sweep_interval: Duration,
    /// How much of a balance one lease takes at most, and when an open lease
    /// nobody reports is taken for lost.
    pub leases: crate::ledger::LeasePolicy,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{0} is required but not set")]
    Missing(&'static str),
    #[error("{var} is invalid: {reason}")]
    Invalid { var: &'static str, reason: String },
}

/// The shortest admin token the sidecar takes: 16 random bytes in hex.
pub const MIN_ADMIN_TOKEN_LEN: usize = 32;

pub const DEFAULT_MONGODB_URI: &str = "mongodb://127.0.0.1:27017/?retryWrites=false";

impl Settings {
    /// Settings from the process environment, after loading `.env` if present.
    pub fn from_env() -> Result<Self, ConfigError> {
        // A missing .env is normal; a malformed one is reported by the variables it leaves unset.
        let _ = dotenvy::dotenv();
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Settings from any lookup function, so tests need not touch the process environment.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| get(name).filter(|v| !v.trim().is_empty());
        let admin_token = get("ADMIN_TOKEN").ok_or(ConfigError::Missing("ADMIN_TOKEN"))?;
        if admin_token.len() < MIN_ADMIN_TOKEN_LEN {
            let reason =
                format!("must be at least {MIN_ADMIN_TOKEN_LEN} characters (for example: openssl rand -hex 24)");
            return Err(ConfigError::Invalid { var: "ADMIN_TOKEN", reason });
        }
        if admin_token.to_ascii_lowercase().contains("change-me") {
            let reason = "is the documentation's example; set a random one (openssl rand -hex 24)".into();
            return Err(ConfigError::Invalid { var: "ADMIN_TOKEN", reason });
        }
        let mongodb_uri = get("MONGODB_URI").unwrap_or_else(|| DEFAULT_MONGODB_URI.into());
        if !(mongodb_uri.starts_with("mongodb://") || mongodb_uri.starts_with("mongodb+srv://")) {
            return Err(ConfigError::Invalid {
                var: "MONGODB_URI",
                reason: "must start with mongodb:// or mongodb+srv://".into(),
            });
        }
        let mongodb_db = get("MONGODB_DB").unwrap_or_else(|| "openclaw_llm_bridge".into());
        if mongodb_db.contains(['/', '\\', '.', ' ', '"', '$']) || mongodb_db.len() > 63 {
            return Err(ConfigError::Invalid {
                var: "MONGODB_DB",
                reason: "must be a MongoDB database name (no / \\ . space \" $, at most 63 bytes)".into(),
            });
        }
        let listen_text = get("SIDECAR_ADDR").unwrap_or_else(|| "127.0.0.1:8001".into());
        let listen: std::net::SocketAddr = listen_text.parse().map_err(|_| ConfigError::Invalid {
            var: "SIDECAR_ADDR",
            reason: format!("{listen_text:?} is not an address like 127.0.0.1:8001"),
        })?;
        let internal_token = get("INTERNAL_TOKEN");
        if !listen.ip().is_loopback() && internal_token.is_none() {
            // The internal API moves balances: beyond loopback, only a caller with the token may use it.
            return Err(ConfigError::Invalid {
                var: "SIDECAR_ADDR",
                reason: format!(
                    "{listen} is reachable beyond this machine: set INTERNAL_TOKEN (and the same in Envoy's \
                     config), or listen on loopback"
                ),
            });
        }
        let secs = |var: &'static str, default: u64| -> Result<Duration, ConfigError> {
            match get(var) {
                None => Ok(Duration::from_secs(default)),
                Some(v) => match v.trim().parse::<u64>() {
                    Ok(n) if n > 0 => Ok(Duration::from_secs(n)),
                    _ => {
                        Err(ConfigError::Invalid { var, reason: format!("{v:?} is not a positive number of seconds") })
                    }
                },
            }
        };
        Ok(Self {
            mongodb_uri: Secret::new(mongodb_uri),
            mongodb_db,
            admin_token: Secret::new(admin_token),
            internal_token: internal_token.map(Secret::new),
            listen,
            log_level: get("LOG_LEVEL").unwrap_or_else(|| "info".into()),
            log_file: get("LOG_FILE").unwrap_or_else(|| "app.log".into()),
            hold_ttl: secs("HOLD_TTL_SECS", 1800)?,
            mark_ttl: secs("MARK_TTL_SECS", 120)?,
            sweep_interval: secs("SWEEP_INTERVAL_SECS", 10)?,
            leases: crate::ledger::LeasePolicy {
                share_percent: match get("LEASE_SHARE_PERCENT") {
                    None => crate::ledger::LeasePolicy::default().share_percent,
                    Some(v) => match v.trim().parse::<u8>() {
                        Ok(n @ 1..=100) => n,
                        _ => {
                            return Err(ConfigError::Invalid {
                                var: "LEASE_SHARE_PERCENT",
                                reason: format!("{v:?} is not a percent from 1 to 100"),
                            })
                        }
                    },
                },
                lost_after: secs("LEASE_LOST_SECS", 30)?,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        Settings::from_lookup(|k| map.get(k).cloned())
    }

    const ADMIN: &str = "secret-admin-token-of-32-characters";

    #[test]
    fn admin_token_is_required() {
        assert_eq!(settings(&[]).err(), Some(ConfigError::Missing("ADMIN_TOKEN")));
    }

    #[test]
    fn a_short_or_example_admin_token_is_refused() {
        for weak in ["change-me", "short-token-of-31-characters-xx", "change-me-admin-token-but-long-enough"] {
            match settings(&[("ADMIN_TOKEN", weak)]).err() {
                Some(ConfigError::Invalid { var: "ADMIN_TOKEN", .. }) => {}
                other => panic!("{weak}: {other:?}"),
            }
        }
    }

    #[test]
    fn an_internal_api_beyond_loopback_needs_its_token() {
        for addr in ["0.0.0.0:8001", "[::]:8001", "192.168.1.5:8001"] {
            match settings(&[("ADMIN_TOKEN", ADMIN), ("SIDECAR_ADDR", addr)]).err() {
                Some(ConfigError::Invalid { var: "SIDECAR_ADDR", reason }) => {
                    assert!(reason.contains("INTERNAL_TOKEN"), "{reason}")
                }
                other => panic!("{addr}: {other:?}"),
            }
            let s = settings(&[("ADMIN_TOKEN", ADMIN), ("SIDECAR_ADDR", addr), ("INTERNAL_TOKEN", "inner-token")]);
            assert!(s.is_ok(), "{addr} with a token");
        }
        for addr in ["127.0.0.1:0", "[::1]:8001"] {
            assert!(settings(&[("ADMIN_TOKEN", ADMIN), ("SIDECAR_ADDR", addr)]).is_ok(), "{addr}");
        }
    }

    #[test]
    fn defaults_follow_the_seed() {
        let s = settings(&[("ADMIN_TOKEN", ADMIN)]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.mongodb_db, "openclaw_llm_bridge");
        assert_eq!(s.listen.to_string(), "127.0.0.1:8001");
        assert_eq!(s.log_file, "app.log");
        assert_eq!(s.hold_ttl, Duration::from_secs(1800));
        assert_eq!(s.mark_ttl, Duration::from_secs(120));
    }

    #[test]
    fn malformed_values_name_their_variable() {
        for (var, value) in [
            ("SIDECAR_ADDR", "nowhere"),
            ("HOLD_TTL_SECS", "-3"),
            ("SWEEP_INTERVAL_SECS", "soon"),
            ("MONGODB_URI", "http://x"),
            ("MONGODB_DB", "a.b"),
        ] {
            let err = settings(&[("ADMIN_TOKEN", ADMIN), (var, value)]).err();
            match err {
                Some(ConfigError::Invalid { var: named, .. }) => assert_eq!(named, var),
                other => panic!("{var}={value}: {other:?}"),
            }
        }
    }

    #[test]
    fn secrets_redact_themselves() {
        let s =
            settings(&[("ADMIN_TOKEN", ADMIN), ("INTERNAL_TOKEN", "inner-token")]).unwrap_or_else(|e| panic!("{e}"));
        let shown = format!("{s:?}");
        assert!(!shown.contains(ADMIN) && !shown.contains("inner-token"), "{shown}");
    }
}
