//! The GPIO capability's host side, on the kernel's GPIO character device (uAPI v2,
//! `linux/gpio.h`): the worker opens the chip, requests the granted lines as inputs or
//! outputs, and keeps only the request's descriptor. Reads and writes are one `ioctl`
//! each on it (`GPIO_V2_LINE_GET_VALUES` / `SET_VALUES`), the only two the syscall
//! filter lets through for GPIO. Inputs granted with `edges` are requested with edge
//! detection: the kernel queues each edge on the request's descriptor (non-blocking),
//! and the worker reads them before each tick and delivers them as messages.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::OpenOptionsExt;

use kiln_protocol::capability::{Edges, GpioLines};

const LINES_MAX: usize = 64;
const NAME_SIZE: usize = 32;
const ATTRS_MAX: usize = 10;
const FLAG_INPUT: u64 = 1 << 2;
const FLAG_OUTPUT: u64 = 1 << 3;
const FLAG_EDGE_RISING: u64 = 1 << 4;
const FLAG_EDGE_FALLING: u64 = 1 << 5;
const EVENT_RISING: u32 = 1;
/// Edges read at most per tick (the kernel keeps up to 16 a line queued, and drops
/// the oldest past that).
pub const MAX_EDGES: usize = 64;

/// `_IOWR(0xB4, nr, size)`.
const fn iowr(nr: u32, size: usize) -> u32 {
    (3 << 30) | ((size as u32) << 16) | (0xB4 << 8) | nr
}
pub const GET_LINE: u32 = iowr(0x07, std::mem::size_of::<LineRequest>());
pub const GET_VALUES: u32 = iowr(0x0E, std::mem::size_of::<LineValues>());
pub const SET_VALUES: u32 = iowr(0x0F, std::mem::size_of::<LineValues>());

#[repr(C)]
#[derive(Clone, Copy)]
struct LineAttribute {
    id: u32,
    padding: u32,
    value: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct ConfigAttribute {
    attr: LineAttribute,
    mask: u64,
}

#[repr(C)]
struct LineConfig {
    flags: u64,
    num_attrs: u32,
    padding: [u32; 5],
    attrs: [ConfigAttribute; ATTRS_MAX],
}

#[repr(C)]
struct LineRequest {
    offsets: [u32; LINES_MAX],
    consumer: [u8; NAME_SIZE],
    config: LineConfig,
    num_lines: u32,
    event_buffer_size: u32,
    padding: [u32; 5],
    fd: i32,
}

#[repr(C)]
struct LineValues {
    bits: u64,
    mask: u64,
}

/// `struct gpio_v2_line_event`.
#[repr(C)]
#[derive(Clone, Copy)]
struct LineEvent {
    timestamp_ns: u64,
    id: u32,
    offset: u32,
    seqno: u32,
    line_seqno: u32,
    padding: [u32; 6],
}

// The sizes `linux/gpio.h` gives them (the ioctl numbers encode them).
const _: () = assert!(std::mem::size_of::<LineRequest>() == 592);
const _: () = assert!(std::mem::size_of::<LineValues>() == 16);
const _: () = assert!(std::mem::size_of::<LineEvent>() == 48);

/// An edge on a granted input line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edge {
    /// The line's place in the grant (its bit in a read).
    pub line: usize,
    pub rising: bool,
    /// When the kernel saw it (CLOCK_MONOTONIC).
    pub ns: u64,
}

/// Granted lines, requested.
pub struct Lines {
    pub name: String,
    request: File,
    offsets: Vec<u32>,
    pub output: bool,
    pub edges: bool,
}

/// Opens the chip, requests the lines (outputs start low), and keeps the request.
pub fn open(grant: &GpioLines) -> io::Result<Lines> {
    let chip = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&grant.chip)?;
    if grant.lines.is_empty() || grant.lines.len() > LINES_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "bad line count",
        ));
    }
    // SAFETY: a plain-data struct the kernel reads; all zeroes is its empty value.
    let mut req: LineRequest = unsafe { std::mem::zeroed() };
    req.offsets[..grant.lines.len()].copy_from_slice(&grant.lines);
    let consumer = format!("kilnd:{}", grant.name);
    let n = consumer.len().min(NAME_SIZE - 1);
    req.consumer[..n].copy_from_slice(&consumer.as_bytes()[..n]);
    req.config.flags = match (grant.output, grant.edges) {
        (true, _) => FLAG_OUTPUT,
        (false, Edges::None) => FLAG_INPUT,
        (false, Edges::Rising) => FLAG_INPUT | FLAG_EDGE_RISING,
        (false, Edges::Falling) => FLAG_INPUT | FLAG_EDGE_FALLING,
        (false, Edges::Both) => FLAG_INPUT | FLAG_EDGE_RISING | FLAG_EDGE_FALLING,
    };
    req.num_lines = grant.lines.len() as u32;
    // SAFETY: `req` is a valid gpio_v2_line_request the kernel fills `fd` of.
    let r = unsafe { libc::ioctl(chip.as_raw_fd(), GET_LINE as _, &mut req) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel handed over this descriptor; it is owned from here on.
    let request = unsafe { File::from_raw_fd(req.fd) };
    let edges = !grant.output && grant.edges != Edges::None;
    if edges {
        // Edges are read before each tick without waiting for one.
        let fd = request.as_raw_fd();
        // SAFETY: fcntl on a descriptor this function owns.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(Lines {
        name: grant.name.clone(),
        request,
        offsets: grant.lines.clone(),
        output: grant.output,
        edges,
    })
}

impl Lines {
    fn all(&self) -> u64 {
        (1u64 << self.offsets.len()) - 1
    }

    /// The edges queued since the last call, at most [`MAX_EDGES`], oldest first.
    pub fn edges(&self) -> io::Result<Vec<Edge>> {
        let mut out = Vec::new();
        if !self.edges {
            return Ok(out);
        }
        let empty = LineEvent {
            timestamp_ns: 0,
            id: 0,
            offset: 0,
            seqno: 0,
            line_seqno: 0,
            padding: [0; 6],
        };
        let mut events = [empty; 16];
        while out.len() < MAX_EDGES {
            // No more than the cap takes: an edge read is an edge delivered.
            let want = events.len().min(MAX_EDGES - out.len());
            let size = want * std::mem::size_of::<LineEvent>();
            // SAFETY: reads whole events into the first `want` of `events`, which it owns.
            let n =
                unsafe { libc::read(self.request.as_raw_fd(), events.as_mut_ptr().cast(), size) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    break;
                }
                return Err(e);
            }
            let got = n as usize / std::mem::size_of::<LineEvent>();
            for e in &events[..got] {
                if let Some(line) = self.offsets.iter().position(|o| *o == e.offset) {
                    out.push(Edge {
                        line,
                        rising: e.id == EVENT_RISING,
                        ns: e.timestamp_ns,
                    });
                }
            }
            if got < want {
                break;
            }
        }
        Ok(out)
    }

    /// The lines' values, bit `i` for the grant's `i`th line.
    pub fn read(&self) -> io::Result<u64> {
        let mut v = LineValues {
            bits: 0,
            mask: self.all(),
        };
        // SAFETY: a valid gpio_v2_line_values on the request's descriptor.
        let r = unsafe { libc::ioctl(self.request.as_raw_fd(), GET_VALUES as _, &mut v) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(v.bits & self.all())
    }

    /// Drives the lines whose bit is set in `mask` to their bit in `values`.
    pub fn write(&self, values: u64, mask: u64) -> io::Result<()> {
        let mut v = LineValues {
            bits: values & self.all(),
            mask: mask & self.all(),
        };
        if v.mask == 0 {
            return Ok(());
        }
        // SAFETY: a valid gpio_v2_line_values on the request's descriptor.
        let r = unsafe { libc::ioctl(self.request.as_raw_fd(), SET_VALUES as _, &mut v) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ioctl_numbers_are_the_kernels() {
        // linux/gpio.h, as the kernel's headers expand them.
        assert_eq!(GET_LINE, 0xC250_B407);
        assert_eq!(GET_VALUES, 0xC010_B40E);
        assert_eq!(SET_VALUES, 0xC010_B40F);
    }

    #[test]
    fn a_missing_chip_is_an_error_naming_the_cause() {
        let e = open(&GpioLines {
            name: "relays".into(),
            chip: "/dev/kiln-no-such-gpiochip".into(),
            lines: vec![0],
            output: true,
            edges: Edges::None,
        })
        .err()
        .unwrap();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
