use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use clap::Parser;

use crate::dashboard::model::{Fleet, Limits};
use crate::dashboard::{http, Shared};
use crate::exit::{coded, Code};
use crate::fleet::broker::BrokerArgs;
use crate::fleet::trust::RootArgs;

const AFTER_HELP: &str = "\
One page, served by kiln itself (nothing to install, no database): every device with
its online state, target, kilnd version, modules (committed version and state), last
event and when it was last heard from, filtered by group, target, version and state,
with counts per version; a device's state history, stats and numeric telemetry as
charts (text streams as text); rollouts with their waves and each device's outcome;
telemetry gaps and duplicates; messages that did not verify or decode, as invalid.
It follows the broker live over one MQTT session and pushes changes to open pages
(server-sent events, at most four a second).

Read-only: it signs nothing and holds no key. It listens on loopback unless
--allow-remote is given; it has no login of its own, so anywhere else put it behind a
reverse proxy that authenticates (or reach it through an SSH tunnel).

Memory is bounded: per device, at most --points points per series, 32 series, --history
state changes and the last 10 invalid messages; at most 20,000 devices.

Examples:
  kiln dashboard --broker mqtt://broker.lan:1883           # http://127.0.0.1:8080/
  ssh -L 8080:127.0.0.1:8080 ops-host kiln dashboard        # from a laptop
  kiln dashboard --listen 0.0.0.0:8080 --allow-remote       # behind an authenticating proxy";

/// Serve a live page of the fleet, read-only
#[derive(Parser, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct DashboardCommand {
    /// Address to serve the page on: IP:PORT or HOST:PORT (`localhost:8080`)
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:8080", value_parser = parse_listen)]
    pub listen: SocketAddr,
    /// Allow --listen on an address other than loopback (the page has no login)
    #[arg(long)]
    pub allow_remote: bool,
    /// Another name the page may be reached by (the `Host` a proxy passes on); every
    /// other `Host` or `Origin` is refused, so a web page elsewhere cannot read the
    /// fleet through DNS rebinding [default: the listen address, localhost, 127.0.0.1]
    #[arg(long, value_name = "HOST[:PORT]")]
    pub host: Vec<String>,
    /// Points kept per time series
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u16).range(2..=10_000))]
    pub points: u16,
    /// State changes kept per device
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u16).range(1..=10_000))]
    pub history: u16,
    #[command(flatten)]
    pub root: RootArgs,
    #[command(flatten)]
    pub broker: BrokerArgs,
}

impl DashboardCommand {
    pub fn execute(self) -> Result<()> {
        if !self.listen.ip().is_loopback() && !self.allow_remote {
            return Err(coded(
                Code::Usage,
                anyhow!(
                    "--listen {}: not a loopback address, and the dashboard has no login; pass --allow-remote to serve it there (behind a proxy that authenticates)",
                    self.listen
                ),
            ));
        }
        let unavailable = |e| coded(Code::Unavailable, e);
        let topics = self.broker.topics();
        let mut session = self.broker.connect().map_err(unavailable)?;
        let fleet =
            crate::fleet::trust::Fleet::follow(&mut session, &topics, self.root.anchor(None)?)?;
        let registry = fleet.registry_or_empty(&mut session, &topics)?;
        let limits = Limits {
            points: self.points.into(),
            history: self.history.into(),
            ..Limits::default()
        };
        let shared = Shared::new(Fleet::new(
            topics.clone(),
            fleet.root().clone(),
            registry,
            limits,
        ));
        let listener = TcpListener::bind(self.listen).map_err(|e| {
            coded(
                Code::CannotWrite,
                anyhow!("cannot listen on {}: {e}", self.listen),
            )
        })?;
        let address = listener.local_addr().unwrap_or(self.listen);
        let hosts = http::Hosts::new(address, &self.host);
        let filters = [
            topics.all_devices("status"),
            topics.all_devices("reported"),
            topics.all_devices("events"),
            topics.all_devices("telemetry"),
            topics.all_rollouts(),
            topics.registry_all(),
        ];
        for f in &filters {
            session.subscribe(f).map_err(unavailable)?;
        }
        {
            let shared = shared.clone();
            std::thread::spawn(move || http::serve(listener, shared, hosts));
        }
        shared.clone().tick();
        eprintln!(
            "dashboard: http://{address}/ (read-only) following {}",
            self.broker.broker
        );
        loop {
            match session.next_message(Duration::from_secs(1)) {
                Ok(Some((topic, payload))) => shared.on_message(&topic, &payload),
                Ok(None) => {}
                Err(e) => {
                    eprintln!("kiln: warning: {e:#}; reconnecting");
                    let started = Instant::now();
                    loop {
                        std::thread::sleep(Duration::from_secs(1));
                        if session.reconnect().is_ok()
                            && filters.iter().all(|f| session.subscribe(f).is_ok())
                        {
                            break;
                        }
                        if started.elapsed() > Duration::from_secs(60) {
                            eprintln!("kiln: warning: broker still away; retrying");
                        }
                    }
                }
            }
        }
    }
}

/// `IP:PORT`, or `HOST:PORT` resolved here (an IPv4 address first when the name has
/// both, as `localhost` usually does).
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    let addrs: Vec<SocketAddr> = text
        .to_socket_addrs()
        .map_err(|e| {
            format!("`{text}` is not an address to listen on (HOST:PORT or IP:PORT): {e}")
        })?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("`{text}` resolves to no address"))
}
