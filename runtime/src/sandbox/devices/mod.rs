//! The hardware a module is granted (`kiln_protocol::capability`), opened by the
//! worker before it confines itself: confinement then leaves it these descriptors and
//! not the device files, and its syscall filter lets through only the few `ioctl`s
//! each kind needs afterwards (`confine::filter`). A handle the module holds is an
//! index into one of these lists. GPIO inputs' edges become messages to the module,
//! delivered before its next tick (`edge_messages`).

pub mod file;
pub mod gpio;
pub mod i2c;
pub mod serial;

use kiln_protocol::capability::Grants;

/// A module's granted hardware, opened.
#[derive(Default)]
pub struct Devices {
    pub serial: Vec<serial::Port>,
    pub gpio: Vec<gpio::Lines>,
    pub i2c: Vec<i2c::Device>,
    pub files: Vec<file::Granted>,
}

impl Devices {
    /// Opens every grant; the first that cannot be opened is the error, naming it,
    /// its file and kilnd.toml.
    pub fn open(grants: &Grants) -> Result<Self, String> {
        let granted = |kind: &str, name: &str, path: &str, e: std::io::Error| {
            format!("cannot open {kind} `{name}` (`{path}`, granted in kilnd.toml): {e}")
        };
        Ok(Self {
            serial: grants
                .serial
                .iter()
                .map(|p| serial::open(p).map_err(|e| granted("serial port", &p.name, &p.path, e)))
                .collect::<Result<_, _>>()?,
            gpio: grants
                .gpio
                .iter()
                .map(|l| gpio::open(l).map_err(|e| granted("gpio lines", &l.name, &l.chip, e)))
                .collect::<Result<_, _>>()?,
            i2c: grants
                .i2c
                .iter()
                .map(|d| i2c::open(d).map_err(|e| granted("i2c device", &d.name, &d.bus, e)))
                .collect::<Result<_, _>>()?,
            files: grants
                .files
                .iter()
                .map(|f| file::open(f).map_err(|e| granted("file", &f.name, &f.path, e)))
                .collect::<Result<_, _>>()?,
        })
    }

    /// Whether any grant of `capability` is held.
    pub fn has(&self, capability: &str) -> bool {
        match capability {
            "serial" => !self.serial.is_empty(),
            "gpio" => !self.gpio.is_empty(),
            "i2c" => !self.i2c.is_empty(),
            "file" => !self.files.is_empty(),
            _ => false,
        }
    }

    /// The GPIO inputs' edges queued since the last call, as the messages the module
    /// gets: topic `gpio/NAME`, `{"line":0,"edge":"rising","ns":123}`. An input whose
    /// edges cannot be read is reported as a message too (`"error"`), once a call.
    pub fn edge_messages(&self) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for lines in self.gpio.iter().filter(|l| l.edges) {
            let topic = format!("gpio/{}", lines.name);
            match lines.edges() {
                Ok(edges) => out.extend(edges.into_iter().map(|e| {
                    let edge = if e.rising { "rising" } else { "falling" };
                    let text = format!(r#"{{"line":{},"edge":"{edge}","ns":{}}}"#, e.line, e.ns);
                    (topic.clone(), text.into_bytes())
                })),
                Err(e) => {
                    let text = serde_json::json!({ "error": e.to_string() }).to_string();
                    out.push((topic, text.into_bytes()));
                }
            }
        }
        out
    }
}
