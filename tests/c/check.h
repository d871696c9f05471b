/* check.h -- what the C test programs of tests/c share: CHECK(cond, fmt, ...) counts a
 * failure and prints where it happened without stopping the program, which returns
 * `failures != 0` at the end; dl_tensor() builds a DLTensor. Included by each test program
 * once (it defines `failures`), after based.h. */
#ifndef BASED_TEST_CHECK_H
#define BASED_TEST_CHECK_H

#include <stdio.h>
#include <string.h>

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

/* A DLTensor of `code`/`bits` (one lane) on (device_type, device_id); strides NULL: row-major. */
static inline DLTensor dl_tensor(void *data, int device_type, int device_id, int ndim, int64_t *shape,
                                 int64_t *strides, uint8_t code, uint8_t bits) {
    DLTensor t;
    memset(&t, 0, sizeof t);
    t.data = data;
    t.device.device_type = (DLDeviceType)device_type;
    t.device.device_id = device_id;
    t.ndim = ndim;
    t.dtype.code = code;
    t.dtype.bits = bits;
    t.dtype.lanes = 1;
    t.shape = shape;
    t.strides = strides;
    return t;
}

#endif
