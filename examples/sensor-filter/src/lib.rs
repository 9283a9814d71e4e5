//! A reactor module: each tick it reads a simulated temperature sensor (a slow wave
//! plus noise), smooths it with an exponential moving average, and publishes both
//! values on the `temperature` stream. Its config sets the sensor id and the filter's
//! `alpha`; a message `alpha=0.5` retunes it while it runs.
//!
//! ```text
//! sensor=greenhouse-1
//! alpha=0.2
//! ```

use kiln_guest::{info, telemetry, Message, Reactor};

struct SensorFilter {
    sensor: String,
    alpha: f64,
    filtered: Option<f64>,
    ticks: u64,
    noise: u64,
}

impl SensorFilter {
    /// The simulated sensor: 21 °C, a ±2 °C wave over ~60 ticks, ±0.5 °C of noise.
    fn read(&mut self) -> f64 {
        // xorshift64: deterministic noise, no WASI random needed.
        self.noise ^= self.noise << 13;
        self.noise ^= self.noise >> 7;
        self.noise ^= self.noise << 17;
        let noise = (self.noise % 1000) as f64 / 1000.0 - 0.5;
        21.0 + 2.0 * (self.ticks as f64 / 10.0).sin() + noise
    }
}

fn parse_alpha(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(a) if a > 0.0 && a <= 1.0 => Ok(a),
        _ => Err(format!("alpha `{text}` must be a number in (0, 1]")),
    }
}

impl Reactor for SensorFilter {
    fn init() -> Result<Self, String> {
        let sensor = kiln_guest::config_value("sensor").unwrap_or_else(|| "sim-0".into());
        let alpha = match kiln_guest::config_value("alpha") {
            Some(a) => parse_alpha(&a)?,
            None => 0.2,
        };
        info!("sensor {sensor} ready, alpha {alpha}");
        Ok(Self {
            sensor,
            alpha,
            filtered: None,
            ticks: 0,
            noise: 0x9E37_79B9_7F4A_7C15,
        })
    }

    fn tick(&mut self) -> Result<(), String> {
        let raw = self.read();
        let filtered = match self.filtered {
            Some(prev) => prev + self.alpha * (raw - prev),
            None => raw,
        };
        self.filtered = Some(filtered);
        self.ticks += 1;
        telemetry!(
            "temperature",
            "{{\"sensor\":\"{}\",\"n\":{},\"raw\":{:.2},\"filtered\":{:.2}}}",
            self.sensor,
            self.ticks,
            raw,
            filtered
        )
    }

    fn on_message(&mut self, message: Message) -> Result<(), String> {
        let text = String::from_utf8_lossy(&message.data);
        if let Some(a) = text.trim().strip_prefix("alpha=") {
            self.alpha = parse_alpha(a)?;
            info!("alpha set to {} by {}", self.alpha, message.topic);
        }
        Ok(())
    }
}

kiln_guest::reactor!(SensorFilter);
