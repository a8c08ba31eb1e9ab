//! User keys: validation, generation and masking. Keys are stored only as their
//! SHA-256 digest (`bridge_protocol::key_hash`); what admins see is a masked form.

use crate::error::AppError;

pub const MIN_KEY_LEN: usize = 8;
pub const MAX_KEY_LEN: usize = 256;

/// A key must be printable ASCII without spaces: it travels in an HTTP header.
pub fn validate_key(key: &str) -> Result<(), AppError> {
    if key.len() < MIN_KEY_LEN || key.len() > MAX_KEY_LEN {
        return Err(AppError::bad_request(
            format!("api_key must be {MIN_KEY_LEN} to {MAX_KEY_LEN} characters long"),
            Some("api_key"),
        ));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(AppError::bad_request(
            "api_key may contain only printable ASCII characters without spaces",
            Some("api_key"),
        ));
    }
    Ok(())
}

/// A fresh `sk-` key with 192 bits from the operating system's random source.
pub fn generate_key() -> Result<String, AppError> {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).map_err(|e| AppError::Internal(format!("no randomness: {e}")))?;
    Ok(format!("sk-{}", hex::encode(bytes)))
}

/// The parts of a key kept for display: a short prefix and the last four characters.
/// At most 60% of a key (and never more than ten characters) is shown, so short
/// keys reveal less.
pub fn mask_parts(key: &str) -> (String, String) {
    let chars: Vec<char> = key.chars().collect();
    let last = chars.len().min(4);
    let prefix = (chars.len() * 6 / 10).saturating_sub(last).min(6);
    (chars[..prefix].iter().collect(), chars[chars.len() - last..].iter().collect())
}

pub fn masked(prefix: &str, last4: &str) -> String {
    format!("{prefix}...{last4}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masking_shows_prefix_and_last_four() {
        let (p, l) = mask_parts("sk-my-user-key-001");
        assert_eq!(masked(&p, &l), "sk-my-...-001");
    }

    #[test]
    fn short_keys_reveal_less() {
        for key in ["abcdefgh", "abcdefghijkl"] {
            let (p, l) = mask_parts(key);
            assert!(p.len() + l.len() <= key.len() * 6 / 10, "{key}: {p} {l}");
        }
    }

    #[test]
    fn generated_keys_are_unique_and_valid() {
        let a = generate_key().unwrap_or_default();
        let b = generate_key().unwrap_or_default();
        assert!(a.starts_with("sk-") && a.len() == 51, "{a}");
        assert_ne!(a, b);
        assert!(validate_key(&a).is_ok());
    }

    #[test]
    fn keys_with_spaces_or_wrong_length_are_refused() {
        assert!(validate_key("sk-has space-1").is_err());
        assert!(validate_key("short").is_err());
        assert!(validate_key(&"k".repeat(257)).is_err());
    }
}
