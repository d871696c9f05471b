/*
 * dlpack.h -- the DLPack ABI (v1.x) as `based` uses it.
 *
 * Written for this project from the DLPack specification (dmlc/dlpack, "Python
 * specification for DLPack" and the C ABI it describes); it is not a copy of the
 * upstream header. Type names, field order and enum values are those of the ABI,
 * which is all that matters for interoperability. The static asserts at the bottom
 * pin the x86-64/LP64 layout: 48-byte DLTensor, 64-byte DLManagedTensor, 80-byte
 * DLManagedTensorVersioned with dl_tensor at offset 32.
 *
 * What we conform to: version 1.3 for the parts we implement (versioned capsules,
 * flags, non-NULL strides on export). Legacy (unversioned) capsules are read and
 * written too, because JAX only speaks those.
 */
#ifndef BASED_DLPACK_H
#define BASED_DLPACK_H

#include <stddef.h>
#include <stdint.h>

#define DLPACK_MAJOR_VERSION 1
#define DLPACK_MINOR_VERSION 3

#ifdef __cplusplus
extern "C" {
#endif

/* Device kinds. Only the values are part of the ABI. */
typedef enum {
    kDLCPU = 1,
    kDLCUDA = 2,
    kDLCUDAHost = 3,    /* pinned host memory (cudaMallocHost) */
    kDLOpenCL = 4,
    kDLVulkan = 7,
    kDLMetal = 8,
    kDLVPI = 9,
    kDLROCM = 10,
    kDLROCMHost = 11,
    kDLExtDev = 12,
    kDLCUDAManaged = 13,
    kDLOneAPI = 14,
    kDLWebGPU = 15,
    kDLHexagon = 16,
    kDLMAIA = 17,
    kDLTrn = 18,
} DLDeviceType;

typedef struct {
    DLDeviceType device_type;
    int32_t device_id;          /* the producer's device ordinal; 0 for host memory */
} DLDevice;

/* Type codes of DLDataType.code. */
typedef enum {
    kDLInt = 0,
    kDLUInt = 1,
    kDLFloat = 2,
    kDLOpaqueHandle = 3,
    kDLBfloat = 4,
    kDLComplex = 5,
    kDLBool = 6,
    kDLFloat8_e3m4 = 7,
    kDLFloat8_e4m3 = 8,
    kDLFloat8_e4m3b11fnuz = 9,
    kDLFloat8_e4m3fn = 10,
    kDLFloat8_e4m3fnuz = 11,
    kDLFloat8_e5m2 = 12,
    kDLFloat8_e5m2fnuz = 13,
    kDLFloat8_e8m0fnu = 14,
    kDLFloat6_e2m3fn = 15,
    kDLFloat6_e3m2fn = 16,
    kDLFloat4_e2m1fn = 17,
} DLDataTypeCode;

typedef struct {
    uint8_t code;               /* a DLDataTypeCode */
    uint8_t bits;               /* width of one lane */
    uint16_t lanes;             /* 1 for scalars; based accepts nothing else */
} DLDataType;

/*
 * A strided view of memory. The first element is at (char *)data + byte_offset.
 * strides are counted in elements; NULL means row-major contiguous (allowed for
 * consumers to receive, never produced by based). shape/strides may be NULL when
 * ndim == 0. Zero-size tensors may have data == NULL.
 */
typedef struct {
    void *data;
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t *shape;
    int64_t *strides;
    uint64_t byte_offset;
} DLTensor;

/* Legacy managed tensor, carried in a capsule named "dltensor". */
typedef struct DLManagedTensor {
    DLTensor dl_tensor;
    void *manager_ctx;
    void (*deleter)(struct DLManagedTensor *self);
} DLManagedTensor;

typedef struct {
    uint32_t major;
    uint32_t minor;
} DLPackVersion;

/* Bits of DLManagedTensorVersioned.flags. */
#define DLPACK_FLAG_BITMASK_READ_ONLY (UINT64_C(1) << 0)
#define DLPACK_FLAG_BITMASK_IS_COPIED (UINT64_C(1) << 1)
#define DLPACK_FLAG_BITMASK_IS_SUBBYTE_TYPE_PADDED (UINT64_C(1) << 2)

/*
 * Versioned managed tensor, carried in a capsule named "dltensor_versioned".
 * Everything up to and including `flags` keeps its place across major versions,
 * so a consumer can always read `version` and call `deleter`.
 */
typedef struct DLManagedTensorVersioned {
    DLPackVersion version;
    void *manager_ctx;
    void (*deleter)(struct DLManagedTensorVersioned *self);
    uint64_t flags;
    DLTensor dl_tensor;
} DLManagedTensorVersioned;

/*
 * The C exchange API of DLPack 1.3: a framework publishes a static table of function
 * pointers as a PyCapsule named "dlpack_exchange_api" in the type attribute
 * `__dlpack_c_exchange_api__`. A consumer can then borrow a tensor without the Python-level
 * `__dlpack__` call (no stream synchronisation is done: the consumer asks
 * `current_work_stream` and runs there). Only the members based calls are typed in full;
 * the others keep their place as opaque pointers. Check `header.version.major` (walking
 * `prev_api` for an older table) before calling anything.
 */
typedef struct DLPackExchangeAPIHeader {
    DLPackVersion version;
    struct DLPackExchangeAPIHeader *prev_api;
} DLPackExchangeAPIHeader;

typedef struct DLPackExchangeAPI {
    DLPackExchangeAPIHeader header;
    void *managed_tensor_allocator;
    /* py_object -> an owning versioned tensor; 0, or -1 with a Python exception set */
    int (*managed_tensor_from_py_object_no_sync)(void *py_object, DLManagedTensorVersioned **out);
    void *managed_tensor_to_py_object_no_sync;
    void *dltensor_from_py_object_no_sync;
    /* the producer's current stream for a device (NULL on the CPU); 0, or -1 with an exception */
    int (*current_work_stream)(DLDeviceType device_type, int32_t device_id, void **out_stream);
} DLPackExchangeAPI;

#if !defined(__cplusplus) && defined(__x86_64__)
_Static_assert(sizeof(DLDevice) == 8, "DLDevice is 8 bytes");
_Static_assert(sizeof(DLDataType) == 4, "DLDataType is 4 bytes");
_Static_assert(sizeof(DLTensor) == 48, "DLTensor is 48 bytes");
_Static_assert(offsetof(DLTensor, shape) == 24, "DLTensor.shape at 24");
_Static_assert(offsetof(DLTensor, byte_offset) == 40, "DLTensor.byte_offset at 40");
_Static_assert(sizeof(DLManagedTensor) == 64, "DLManagedTensor is 64 bytes");
_Static_assert(sizeof(DLManagedTensorVersioned) == 80, "DLManagedTensorVersioned is 80 bytes");
_Static_assert(offsetof(DLManagedTensorVersioned, flags) == 24, "flags at 24");
_Static_assert(offsetof(DLManagedTensorVersioned, dl_tensor) == 32, "dl_tensor at 32");
_Static_assert(sizeof(DLPackExchangeAPIHeader) == 16, "exchange API header is 16 bytes");
_Static_assert(offsetof(DLPackExchangeAPI, managed_tensor_from_py_object_no_sync) == 24, "exchange API layout");
_Static_assert(offsetof(DLPackExchangeAPI, current_work_stream) == 48, "exchange API layout");
#endif

#ifdef __cplusplus
}
#endif

#endif /* BASED_DLPACK_H */
