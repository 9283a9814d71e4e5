SUMMARY = "kilnd: ahead-of-time WebAssembly runtime for edge devices"
DESCRIPTION = "Runs WebAssembly modules compiled and signed by the host tool kiln, \
each in its own sandboxed worker process, and follows signed desired state over MQTT."
HOMEPAGE = "https://example.invalid/kiln"
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://LICENSE;md5=e23fadd6ceef8c618fc1c65191d846fa"

# TEMPLATE: this file is not built as it stands. scripts/release-source.sh writes the
# release copy (kilnd_VERSION.bb, VERSION from Cargo.toml) with @SITE@ and @SHA256@
# filled in, beside kilnd-crates.inc, from the release tarball it makes: a recipe in
# the repository cannot hold the checksum of a tarball that contains it.
SRC_URI = "@SITE@/kiln-${PV}.tar.gz"
SRC_URI[sha256sum] = "@SHA256@"
S = "${WORKDIR}/kiln-${PV}"

# Every crate of Cargo.lock as a crate:// SRC_URI with Cargo.lock's checksum, so the
# build runs offline after do_fetch: written by scripts/release-source.sh (the same
# form as `bitbake -c update_crates kilnd` writes).
require ${BPN}-crates.inc

inherit cargo cargo-update-recipe-crates systemd useradd

# The workspace also holds the host tool (kiln, with the Cranelift compiler) and the
# test harness: build kiln-runtime alone, as scripts/build.sh does, so feature
# unification never links a compiler into kilnd.
CARGO_BUILD_FLAGS += "-p kiln-runtime"
# The release profile strips; let the build keep symbols so ${PN}-dbg gets them and
# do_package strips the installed binary.
export CARGO_PROFILE_RELEASE_STRIP = "false"
# wasmer's code generator and kiln's targets: x86_64, aarch64 and riscv64 Linux with
# glibc. Other libcs are untested.
COMPATIBLE_HOST = "(x86_64|aarch64|riscv64).*-linux"
COMPATIBLE_HOST:libc-musl = "null"

USERADD_PACKAGES = "${PN}"
USERADD_PARAM:${PN} = "--system --user-group --home-dir ${localstatedir}/lib/kiln \
    --no-create-home --shell ${base_sbindir}/nologin --comment 'Kiln module runtime' kiln"

# kilnd-provision.service installs a bundle from /boot/firmware/kiln at first boot
# (docs/src/provisioning.md); without one it is skipped.
SYSTEMD_SERVICE:${PN} = "kilnd.service kilnd-provision.service"
SYSTEMD_AUTO_ENABLE:${PN} = "enable"

do_install:append() {
    install -D -m 0644 ${S}/dist/systemd/kilnd.service ${D}${systemd_system_unitdir}/kilnd.service
    install -D -m 0644 ${S}/dist/systemd/kilnd-provision.service \
        ${D}${systemd_system_unitdir}/kilnd-provision.service
    install -D -m 0644 ${S}/dist/systemd/kilnd.tmpfiles ${D}${nonarch_libdir}/tmpfiles.d/kilnd.conf
    install -D -m 0644 ${S}/dist/kilnd.toml ${D}${sysconfdir}/kiln/kilnd.toml
    install -d -m 0755 ${D}${sysconfdir}/kiln/trust
    install -d -m 0750 -o kiln -g kiln ${D}${localstatedir}/lib/kiln
}

FILES:${PN} += "${nonarch_libdir}/tmpfiles.d ${sysconfdir}/kiln ${localstatedir}/lib/kiln"
CONFFILES:${PN} = "${sysconfdir}/kiln/kilnd.toml"
