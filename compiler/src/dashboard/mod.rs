//! `kiln dashboard`: the fleet live in a browser. One MQTT session feeds
//! [`model::Fleet`] (pure, bounded); every 250 ms the devices and rollouts that changed
//! go to every open page as one server-sent event ([`http`]). Read-only.

pub mod http;
pub mod model;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::fleet::broker::now_ms;
use model::{Changed, Fleet};

/// What the MQTT side, the ticker and the pages share.
pub struct Shared {
    pub fleet: Mutex<Fleet>,
    pub hub: http::Hub,
    dirty: Mutex<(BTreeSet<String>, BTreeSet<String>)>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub fn new(fleet: Fleet) -> Arc<Self> {
        Arc::new(Shared {
            fleet: Mutex::new(fleet),
            hub: http::Hub::default(),
            dirty: Mutex::default(),
        })
    }

    /// One message from the broker.
    pub fn on_message(&self, topic: &str, payload: &[u8]) {
        let changed = lock(&self.fleet).on_message(topic, payload, now_ms());
        let mut dirty = lock(&self.dirty);
        match changed {
            Changed::Device(d) => {
                dirty.0.insert(d);
            }
            Changed::Rollout(g) => {
                dirty.1.insert(g);
            }
            Changed::All => {
                let names = lock(&self.fleet).device_names();
                dirty.0.extend(names);
            }
            Changed::Nothing => {}
        }
    }

    /// Every row and rollout, for a page that just opened.
    pub fn snapshot(&self) -> String {
        let fleet = lock(&self.fleet);
        let devices: Vec<Value> = fleet
            .device_names()
            .iter()
            .filter_map(|d| fleet.summary(d))
            .collect();
        let rollouts: Vec<&Value> = fleet.rollouts().collect();
        json!({ "sent_ms": now_ms(), "devices": devices, "rollouts": rollouts }).to_string()
    }

    pub fn detail(&self, device: &str) -> Option<String> {
        lock(&self.fleet).detail(device).map(|v| v.to_string())
    }

    /// Sends what changed since the last call, if anything did.
    fn flush(&self) {
        let (devices, groups) = std::mem::take(&mut *lock(&self.dirty));
        if devices.is_empty() && groups.is_empty() {
            return;
        }
        let fleet = lock(&self.fleet);
        let devices: Vec<Value> = devices.iter().filter_map(|d| fleet.summary(d)).collect();
        let rollouts: Vec<&Value> = groups.iter().filter_map(|g| fleet.rollout(g)).collect();
        let data = json!({ "sent_ms": now_ms(), "devices": devices, "rollouts": rollouts });
        drop(fleet);
        self.hub.broadcast("update", &data.to_string());
    }

    /// Flushes every 250 ms, forever.
    pub fn tick(self: Arc<Self>) {
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(250));
            self.flush();
        });
    }
}
