/* check.h -- what the C test programs of tests/c share: CHECK(cond, fmt, ...) counts a
 * failure and prints where it happened without stopping the program, which returns
 * `failures != 0` at the end. Included by each test program once (it defines `failures`). */
#ifndef BASED_TEST_CHECK_H
#define BASED_TEST_CHECK_H

#include <stdio.h>

static int failures = 0;

#define CHECK(cond, ...)                                         \
    do {                                                         \
        if (!(cond)) {                                           \
            failures++;                                          \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
            fprintf(stderr, __VA_ARGS__);                        \
            fprintf(stderr, "\n");                               \
        }                                                        \
    } while (0)

#endif
