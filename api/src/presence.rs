//! Presence: whether a user has a connected device and when one was last seen,
//! derived from the socket slots (nothing is stored per heartbeat). A user stays
//! online for a grace period after its last socket closes, so a reconnect within
//! it does not flap; the gauge `threadline_users_online` follows the same rule.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use threadline_engine::UserId;
use threadline_storage::now_ms;

#[derive(Debug, Default)]
struct Entry {
    devices: usize,
    /// When a device was last connected: updated as one connects and as one leaves.
    last_seen_ms: u64,
    /// Counted online (in the gauge): a device is connected or the grace runs.
    online: bool,
    /// Bumped on every change, so a grace timer knows whether it is still the last word.
    generation: u64,
}

/// What [`Presence::get`] answers for one user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub online: bool,
    pub devices: usize,
    pub last_seen_ms: Option<u64>,
}

/// The presence of every user that connected since the server started.
#[derive(Debug, Clone)]
pub struct Presence {
    users: Arc<Mutex<HashMap<UserId, Entry>>>,
    grace: Duration,
}

impl Presence {
    pub fn new(grace: Duration) -> Presence {
        Presence {
            users: Arc::default(),
            grace,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<UserId, Entry>> {
        self.users.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A device of `user` connected.
    pub fn connected(&self, user: &UserId) {
        let mut users = self.lock();
        let entry = users.entry(user.clone()).or_default();
        entry.devices += 1;
        entry.last_seen_ms = now_ms();
        entry.generation += 1;
        if !entry.online {
            entry.online = true;
            metrics::gauge!("threadline_users_online").increment(1.0);
        }
    }

    /// A device of `user` disconnected. When it was the last one, the user goes
    /// offline after the grace period unless a device connects meanwhile.
    pub fn disconnected(&self, user: &UserId) {
        let generation = {
            let mut users = self.lock();
            let Some(entry) = users.get_mut(user) else {
                return;
            };
            entry.devices = entry.devices.saturating_sub(1);
            entry.last_seen_ms = now_ms();
            entry.generation += 1;
            if entry.devices > 0 {
                return;
            }
            entry.generation
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.expire(user, generation);
            return;
        };
        let (this, user, grace) = (self.clone(), user.clone(), self.grace);
        runtime.spawn(async move {
            tokio::time::sleep(grace).await;
            this.expire(&user, generation);
        });
    }

    /// Ends the grace period begun at `generation`, if nothing changed since.
    fn expire(&self, user: &UserId, generation: u64) {
        let mut users = self.lock();
        if let Some(entry) = users.get_mut(user) {
            if entry.generation == generation && entry.devices == 0 && entry.online {
                entry.online = false;
                metrics::gauge!("threadline_users_online").decrement(1.0);
            }
        }
    }

    pub fn get(&self, user: &UserId) -> Seen {
        let users = self.lock();
        match users.get(user) {
            Some(e) => Seen {
                online: e.online,
                devices: e.devices,
                last_seen_ms: Some(if e.devices > 0 {
                    now_ms()
                } else {
                    e.last_seen_ms
                }),
            },
            None => Seen {
                online: false,
                devices: 0,
                last_seen_ms: None,
            },
        }
    }
}
