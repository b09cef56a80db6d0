//! The relay between workers at the vaults (a query's two sides, a fusion run's workers):
//! a mailbox per addressee, kept in memory. Asking for message `n` on acknowledges every
//! one before it, and those are dropped, so a mailbox holds only what is in flight.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::Duration;

use axum::body::Bytes;

use crate::error::ApiResult;
use crate::AppState;

pub(crate) struct Relay<K> {
    boxes: std::sync::Mutex<HashMap<K, Mailbox>>,
    /// Fires when a message arrives or mailboxes are dropped.
    pub(crate) signal: tokio::sync::Notify,
}

#[derive(Default)]
struct Mailbox {
    /// The number of the first message kept.
    first: usize,
    messages: VecDeque<Bytes>,
}

impl<K> Default for Relay<K> {
    fn default() -> Self {
        Relay {
            boxes: Default::default(),
            signal: Default::default(),
        }
    }
}

impl<K: Hash + Eq> Relay<K> {
    pub(crate) fn post(&self, to: K, message: Bytes) {
        self.boxes
            .lock()
            .expect("relay lock")
            .entry(to)
            .or_default()
            .messages
            .push_back(message);
        self.signal.notify_waiters();
    }

    /// The messages for `to` numbered `from` on; those before are dropped.
    fn since(&self, to: &K, from: usize) -> Vec<Bytes> {
        let mut boxes = self.boxes.lock().expect("relay lock");
        let Some(mailbox) = boxes.get_mut(to) else {
            return Vec::new();
        };
        while mailbox.first < from && mailbox.messages.pop_front().is_some() {
            mailbox.first += 1;
        }
        mailbox
            .messages
            .iter()
            .skip(from.saturating_sub(mailbox.first))
            .cloned()
            .collect()
    }

    /// Drops every mailbox `keep` refuses (a query or run that ended).
    pub(crate) fn forget(&self, keep: impl Fn(&K) -> bool) {
        self.boxes
            .lock()
            .expect("relay lock")
            .retain(|k, _| keep(k));
        self.signal.notify_waiters();
    }

    /// The messages for `to` from `from` on as one body (`baygrid_api::relay::frame`),
    /// waiting up to `wait` for one.
    pub(crate) async fn receive(
        &self,
        state: &AppState,
        to: &K,
        from: usize,
        wait: Duration,
    ) -> ApiResult<Vec<u8>> {
        crate::queries::long_poll(state, &self.signal, wait, || async move {
            let waiting = self.since(to, from);
            Ok((baygrid_api::relay::frame(&waiting), !waiting.is_empty()))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledged_messages_are_dropped_and_the_rest_keep_their_numbers() {
        let relay: Relay<u8> = Relay::default();
        for m in ["a", "b", "c"] {
            relay.post(1, Bytes::from(m));
        }
        assert_eq!(relay.since(&1, 0).len(), 3);
        // asking from 2 acknowledges 0 and 1
        assert_eq!(relay.since(&1, 2), vec![Bytes::from("c")]);
        assert_eq!(relay.boxes.lock().unwrap()[&1].messages.len(), 1);
        relay.post(1, Bytes::from("d"));
        assert_eq!(relay.since(&1, 3), vec![Bytes::from("d")]);
        assert!(relay.since(&2, 0).is_empty());
        relay.forget(|k| *k != 1);
        assert!(relay.since(&1, 0).is_empty());
    }
}
