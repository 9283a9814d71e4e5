//! End-to-end tests live in `tests/`: `kiln` compiles on the host, the `kilnd` built
//! for each target (by `scripts/test.sh`) runs the result natively or under qemu-user.
