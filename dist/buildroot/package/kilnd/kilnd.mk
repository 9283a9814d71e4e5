################################################################################
#
# kilnd
#
################################################################################

# TEMPLATE: not built as it stands. scripts/release-source.sh writes the release copy
# with @VERSION@ and @SITE@ filled in, and kilnd.hash beside it, from the release
# archive it makes (a file in the repository cannot hold the hash of an archive that
# contains it). That archive already holds its crates in VENDOR/, so Buildroot does not
# vendor it again and checks its hash as downloaded.
KILND_VERSION = @VERSION@
KILND_SITE = @SITE@
KILND_SOURCE = kiln-$(KILND_VERSION)-vendored.tar.gz
KILND_LICENSE = Apache-2.0
KILND_LICENSE_FILES = LICENSE

# The workspace also holds the host tool (kiln, with the Cranelift compiler) and the
# test harness: build kiln-runtime alone, as scripts/build.sh does, so feature
# unification never links a compiler into kilnd.
KILND_CARGO_BUILD_OPTS = -p kiln-runtime
# The repository's .cargo/config.toml names Debian's cross gcc for the cc crate
# (ring's C code). The release archive carries cargo vendor's config in its place, as
# Buildroot's own vendoring would; the cc crate is pointed at Buildroot's compiler
# anyway, whatever config a source carries.
KILND_CARGO_ENV = CC_$(subst -,_,$(RUSTC_TARGET_NAME))="$(TARGET_CC)"

# The workspace root is a virtual manifest, which `cargo install --path ./` (the
# infrastructure's default) refuses: install the one binary that was built.
define KILND_INSTALL_TARGET_CMDS
	$(INSTALL) -D -m 0755 \
		$(@D)/target/$(RUSTC_TARGET_NAME)/$(if $(BR2_ENABLE_DEBUG),debug,release)/kilnd \
		$(TARGET_DIR)/usr/bin/kilnd
	$(INSTALL) -D -m 0644 $(@D)/dist/kilnd.toml $(TARGET_DIR)/etc/kiln/kilnd.toml
	$(INSTALL) -d -m 0755 $(TARGET_DIR)/etc/kiln/trust
endef

# username uid group gid password home shell groups comment
define KILND_USERS
	kiln -1 kiln -1 * /var/lib/kiln - - Kiln module runtime
endef

# Enabled by the `systemctl preset-all` Buildroot runs when it finalizes a systemd
# target: kilnd.service into multi-user.target, kilnd-provision.service (a bundle from
# /boot/firmware/kiln at first boot) into kilnd.service.
define KILND_INSTALL_INIT_SYSTEMD
	$(INSTALL) -D -m 0644 $(@D)/dist/systemd/kilnd.service \
		$(TARGET_DIR)/usr/lib/systemd/system/kilnd.service
	$(INSTALL) -D -m 0644 $(@D)/dist/systemd/kilnd-provision.service \
		$(TARGET_DIR)/usr/lib/systemd/system/kilnd-provision.service
	$(INSTALL) -D -m 0644 $(@D)/dist/systemd/kilnd.tmpfiles \
		$(TARGET_DIR)/usr/lib/tmpfiles.d/kilnd.conf
endef

$(eval $(cargo-package))
