/*
 * The stateless parts of the C API and its error rules: status names and the last error, key
 * derivation, sealing and opening (forged, truncated, short buffers, bad UTF-8, null pointers),
 * the nonce cache, and SPKI pins. argv[1] is the data file the Rust side wrote; its
 * `certificate <der hex> <pin hex>` line is a test certificate and its expected pin.
 */
#include "check.h"

static const char HEARTBEAT[] = "{\"kind\":\"heartbeat\",\"seq\":4,\"ts\":0,\"body\":{}}";

static void status_and_last_error(void) {
    CHECK(strcmp(viw_status_name(VIW_OK), "ok") == 0);
    CHECK(strcmp(viw_status_name(VIW_ERR_BAD_MAC), "bad_mac") == 0);
    CHECK(strcmp(viw_status_name(VIW_ERR_SHORT_BUFFER), "short_buffer") == 0);
    CHECK(strcmp(viw_status_name(12345), "unknown") == 0);

    uint8_t out[32];
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_agent_key_derive(NULL, "a", 1, out));
    size_t len = viw_last_error(NULL, 0);
    CHECK(len > 0);
    char small[8];
    CHECK(viw_last_error(small, sizeof small) == len);
    CHECK(strlen(small) == sizeof small - 1); /* cut, and NUL-terminated */
    char full[256];
    viw_last_error(full, sizeof full);
    CHECK(strstr(full, "master_key is null") != NULL);
    /* A success clears it. */
    CHECK_OK(viw_anonymous_reject_key(out));
    CHECK(viw_last_error(full, sizeof full) == 0);
    CHECK(full[0] == '\0');
}

static void keys(void) {
    uint8_t master[32] = {1}, agent_key[32], again[32], other[32];
    CHECK_OK(viw_agent_key_derive(master, "gw-1", 4, agent_key));
    CHECK_OK(viw_agent_key_derive(master, "gw-1", 4, again));
    CHECK_OK(viw_agent_key_derive(master, "gw-2", 4, other));
    CHECK(memcmp(agent_key, again, 32) == 0);
    CHECK(memcmp(agent_key, other, 32) != 0);
    CHECK_STATUS(VIW_ERR_INVALID_ARGUMENT, viw_agent_key_derive(master, "gw 1", 4, other));
    CHECK_STATUS(VIW_ERR_INVALID_ARGUMENT, viw_agent_key_derive(master, "", 0, other));
    CHECK_STATUS(VIW_ERR_INVALID_UTF8, viw_agent_key_derive(master, "gw\xff", 3, other));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_agent_key_derive(master, NULL, 4, other));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_agent_key_derive(master, "gw-1", 4, NULL));

    viw_direction_keys handshake, bound, session, swapped;
    uint8_t binding[32] = {7}, n1[32] = {1}, n2[32] = {2};
    CHECK_OK(viw_direction_keys_handshake(agent_key, NULL, &handshake));
    CHECK_OK(viw_direction_keys_handshake(agent_key, binding, &bound));
    CHECK(memcmp(handshake.agent_to_host, bound.agent_to_host, 32) != 0);
    CHECK(memcmp(handshake.agent_to_host, handshake.host_to_agent, 32) != 0);
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_direction_keys_handshake(NULL, NULL, &handshake));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_direction_keys_handshake(agent_key, NULL, NULL));
    CHECK_OK(viw_direction_keys_session(agent_key, n1, n2, &session));
    CHECK_OK(viw_direction_keys_session(agent_key, n2, n1, &swapped));
    CHECK(memcmp(session.agent_to_host, swapped.agent_to_host, 32) != 0);
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_direction_keys_session(agent_key, NULL, n2, &session));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_direction_keys_session(agent_key, n1, n2, NULL));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_anonymous_reject_key(NULL));
}

static void seal_and_open(void) {
    uint8_t key[32] = {3}, other[32] = {4}, sealed[256], copy[256];
    char json[256];
    size_t len = 0, json_len = 0;

    /* Asking for the length, then a buffer one byte short, then the right size. */
    CHECK_STATUS(VIW_ERR_SHORT_BUFFER, viw_seal(key, HEARTBEAT, strlen(HEARTBEAT), NULL, 0, &len));
    CHECK(len == 1 + strlen(HEARTBEAT) + 32);
    size_t needed = len;
    CHECK_STATUS(VIW_ERR_SHORT_BUFFER, viw_seal(key, HEARTBEAT, strlen(HEARTBEAT), sealed, needed - 1, &len));
    CHECK(len == needed);
    CHECK_OK(viw_seal(key, HEARTBEAT, strlen(HEARTBEAT), sealed, sizeof sealed, &len));
    CHECK(len == needed);
    CHECK(sealed[0] == 1);

    CHECK_OK(viw_open(key, sealed, len, 0, json, sizeof json, &json_len));
    CHECK(json_len == strlen(HEARTBEAT) && memcmp(json, HEARTBEAT, json_len) == 0);
    CHECK_STATUS(VIW_ERR_SHORT_BUFFER, viw_open(key, sealed, len, 0, json, 3, &json_len));
    CHECK(json_len == strlen(HEARTBEAT));

    /* Forged: any flipped bit, or the wrong key. */
    memcpy(copy, sealed, len);
    copy[10] ^= 0x20;
    CHECK_STATUS(VIW_ERR_BAD_MAC, viw_open(key, copy, len, 0, json, sizeof json, &json_len));
    memcpy(copy, sealed, len);
    copy[len - 1] ^= 0x01;
    CHECK_STATUS(VIW_ERR_BAD_MAC, viw_open(key, copy, len, 0, json, sizeof json, &json_len));
    CHECK_STATUS(VIW_ERR_BAD_MAC, viw_open(other, sealed, len, 0, json, sizeof json, &json_len));
    /* Size and version are checked before the tag. */
    CHECK_STATUS(VIW_ERR_TOO_SHORT, viw_open(key, sealed, 20, 0, json, sizeof json, &json_len));
    CHECK_STATUS(VIW_ERR_TOO_LARGE, viw_open(key, sealed, len, len - 1, json, sizeof json, &json_len));
    memcpy(copy, sealed, len);
    copy[0] = 2;
    CHECK_STATUS(VIW_ERR_UNSUPPORTED_VERSION, viw_open(key, copy, len, 0, json, sizeof json, &json_len));

    /* Bad input to seal. */
    CHECK_STATUS(VIW_ERR_INVALID_UTF8, viw_seal(key, "{\"kind\":\"\xc3\x28\"}", 13, sealed, sizeof sealed, &len));
    CHECK_STATUS(VIW_ERR_MALFORMED, viw_seal(key, "{\"kind\":", 8, sealed, sizeof sealed, &len));
    const char *upgrade = "{\"kind\":\"upgrade\",\"seq\":1,\"ts\":0,\"body\":{}}";
    CHECK_STATUS(VIW_ERR_UNKNOWN_KIND, viw_seal(key, upgrade, strlen(upgrade), sealed, sizeof sealed, &len));

    /* Null pointers, each in turn. */
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_seal(NULL, HEARTBEAT, strlen(HEARTBEAT), sealed, sizeof sealed, &len));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_seal(key, NULL, 5, sealed, sizeof sealed, &len));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_seal(key, HEARTBEAT, strlen(HEARTBEAT), NULL, sizeof sealed, &len));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_seal(key, HEARTBEAT, strlen(HEARTBEAT), sealed, sizeof sealed, NULL));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_open(key, NULL, 40, 0, json, sizeof json, &json_len));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_open(NULL, sealed, needed, 0, json, sizeof json, &json_len));
}

static void nonce_cache(void) {
    uint8_t seed[32] = {9}, nonce[32] = {1}, other[32] = {2};
    viw_nonce_cache *cache = (viw_nonce_cache *)1;
    CHECK_STATUS(VIW_ERR_INVALID_ARGUMENT, viw_nonce_cache_new(0, 0, 10000, seed, &cache));
    CHECK(cache == NULL);
    CHECK_STATUS(VIW_ERR_INVALID_ARGUMENT, viw_nonce_cache_new(4, 5, 10000, seed, &cache));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_nonce_cache_new(4, 0, 10000, NULL, &cache));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_nonce_cache_new(4, 0, 10000, seed, NULL));
    CHECK_OK(viw_nonce_cache_new(3, 2, 10000, seed, &cache));
    CHECK(cache != NULL);

    viw_nonce_outcome outcome;
    size_t len = 99;
    CHECK_OK(viw_nonce_cache_len(cache, &len));
    CHECK(len == 0);
    CHECK_OK(viw_nonce_cache_check(cache, "gw", 2, nonce, 100000, 100000, &outcome));
    CHECK(outcome == VIW_NONCE_OUTCOME_FRESH);
    CHECK_OK(viw_nonce_cache_check(cache, "gw", 2, nonce, 100000, 105000, &outcome));
    CHECK(outcome == VIW_NONCE_OUTCOME_REPLAYED);
    CHECK_OK(viw_nonce_cache_check(cache, "other", 5, nonce, 100000, 105000, &outcome));
    CHECK(outcome == VIW_NONCE_OUTCOME_FRESH);
    CHECK_OK(viw_nonce_cache_check(cache, "gw", 2, other, 100000, 105000, &outcome));
    CHECK(outcome == VIW_NONCE_OUTCOME_FRESH);
    nonce[0] = 3;
    CHECK_OK(viw_nonce_cache_check(cache, "gw", 2, nonce, 100000, 105000, &outcome));
    CHECK(outcome == VIW_NONCE_OUTCOME_OVER_QUOTA);
    CHECK_OK(viw_nonce_cache_check(cache, "third", 5, nonce, 100000, 105000, &outcome));
    CHECK(outcome == VIW_NONCE_OUTCOME_FULL);
    CHECK_OK(viw_nonce_cache_check(cache, "gw", 2, nonce, 80000, 105000, &outcome));
    CHECK(outcome == VIW_NONCE_OUTCOME_STALE);
    CHECK_OK(viw_nonce_cache_len(cache, &len));
    CHECK(len == 3);
    CHECK_OK(viw_nonce_cache_set_horizon(cache, 200000));
    CHECK_OK(viw_nonce_cache_check(cache, "gw", 2, nonce, 199999, 200000, &outcome));
    CHECK(outcome == VIW_NONCE_OUTCOME_STALE);
    CHECK_OK(viw_nonce_cache_len(cache, &len));
    CHECK(len == 0);

    CHECK_STATUS(VIW_ERR_INVALID_ARGUMENT, viw_nonce_cache_check(cache, "g w", 3, nonce, 1, 1, &outcome));
    CHECK_STATUS(VIW_ERR_INVALID_UTF8, viw_nonce_cache_check(cache, "\xff", 1, nonce, 1, 1, &outcome));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_nonce_cache_check(NULL, "gw", 2, nonce, 1, 1, &outcome));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_nonce_cache_check(cache, "gw", 2, NULL, 1, 1, &outcome));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_nonce_cache_check(cache, "gw", 2, nonce, 1, 1, NULL));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_nonce_cache_set_horizon(NULL, 1));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_nonce_cache_len(cache, NULL));
    viw_nonce_cache_free(cache);
    viw_nonce_cache_free(NULL);
}

static void pins(const char *data_file) {
    FILE *file = fopen(data_file, "r");
    CHECK(file != NULL);
    static char line[65536], der_hex[65536], pin_hex[128];
    uint8_t der[32768], expected[32];
    long der_len = -1;
    while (fgets(line, sizeof line, file)) {
        if (sscanf(line, "certificate %s %s", der_hex, pin_hex) == 2) {
            der_len = unhex(der_hex, der, sizeof der);
            CHECK(unhex(pin_hex, expected, 32) == 32);
        }
    }
    fclose(file);
    CHECK(der_len > 0);

    uint8_t pin[32], parsed[32], other[32] = {0};
    CHECK_OK(viw_spki_pin_of_certificate(der, (size_t)der_len, pin));
    CHECK(memcmp(pin, expected, 32) == 0);
    CHECK_STATUS(VIW_ERR_BAD_CERTIFICATE, viw_spki_pin_of_certificate(der, 10, pin));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_spki_pin_of_certificate(NULL, 10, pin));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_spki_pin_of_certificate(der, (size_t)der_len, NULL));

    char text[64] = "sha256/";
    size_t text_len = 0;
    CHECK_STATUS(VIW_ERR_SHORT_BUFFER, viw_spki_pin_to_base64(pin, text + 7, 10, &text_len));
    CHECK(text_len == 44);
    CHECK_OK(viw_spki_pin_to_base64(pin, text + 7, sizeof text - 7, &text_len));
    CHECK_OK(viw_spki_pin_parse(text, 7 + text_len, parsed));
    CHECK(memcmp(parsed, pin, 32) == 0);
    CHECK_OK(viw_spki_pin_parse(text + 7, text_len, parsed));
    CHECK(memcmp(parsed, pin, 32) == 0);
    CHECK_STATUS(VIW_ERR_INVALID_ARGUMENT, viw_spki_pin_parse("AAAA", 4, parsed));
    CHECK_STATUS(VIW_ERR_INVALID_UTF8, viw_spki_pin_parse("\xff\xfe", 2, parsed));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_spki_pin_parse(NULL, 4, parsed));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_spki_pin_to_base64(NULL, text, sizeof text, &text_len));

    viw_pin_match matched;
    CHECK_OK(viw_pin_set_check_certificate(pin, NULL, der, (size_t)der_len, &matched));
    CHECK(matched == VIW_PIN_MATCH_PRIMARY);
    CHECK_OK(viw_pin_set_check_certificate(other, pin, der, (size_t)der_len, &matched));
    CHECK(matched == VIW_PIN_MATCH_BACKUP);
    CHECK_STATUS(VIW_ERR_PIN_MISMATCH, viw_pin_set_check_certificate(other, NULL, der, (size_t)der_len, &matched));
    CHECK_STATUS(VIW_ERR_PIN_MISMATCH, viw_pin_set_check_certificate(other, other, der, (size_t)der_len, &matched));
    CHECK_STATUS(VIW_ERR_BAD_CERTIFICATE, viw_pin_set_check_certificate(pin, NULL, der, 3, &matched));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_pin_set_check_certificate(NULL, NULL, der, (size_t)der_len, &matched));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_pin_set_check_certificate(pin, NULL, der, (size_t)der_len, NULL));
}

static void owned_bytes(void) {
    viw_bytes empty = {NULL, 0};
    viw_bytes_free(&empty);
    viw_bytes_free(NULL);
    viw_event_free(NULL);
    viw_refusal_free(NULL);
    viw_host_free(NULL);
    viw_host_session_free(NULL);
    viw_agent_session_free(NULL);
    CHECK(1);
}

int main(int argc, char **argv) {
    CHECK(argc == 2);
    status_and_last_error();
    keys();
    seal_and_open();
    nonce_cache();
    pins(argv[1]);
    owned_bytes();
    report("test_primitives");
    return 0;
}
