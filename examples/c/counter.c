/*
 * The C twin of examples/fixtures/counter.wat, without libc: each tick publishes
 * `burst` records on stream `n`, each the next value of a counter as 8 hex digits
 * (00000001, 00000002, ...). `burst` is the config as a decimal number (10 without
 * config). KILN_NO_LIBC keeps the header from linking any of libc in, so the module
 * imports nothing but `kiln` (no WASI) and runs on the lean kilnd too; it is a few
 * hundred bytes. Built by scripts/c-examples.sh, like sensor-filter.c.
 */
#define KILN_NO_LIBC
#include "kiln.h"

static uint32_t n;
static uint32_t burst = 10;

int32_t kiln_init(void) {
    char config[16];
    int32_t len = kiln_config_read(config, sizeof config);
    if (len > 0) {
        uint32_t v = 0;
        for (int32_t i = 0; i < len; i++) {
            if (config[i] < '0' || config[i] > '9') {
                kiln_log(KILN_ERROR, "init failed: the config is not a decimal number");
                return 1;
            }
            v = v * 10 + (uint32_t)(config[i] - '0');
        }
        burst = v;
    }
    return 0;
}

int32_t kiln_tick(void) {
    static const char hex[] = "0123456789abcdef";
    for (uint32_t k = 0; k < burst; k++) {
        char record[8];
        n++;
        for (int d = 0; d < 8; d++) record[d] = hex[(n >> (28 - 4 * d)) & 15];
        int32_t status = kiln_publish("n", record, sizeof record);
        if (status < 0) {
            kiln_log(KILN_ERROR, kiln_strerror(status));
            return 1;
        }
    }
    return 0;
}
