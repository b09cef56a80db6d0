//! Sortable unique ids with a kind prefix (`job_01J…`), so logs and URLs read well.

/// A new id: `prefix` + `_` + a ULID (time-ordered, 128 bits, lowercase Crockford base32).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", ulid::Ulid::new().to_string().to_lowercase())
}

/// Whether `value` is a plausible name for a catalog object: 1–63 characters of lowercase
/// ASCII letters, digits and `-`, starting with a letter or digit.
pub fn is_valid_name(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_by_creation_and_carry_their_prefix() {
        let first = new_id("job");
        std::thread::sleep(std::time::Duration::from_millis(2));
        let second = new_id("job");
        assert!(first.starts_with("job_"));
        assert!(first < second);
    }

    #[test]
    fn names() {
        assert!(is_valid_name("hk-cyberport"));
        assert!(!is_valid_name("HK"));
        assert!(!is_valid_name("-x"));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name(&"a".repeat(64)));
    }
}
