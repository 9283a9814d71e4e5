//! A board in the loop: the arm64 image `scripts/board.sh` builds and caches, booted
//! under full-system emulation (`qemu-system-aarch64 -M virt`) on a copy-on-write
//! overlay, reached over ssh through qemu's user network. The guest sees the host as
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
        Self { dir }
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
    /// About one boot in twenty after a power cut reaches the console's login prompt
    /// but does not answer ssh: the connection is accepted and no banner comes (cause
    /// not yet found, docs/src/boards.md). The board is then power-cycled once, and
    /// the boot counted in `unreachable`, which the tests print.
    pub fn boot(&mut self) -> Duration {
        if let Some(took) = self.power_on() {
            return took;
        }
        self.unreachable += 1;
        eprintln!(
            "board: boot {} did not answer ssh within 240 s; power-cycling it once\n{}",
            self.boots,
            self.console()
        );
        self.cut();
        self.power_on().unwrap_or_else(|| {
            panic!(
                "the board did not answer ssh within 240 s, twice\n{}",
                self.console()
            )
        })
    }

    /// One power-on: the time until ssh answered, or `None` after 240 s.
    fn power_on(&mut self) -> Option<Duration> {
        assert!(self.qemu.is_none(), "the board is already on");
        let started = Instant::now();
        let console = self.dir.path().join("console.log");
        let mut cmd = Command::new("qemu-system-aarch64");
        cmd.args([
            "-M",
            "virt",
            "-cpu",
            "cortex-a72",
            "-smp",
            "2",
            "-m",
            "1024",
        ])
        .args(["-display", "none", "-monitor", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(self.image.dir.join("vmlinuz"))
        .arg("-initrd")
        .arg(self.image.dir.join("initrd.img"))
        .args([
            "-append",
            "root=/dev/vda rw console=ttyAMA0 quiet systemd.show_status=0",
        ])
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
        .arg("-serial")
        .arg(format!("file:{}", path_str(&console)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(self.dir.path().join("qemu.stderr")).expect("qemu.stderr"));
        // The console log of earlier boots is kept beside this one's.
        if console.exists() {
            let _ = std::fs::rename(
                &console,
                self.dir.path().join(format!("console.{}.log", self.boots)),
            );
        }
        self.qemu = Some(
            cmd.spawn()
                .expect("qemu-system-aarch64 (scripts/board.sh installs it)"),
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
