/*
 * A control panel on GPIO and I2C (the `gpio` and `i2c` capabilities: kilnd.toml
 * grants two input lines as `buttons`, two output lines as `leds`, and an EEPROM
 * at one I2C address as `eeprom`, to this module). At start it writes its boot count
 * to the EEPROM (register 0x10, one byte: read, add one, write back) and a 4-byte
 * marker to registers 0x00-0x03 (one I2C block write). Each tick it lights each LED
 * while its button is pressed, or while the fleet's `leds` command holds it on (`kiln
 * send ... --topic leds --data 2`: a mask, answered `leds=2`), reads the marker back,
 * and publishes on `panel`:
 *
 *   {"buttons":1,"leds":3,"held":2,"edges":4,"boots":3,"marker":"4b494c4e"}
 *
 * `edges` counts the button edges kilnd delivered (the grant's `edges = "both"`: each
 * arrives in kiln_on_message on topic `gpio/buttons` before the next tick).
 *
 * Errors from the devices are published too ({"error":"..."}), so a wiring fault is
 * visible in the fleet's telemetry, and the tick goes on. Built by
 * scripts/c-examples.sh.
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "kiln.h"

static int32_t buttons = -1, leds = -1, eeprom = -1;
static int32_t boots, held, edges;
static const uint8_t MARKER[4] = {'K', 'I', 'L', 'N'};

static int32_t open_all(void) {
    buttons = kiln_gpio_open("buttons");
    leds = kiln_gpio_open("leds");
    eeprom = kiln_i2c_open("eeprom");
    if (buttons < 0 || leds < 0 || eeprom < 0) {
        kiln_error("panel: buttons %s, leds %s, eeprom %s", kiln_strerror(buttons < 0 ? buttons : 0),
                   kiln_strerror(leds < 0 ? leds : 0), kiln_strerror(eeprom < 0 ? eeprom : 0));
        return 1;
    }
    return 0;
}

int32_t kiln_init(void) {
    if (open_all()) return 1;
    uint8_t count = 0;
    int32_t r = kiln_i2c_read(eeprom, 0x10, &count, 1);
    if (r == 1) {
        count++;
        r = kiln_i2c_write(eeprom, 0x10, &count, 1);
    }
    if (r == 1) r = kiln_i2c_write(eeprom, 0x00, MARKER, sizeof MARKER);
    if (r < 0) {
        kiln_error("panel: eeprom: %s", kiln_strerror(r));
        return 1;
    }
    boots = count;
    kiln_info("panel: boot %d", (int)boots);
    return 0;
}

int32_t kiln_on_message(int32_t len) {
    char topic[80], data[16];
    if (kiln_message_topic(topic, sizeof topic) < 0) return 1;
    if (!strcmp(topic, "gpio/buttons")) {
        edges++;
        return 0;
    }
    if (strcmp(topic, "command/leds")) return 0;
    if (len < 1 || len >= (int32_t)sizeof data) return 2;
    int32_t n = kiln_message_read(data, sizeof data - 1);
    if (n < 1) return 2;
    data[n] = '\0';
    if (data[0] < '0' || data[0] > '3' || data[1]) return 2;
    held = data[0] - '0';
    char answer[16];
    int w = snprintf(answer, sizeof answer, "leds=%d", (int)held);
    kiln_reply(answer, (size_t)w);
    return 0;
}

int32_t kiln_tick(void) {
    int32_t pressed = kiln_gpio_read(buttons);
    if (pressed < 0) {
        kiln_publishf("panel", "{\"error\":\"buttons: %s\"}", kiln_strerror(pressed));
        return 0;
    }
    int32_t lit = pressed | held;
    int32_t r = kiln_gpio_write(leds, (uint16_t)lit, 0x3);
    if (r < 0) {
        kiln_publishf("panel", "{\"error\":\"leds: %s\"}", kiln_strerror(r));
        return 0;
    }
    uint8_t marker[4];
    r = kiln_i2c_read(eeprom, 0x00, marker, sizeof marker);
    if (r != (int32_t)sizeof marker) {
        kiln_publishf("panel", "{\"error\":\"eeprom: %s\"}", kiln_strerror(r < 0 ? r : KILN_E_IO));
        return 0;
    }
    kiln_publishf("panel",
                  "{\"buttons\":%d,\"leds\":%d,\"held\":%d,\"edges\":%d,\"boots\":%d,"
                  "\"marker\":\"%02x%02x%02x%02x\"}",
                  (int)pressed, (int)lit, (int)held, (int)edges, (int)boots, marker[0], marker[1],
                  marker[2], marker[3]);
    return 0;
}
