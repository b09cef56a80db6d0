//! The relay between two vaults' agents (a query across two vaults aligns its individuals
//! by PSI through the server): a batch of messages travels as one body, each message a
//! 4-byte little-endian length and its bytes.

/// The messages as one body.
pub fn frame<M: AsRef<[u8]>>(messages: &[M]) -> Vec<u8> {
    let mut out = Vec::new();
    for message in messages {
        let message = message.as_ref();
        out.extend_from_slice(&(message.len() as u32).to_le_bytes());
        out.extend_from_slice(message);
    }
    out
}

/// The messages of a body, or why it is not one.
pub fn unframe(mut body: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut messages = Vec::new();
    while !body.is_empty() {
        let Some((head, rest)) = body.split_first_chunk::<4>() else {
            return Err(format!("{} stray bytes after the last message", body.len()));
        };
        let len = u32::from_le_bytes(*head) as usize;
        if rest.len() < len {
            return Err(format!(
                "a message of {len} bytes is cut short at {}",
                rest.len()
            ));
        }
        let (message, rest) = rest.split_at(len);
        messages.push(message.to_vec());
        body = rest;
    }
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_survive_a_frame_and_bad_bodies_are_named() {
        let messages: Vec<Vec<u8>> = vec![b"blinded".to_vec(), vec![], vec![7; 300]];
        let body = frame(&messages);
        assert_eq!(body.len(), 3 * 4 + 7 + 300);
        assert_eq!(unframe(&body).unwrap(), messages);
        assert_eq!(unframe(&[]).unwrap(), Vec::<Vec<u8>>::new());
        assert!(unframe(&body[..body.len() - 1])
            .unwrap_err()
            .contains("cut short"));
        assert!(unframe(&body[..2]).unwrap_err().contains("stray bytes"));
    }
}
