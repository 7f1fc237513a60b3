/*
 * Assertions and small helpers shared by the C tests. Each test is a program that exits 0
 * when every check passed; a failed check prints where and why, with the library's last error,
 * and exits 1.
 */
#ifndef VIWORKS_TEST_CHECK_H
#define VIWORKS_TEST_CHECK_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "viworks.h"

static int checks_run = 0;

static void fail_at(const char *file, int line, const char *what) {
    char message[512];
    viw_last_error(message, sizeof message);
    fprintf(stderr, "%s:%d: check failed: %s\n  last error: %s\n", file, line, what, message);
    exit(1);
}

/* Checks a condition. */
#define CHECK(cond)                                                                                \
    do {                                                                                           \
        checks_run++;                                                                              \
        if (!(cond)) fail_at(__FILE__, __LINE__, #cond);                                           \
    } while (0)

/* Checks that a call returned the expected status, and that a failure left a message. */
#define CHECK_STATUS(expected, call)                                                               \
    do {                                                                                           \
        checks_run++;                                                                              \
        viw_status got_ = (call);                                                                  \
        if (got_ != (expected)) {                                                                  \
            fprintf(stderr, "  expected %s, got %s\n", viw_status_name(expected),                  \
                    viw_status_name(got_));                                                        \
            fail_at(__FILE__, __LINE__, #call);                                                    \
        }                                                                                          \
        if (got_ != VIW_OK && viw_last_error(NULL, 0) == 0)                                        \
            fail_at(__FILE__, __LINE__, "a failure left no last error: " #call);                   \
    } while (0)

#define CHECK_OK(call) CHECK_STATUS(VIW_OK, call)

/* Decodes lowercase hex into out (at most cap bytes); returns the byte count or -1. */
static inline long unhex(const char *hex, uint8_t *out, size_t cap) {
    size_t len = strlen(hex);
    if (len % 2 != 0 || len / 2 > cap) return -1;
    for (size_t i = 0; i < len / 2; i++) {
        unsigned byte;
        if (sscanf(hex + 2 * i, "%2x", &byte) != 1) return -1;
        out[i] = (uint8_t)byte;
    }
    return (long)(len / 2);
}

static inline void report(const char *name) {
    printf("%s: %d checks passed\n", name, checks_run);
}

#endif
