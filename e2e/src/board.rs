//! A board in the loop: the arm64 or riscv64 image `scripts/board.sh` builds and
//! caches, booted under full-system emulation (`qemu-system-aarch64 -M virt`, or
//! `qemu-system-riscv64 -M virt` with OpenSBI) on a copy-on-write overlay, reached
//! over ssh through qemu's user network. The guest sees the host as
//! 10.0.2.2, so a broker on the host's loopback is `mqtt://10.0.2.2:PORT` to it.
//!
//! A power cut is a SIGKILL of qemu: the guest gets no shutdown and no sync, so what it
//! had not written to its disk (its page cache, the journal's buffers) is gone. What it
//! had written stays, as it would on a disk that honours flushes; the overlay is kept
//! for the next boot.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::path_str;

/// The cached image: kernel, initramfs, root file system and the host's ssh key.
#[derive(Clone, Debug)]
pub struct Image {
    pub dir: PathBuf,
    /// Debian's name of its architecture: `arm64` or `riscv64`.
    pub arch: String,
}

impl Image {
    /// The image `scripts/board.sh` passes in `KILN_BOARD_IMAGE`.
    pub fn from_env() -> Self {
        let dir = std::env::var_os("KILN_BOARD_IMAGE")
            .map(PathBuf::from)
            .expect("KILN_BOARD_IMAGE is not set: run the board tests with scripts/board.sh");
        assert!(
            dir.join("rootfs.img").is_file(),
            "{} holds no board image: run scripts/board.sh --image-only",
            dir.display()
        );
        // (Images from before riscv64 boards carry no `arch` file: they are arm64.)
        let arch = std::fs::read_to_string(dir.join("arch"))
            .map(|a| a.trim().to_owned())
            .unwrap_or_else(|_| "arm64".into());
        Self { dir, arch }
    }

    /// The kiln target its artifacts are compiled for.
    pub fn target(&self) -> &'static str {
        match self.arch.as_str() {
            "riscv64" => "riscv64-linux",
            _ => "aarch64-linux",
        }
    }

    fn key(&self) -> PathBuf {
        self.dir.join("id_ed25519")
    }
}

/// One emulated board with its own disk, boot partition and console log.
pub struct Board {
    image: Image,
    dir: tempfile::TempDir,
    ssh_port: u16,
    qemu: Option<Child>,
    /// Boots so far (a power cut ends one).
    pub boots: u32,
    /// Boots that did not answer ssh and were power-cycled (see [`Board::boot`]).
    pub unreachable: u32,
}

impl Board {
    /// A new board flashed with the image; `bundle`, when given, is copied to the boot
    /// partition as `kiln/` (a provisioning bundle for `kilnd-provision.service`).
    pub fn new(image: &Image, bundle: Option<&Path>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let disk = dir.path().join("disk.qcow2");
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(image.dir.join("rootfs.img"))
            .arg(&disk));
        // The boot partition: FAT, labelled as the image's fstab expects.
        let boot = dir.path().join("boot.img");
        run(Command::new("mkfs.vfat")
            .args(["-n", "KILNBOOT", "-C"])
            .arg(&boot)
            .arg("32768"));
        if let Some(bundle) = bundle {
            run(Command::new("mcopy")
                .args(["-s", "-i"])
                .arg(&boot)
                .arg(bundle)
                .arg("::kiln"));
        }
        Self {
            image: image.clone(),
            dir,
            ssh_port: forward_port(),
            qemu: None,
            boots: 0,
            unreachable: 0,
        }
    }

    /// Powers the board on and waits until ssh answers; returns the time that took.
    ///
    /// A boot that does not answer ssh within 240 s is examined from the serial
    /// console (what the harness reads there is printed), power-cycled once, and
    /// counted in `unreachable`, which the tests print. (Such boots had no IPv4
    /// address: see `net.ifnames=0` in `power_on`.)
    pub fn boot(&mut self) -> Duration {
        if let Some(took) = self.power_on() {
            return took;
        }
        self.unreachable += 1;
        eprintln!(
            "board: boot {} did not answer ssh within 240 s; what the serial console shows \
             of it, then a power cycle\n{}\n--- logged in on the console ---\n{}",
            self.boots,
            self.console(),
            self.on_console(DIAGNOSE_SSH)
        );
        self.cut();
        self.power_on().unwrap_or_else(|| {
            panic!(
                "the board did not answer ssh within 240 s, twice\n{}",
                self.console()
            )
        })
    }

    /// The image this board was flashed with.
    pub fn image(&self) -> &Image {
        &self.image
    }

    /// One power-on: the time until ssh answered, or `None` after 240 s.
    fn power_on(&mut self) -> Option<Duration> {
        assert!(self.qemu.is_none(), "the board is already on");
        let started = Instant::now();
        let console = self.dir.path().join("console.log");
        // The machine: qemu's `virt` board of the image's architecture, 2 cores, 1 GiB;
        // riscv64's firmware is the OpenSBI build qemu ships (`-bios default`).
        let (qemu, machine, console_tty): (_, &[&str], _) = match self.image.arch.as_str() {
            "riscv64" => (
                "qemu-system-riscv64",
                &["-M", "virt", "-cpu", "rv64", "-bios", "default"],
                "ttyS0",
            ),
            _ => (
                "qemu-system-aarch64",
                &["-M", "virt", "-cpu", "cortex-a72"],
                "ttyAMA0",
            ),
        };
        let mut cmd = Command::new(qemu);
        cmd.args(machine)
            .args(["-smp", "2", "-m", "1024"])
            .args(["-display", "none", "-monitor", "none", "-no-reboot"])
            .arg("-kernel")
            .arg(self.image.dir.join("vmlinuz"))
            .arg("-initrd")
            .arg(self.image.dir.join("initrd.img"))
            // net.ifnames=0: the interface keeps its kernel name. With the rename
            // udev does otherwise, systemd-networkd 252 sometimes began DHCP on eth0
            // just as it became enp0s3, failed with EBUSY and never tried again: the
            // board had no IPv4 address and ssh never answered (2 boots of 103 in the
            // 100 power cuts, read off the serial console).
            .arg("-append")
            .arg(format!(
                "root=/dev/vda rw console={console_tty} net.ifnames=0 quiet systemd.show_status=0"
            ))
            .arg("-drive")
            .arg(format!(
                "if=none,id=root,format=qcow2,file={}",
                path_str(&self.dir.path().join("disk.qcow2"))
            ))
            .args(["-device", "virtio-blk-pci,drive=root"])
            .arg("-drive")
            .arg(format!(
                "if=none,id=boot,format=raw,file={}",
                path_str(&self.dir.path().join("boot.img"))
            ))
            .args(["-device", "virtio-blk-pci,drive=boot"])
            .arg("-netdev")
            .arg(format!(
                "user,id=net,hostfwd=tcp:127.0.0.1:{}-:22",
                self.ssh_port
            ))
            .args(["-device", "virtio-net-pci,netdev=net,romfile="])
            // The serial console: a socket the harness can log in on (root has no password
            // on the console only; ssh takes the key), logged to a file as it goes.
            .arg("-chardev")
            .arg(format!(
                "socket,id=con,path={},server=on,wait=off,logfile={}",
                path_str(&self.dir.path().join("console.sock")),
                path_str(&console)
            ))
            .args(["-serial", "chardev:con"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(self.dir.path().join("qemu.stderr")).expect("qemu.stderr"),
            );
        // The console log of earlier boots is kept beside this one's.
        if console.exists() {
            let _ = std::fs::rename(
                &console,
                self.dir.path().join(format!("console.{}.log", self.boots)),
            );
        }
        self.qemu = Some(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("{qemu} (scripts/setup.sh installs it): {e}")),
        );
        self.boots += 1;
        let deadline = started + Duration::from_secs(240);
        loop {
            if let Some(status) = self.qemu.as_mut().and_then(|q| q.try_wait().ok().flatten()) {
                self.qemu = None;
                panic!("qemu exited ({status}) while booting\n{}", self.console());
            }
            if self
                .try_ssh("true", Duration::from_secs(20))
                .is_some_and(|o| o.status.success())
            {
                return Some(started.elapsed());
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// Cuts the power: qemu is killed, the guest gets no shutdown and no sync.
    pub fn cut(&mut self) {
        if let Some(mut qemu) = self.qemu.take() {
            let _ = qemu.kill();
            let _ = qemu.wait();
        }
    }

    /// A clean shutdown (`systemctl poweroff`), waiting for qemu to exit.
    pub fn power_off(&mut self) {
        let _ = self.try_ssh("systemctl poweroff", Duration::from_secs(30));
        if let Some(mut qemu) = self.qemu.take() {
            let deadline = Instant::now() + Duration::from_secs(180);
            while qemu.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = qemu.kill();
                    let _ = qemu.wait();
                    panic!(
                        "the board did not power off within 180 s\n{}",
                        self.console()
                    );
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }

    /// A clean reboot: power off, then boot again.
    pub fn reboot(&mut self) -> Duration {
        self.power_off();
        self.boot()
    }

    /// Runs `script` with sh on the board as root and returns its stdout; fails the
    /// test, with both outputs and the console, if it fails.
    pub fn sh(&self, script: &str) -> String {
        let out = self
            .try_ssh(script, Duration::from_secs(300))
            .unwrap_or_else(|| panic!("ssh `{script}` timed out\n{}", self.console()));
        assert!(
            out.status.success(),
            "on the board `{script}`: {}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `script` on the board; `None` if ssh did not finish within `limit`.
    pub fn try_ssh(&self, script: &str, limit: Duration) -> Option<Output> {
        let mut child = self
            .ssh_command()
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ssh (scripts/board.sh installs openssh-client)");
        let deadline = Instant::now() + limit;
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().ok()
    }

    /// Copies a host file to `remote` on the board.
    pub fn put(&self, local: &Path, remote: &str) {
        let bytes = std::fs::read(local).unwrap_or_else(|e| panic!("{}: {e}", local.display()));
        let mut child = self
            .ssh_command()
            .arg(format!("cat > '{remote}'"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ssh");
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), &bytes).expect("ssh stdin");
        drop(child.stdin.take());
        let out = child.wait_with_output().expect("ssh");
        assert!(
            out.status.success(),
            "copying {} to the board: {}",
            local.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn ssh_command(&self) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.args([
            "-q",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "ServerAliveInterval=5",
            "-i",
        ])
        .arg(self.image.key())
        .args(["-p", &self.ssh_port.to_string(), "root@127.0.0.1"]);
        cmd
    }

    /// Logs in as root on the serial console, runs `script` there and returns what the
    /// console printed meanwhile: the way in when ssh does not answer.
    pub fn on_console(&self, script: &str) -> String {
        use std::io::{Read, Write};
        let path = self.dir.path().join("console.sock");
        let mut sock = match std::os::unix::net::UnixStream::connect(&path) {
            Ok(sock) => sock,
            Err(e) => return format!("{}: {e}", path.display()),
        };
        let _ = sock.set_read_timeout(Some(Duration::from_millis(200)));
        let mut seen = Vec::new();
        // Sends `input`, then reads until the console shows one of `until` (its index)
        // or `limit` passes.
        let mut step = |input: &str, until: &[&str], limit: u64| -> Option<usize> {
            let from = seen.len();
            let _ = sock.write_all(input.as_bytes());
            let deadline = Instant::now() + Duration::from_secs(limit);
            let mut buf = [0u8; 4096];
            while Instant::now() < deadline {
                if let Ok(n @ 1..) = sock.read(&mut buf) {
                    seen.extend_from_slice(&buf[..n]);
                    // systemd 257 (Debian 13) asks the terminal where its cursor is, to
                    // learn its size, and waits for the answer: a 24x80 terminal's.
                    for _ in 0..count(&buf[..n], b"\x1b[6n") {
                        let _ = sock.write_all(b"\x1b[24;80R");
                    }
                    let new = String::from_utf8_lossy(&seen[from..]);
                    if let Some(i) = until.iter().position(|u| new.contains(u)) {
                        return Some(i);
                    }
                }
            }
            None
        };
        // The marker is computed by the shell, so the echo of the typed line is not it.
        // (Twice: a login prompt shown while the first try was typed can eat it.)
        for _ in 0..2 {
            match step("\n", &["board login:", "# "], 15) {
                Some(0) if step("root\n", &["# ", "board login:"], 30) == Some(0) => break,
                Some(0) => continue,
                _ => break,
            }
        }
        step(
            &format!("{script}; echo console-done-$((6*7))\n"),
            &["console-done-42"],
            120,
        );
        step("exit\n", &[], 1);
        String::from_utf8_lossy(&seen).into_owned()
    }

    /// What the board printed on its serial console this boot (the last 4 KiB).
    pub fn console(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default();
        let start = text.len().saturating_sub(4096);
        let start = (start..text.len())
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(0);
        let qemu = std::fs::read_to_string(self.dir.path().join("qemu.stderr")).unwrap_or_default();
        format!("--- qemu ---\n{qemu}--- console ---\n{}", &text[start..])
    }
}

impl Drop for Board {
    fn drop(&mut self) {
        self.cut();
    }
}

/// How often `needle` occurs in `haystack`.
fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

/// What the harness reads on the console of a board that does not answer ssh: the
/// address, sshd and its listening socket, the entropy pool, the network's journal.
const DIAGNOSE_SSH: &str = "export SYSTEMD_PAGER= SYSTEMD_COLORS=0; ip -br addr; ip route; \
     ss -tlnp; cat /proc/sys/kernel/random/entropy_avail; systemctl is-system-running; \
     systemctl --no-pager list-jobs; systemctl --no-pager status ssh systemd-networkd 2>&1 | head -40; \
     journalctl -b --no-pager -o short-monotonic -u ssh -u systemd-networkd | tail -30";

/// A loopback port for the board's ssh forward, below the kernel's ephemeral range
/// (32768 and up): qemu listens on it again at every boot, and a port from that range
/// could meanwhile have become the source port of one of the host's own connections.
fn forward_port() -> u16 {
    let offset = (std::process::id() % 10_000) as u16;
    (0..10_000u16)
        .map(|i| 20_000 + (offset + i) % 10_000)
        .find(|port| std::net::TcpListener::bind(("127.0.0.1", *port)).is_ok())
        .expect("a free loopback port between 20000 and 30000")
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
