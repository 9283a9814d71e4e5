//! The device's MQTT connection: one rumqttc event loop polled by its own thread, which
//! never blocks on anything else; what arrives goes to the agent through a channel.
//! rumqttc reconnects by being polled again; kilnd waits with a growing backoff in
//! between, and the agent resubscribes after every ConnAck (subscriptions do not
//! survive a reconnect with a clean session).

use std::sync::mpsc::Sender;
use std::time::Duration;

use rumqttc::{Client, Event, LastWill, Packet, QoS};

use super::AgentIn;
use crate::config::MqttConfig;

pub fn connect(
    config: &MqttConfig,
    device: &str,
    will_topic: String,
    will: Vec<u8>,
    tx: Sender<AgentIn>,
) -> Result<Client, String> {
    let keep_alive = Duration::from_secs(config.keep_alive_s.max(5));
    let mut options = config
        .connect()
        .options(&format!("kilnd-{device}"), keep_alive)?;
    options.set_clean_session(true).set_last_will(LastWill::new(
        will_topic,
        will,
        QoS::AtLeastOnce,
        true,
    ));
    let (client, mut connection) = Client::new(options, 256);
    let broker = config.broker.clone();
    std::thread::spawn(move || {
        let mut backoff = Duration::from_millis(200);
        for event in connection.iter() {
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    tracing::info!(%broker, "connected");
                    backoff = Duration::from_millis(200);
                    if tx.send(AgentIn::Connected).is_err() {
                        return;
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let msg = AgentIn::Message {
                        topic: p.topic.clone(),
                        payload: p.payload.to_vec(),
                    };
                    if tx.send(msg).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(%broker, error = %e, retry_ms = backoff.as_millis() as u64, "broker connection lost");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    });
    Ok(client)
}
