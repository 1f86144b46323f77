//! Identifier formats. Ids are plain strings on the wire; these helpers make new ones in the
//! shapes Hathora uses so that clients which log or pattern-match them see familiar values.

use uuid::Uuid;

pub fn org_id() -> String {
    format!("org-{}", Uuid::new_v4())
}
pub fn app_id() -> String {
    format!("app-{}", Uuid::new_v4())
}
pub fn app_secret() -> String {
    format!("secret-{}", Uuid::new_v4())
}
pub fn build_id() -> String {
    format!("bld-{}", Uuid::new_v4())
}
pub fn deployment_id() -> String {
    format!("dep-{}", Uuid::new_v4())
}
pub fn process_id() -> String {
    Uuid::new_v4().to_string()
}
pub fn allocation_id() -> String {
    Uuid::new_v4().to_string()
}
pub fn org_token_id() -> String {
    format!("org-token-{}", Uuid::new_v4())
}

/// 128 random bits as lowercase hex.
pub fn secret_hex() -> String {
    Uuid::new_v4().simple().to_string()
}

/// `prefix` and 256 random bits as hex: a secret whose kind shows in its first characters.
pub fn secret(prefix: &str) -> String {
    format!("{prefix}{}{}", secret_hex(), secret_hex())
}

/// A plain-text org token: `lodge_org_st_` and 256 random bits.
pub fn org_token_secret() -> String {
    secret("lodge_org_st_")
}

/// A system room id: 13 lowercase base-36 characters, like `2swovpy1fnunu`.
pub fn room_id() -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut n = Uuid::new_v4().as_u128();
    let mut out = String::with_capacity(13);
    for _ in 0..13 {
        out.push(DIGITS[(n % 36) as usize] as char);
        n /= 36;
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn room_ids_are_13_base36() {
        let id = super::room_id();
        assert_eq!(id.len(), 13);
        assert!(id
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase()));
        assert_ne!(id, super::room_id());
    }
}
