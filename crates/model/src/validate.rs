//! Input limits from the Hathora API reference (§1.5). Every check returns a message fit for a
//! 422 `{"message"}` body.

pub type Invalid = String;

pub fn room_id(id: &str) -> Result<(), Invalid> {
    if id.is_empty() || id.len() > 100 {
        return Err(format!(
            "roomId must be 1 to 100 characters, got {}",
            id.len()
        ));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(format!(
            "roomId '{id}' may contain only letters, digits, '_' and '-'"
        ));
    }
    Ok(())
}

pub fn app_name(name: &str) -> Result<(), Invalid> {
    if name.is_empty() || name.len() > 64 {
        return Err("appName must be 1 to 64 characters".into());
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(format!(
            "appName '{name}' may contain only a-z, 0-9 and '-'"
        ));
    }
    Ok(())
}

pub fn port_name(name: &str) -> Result<(), Invalid> {
    let mut bytes = name.bytes();
    let ok_first = bytes.next().is_some_and(|b| b.is_ascii_lowercase());
    if !ok_first
        || name.len() > 100
        || !bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(format!(
            "port name '{name}' must be 1 to 100 characters matching ^[a-z][a-z0-9-]*$"
        ));
    }
    Ok(())
}

pub fn env_name(name: &str) -> Result<(), Invalid> {
    let mut bytes = name.bytes();
    let ok_first = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    if !ok_first || name.len() > 100 || !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(format!(
            "env name '{name}' must match ^[a-zA-Z_][a-zA-Z0-9_]*$ (at most 100)"
        ));
    }
    Ok(())
}

pub fn max_len(field: &str, value: &str, max: usize) -> Result<(), Invalid> {
    if value.chars().count() > max {
        return Err(format!("{field} must be at most {max} characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits() {
        assert!(room_id("abc_DEF-9").is_ok());
        assert!(room_id("").is_err());
        assert!(room_id("a b").is_err());
        assert!(room_id(&"a".repeat(101)).is_err());
        assert!(app_name("my-game-2").is_ok());
        assert!(app_name("MyGame").is_err());
        assert!(port_name("debug").is_ok());
        assert!(port_name("1debug").is_err());
        assert!(env_name("_A1").is_ok());
        assert!(env_name("1A").is_err());
    }
}
