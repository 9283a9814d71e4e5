################################################################################
#
# kilnd
#
################################################################################

KILND_VERSION = 0.1.0
KILND_SITE = https://example.invalid/kiln.git
KILND_SITE_METHOD = git
KILND_LICENSE = Apache-2.0
KILND_LICENSE_FILES = LICENSE

# The workspace also holds the host tool (kiln, with the Cranelift compiler) and the
# test harness: build kiln-runtime alone, as scripts/build.sh does, so feature
# unification never links a compiler into kilnd.
KILND_CARGO_BUILD_OPTS = -p kiln-runtime
# The repository's .cargo/config.toml names Debian's cross gcc for the cc crate
# (ring's C code); use Buildroot's toolchain instead.
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

define KILND_INSTALL_INIT_SYSTEMD
	$(INSTALL) -D -m 0644 $(@D)/dist/systemd/kilnd.service \
		$(TARGET_DIR)/usr/lib/systemd/system/kilnd.service
	$(INSTALL) -D -m 0644 $(@D)/dist/systemd/kilnd.tmpfiles \
		$(TARGET_DIR)/usr/lib/tmpfiles.d/kilnd.conf
endef

$(eval $(cargo-package))
