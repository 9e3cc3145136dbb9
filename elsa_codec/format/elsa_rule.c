/* The ELSA code rule on the CPU: encode, extract a sparse level, decode the codes.
 *
 * ELSA (Halvachi et al., arXiv 2312.06872), section 2.2; DESIGN.md, "The code rule". A weight x
 * (float32, bfloat16 or float16) with code c is stored as the finite float of the same dtype and the
 * same sign whose k low bits equal c and which is nearest to x by value; on a tie, the smaller
 * magnitude. Level t keeps the weights with c < t, with their exact bits (the others become +0.0).
 *
 * Plain C99 integer arithmetic on the raw bit patterns, written so that gcc -O3 vectorises every
 * loop (one pass over the data; no intrinsics, no floating point). Built by elsa_codec/native.py
 * (cc -O3 -fopenmp, plus -mavx2 -mfma -mf16c where the CPU has them and 512-bit AVX-512 where it has
 * that) separately from elsa_cpu.cpp, and called through ctypes from elsa_codec/format/bits.py, whose
 * PyTorch functions (_encode_chunk, _extract_reference and decode_codes' reference) these functions
 * equal bit for bit.
 *
 * Arrays are contiguous, n elements; 16-bit dtypes are passed as uint16_t patterns. Codes come as
 * uint8, int16, int32 or int64 (what encode_tensor receives: counters - 1 are uint8, or int16 for
 * 255 levels); the encoders return a status: bit 0 = some
 * weight is NaN or Inf, bit 1 = some code lies outside 0..2^k - 1 (the output is then unspecified).
 * Below PAR_MIN elements the calling thread runs alone; above, omp_get_max_threads() threads run:
 * PyTorch's threads, as the kernels share PyTorch's libgomp (torch.get_num_threads() returns it, and
 * torch.set_num_threads() sets it).
 *
 * Compiled with -DELSA_RULE_PYTHON (cpu_build.py does where Python.h is found), the same shared
 * object is also the CPython module _elsa_rule, whose functions of the same names (without the
 * elsa_ prefix) take Python ints and skip ctypes' argument conversion: about 0.1 us a call instead
 * of 0.8 us, where a copy_ of a 64x64 tensor takes about 1 us. Without it, plain C99/C11.
 */
#ifdef ELSA_RULE_PYTHON /* the optional CPython entry points at the end of the file */
#define PY_SSIZE_T_CLEAN
#include <Python.h> /* first, as Python asks: it sets the feature macros */
#endif
#ifndef _DEFAULT_SOURCE
#define _DEFAULT_SOURCE /* MADV_HUGEPAGE under -std=c11 */
#endif
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

#define ELSA_RULE_ABI 2
/* Below this many elements the loop runs on the calling thread (no fork/join). */
#define PAR_MIN (1 << 17)
/* Elements per OpenMP work item. */
#define BLOCK (1 << 14)
/* The loops stay separate functions: inlined into a caller, gcc 12 may turn selects into branches
 * (jump threading) and then no longer vectorises the loop. */
#if defined(__GNUC__)
#define NOINLINE __attribute__((noinline))
#else
#define NOINLINE
#endif

int elsa_rule_abi(void) { return ELSA_RULE_ABI; }

/* Threads for n elements: 1 below PAR_MIN (no fork/join), else OpenMP's (PyTorch's) count. */
static int threads_for(int64_t n) {
#ifdef _OPENMP
    return n < PAR_MIN ? 1 : omp_get_max_threads();
#else
    (void)n;
    return 1;
#endif
}

/* Outputs of at least this many bytes are advised onto transparent huge pages. */
#define HUGE_MIN (8 << 20)

/* A fresh output (every function here writes one that the caller has just allocated) faults in
 * 4 KiB pages on its first write, and for large tensors those faults cost twice the pass itself
 * (4096 x 4096 float32 extract on a 2-core Xeon VM: 48 ms fresh, 16 ms into touched memory). The
 * 2 MiB-aligned interior of a large output is therefore advised onto transparent huge pages
 * (28 ms there). An advice only: nothing changes where THP is off, or off Linux. */
static void advise_huge_pages(void* out, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)1 << 21;
    if (bytes < HUGE_MIN) return;
    uintptr_t a = ((uintptr_t)out + huge - 1) & ~(huge - 1), e = ((uintptr_t)out + (uintptr_t)bytes) & ~(huge - 1);
    if (e > a) madvise((void*)a, e - a, MADV_HUGEPAGE);
#else
    (void)out;
    (void)bytes;
#endif
}

/* -- the rule on one magnitude ------------------------------------------------------------------
 * Candidates: `above`, the pattern with low bits c at or above |x|, and `below = above - 2^k`. A
 * candidate must be finite (above <= maxf) and non-negative (above >= 2^k); of two, the nearer by
 * value, `below` on a tie.
 *
 * Distances in integers: value grows with the pattern, by one unit u per step inside a binade and by
 * 2u per step from the start p of the next binade on (the binades of a float have M mantissa bits;
 * below the smallest normal, p = 2^M, the steps stay u). With 2^k <= 2^M at most one binade start
 * lies in (below, above], namely p = above's binade start, so in units of the smaller step
 * L(q) = q + f * max(q - p, 0), f = 1 if p's exponent is >= 2 else 0, and
 *   d_above = L(above) - L(mag) = above - mag + f * (above - p - max(mag - p, 0)),
 *   d_below = L(mag) - L(below) = mag - below + f * (max(mag - p, 0) - max(below - p, 0)).
 * These are exact: they equal the float32 differences of the reference (_encode_chunk in bits.py),
 * which are exact too (Sterbenz). WT is the work type (uint32_t, or uint16_t for 16-bit floats:
 * every quantity fits, and gcc then computes 16 lanes per AVX2 vector). */
#define RULE(WT, ST, M, mag, code, step, maxf, out)                                      \
    do {                                                                                 \
        WT base_ = (WT)(((mag) & (WT) ~((step) - 1u)) | (code));                        \
        WT above_ = LT(ST, base_, mag) ? (WT)(base_ + (step)) : base_;                   \
        WT below_ = (WT)(above_ - (step));                                               \
        WT p_ = (WT)(above_ & (WT) ~((1u << (M)) - 1u));                                 \
        WT f_ = LT(ST, 1u << (M), p_) ? (WT)~0u : 0; /* all ones when f = 1 */           \
        WT mp_ = LT(ST, p_, mag) ? (WT)((mag) - p_) : 0;                                 \
        WT bp_ = LT(ST, p_, below_) ? (WT)(below_ - p_) : 0;                             \
        WT da_ = (WT)(above_ - (mag) + (f_ & (WT)(above_ - p_ - mp_)));                  \
        WT db_ = (WT)((mag) - below_ + (f_ & (WT)(mp_ - bp_)));                          \
        int tb_ = (!LT(ST, above_, step)) & (LT(ST, maxf, above_) | (!LT(ST, da_, db_)));\
        (out) = tb_ ? below_ : above_;                                                   \
    } while (0)
/* a < b on patterns that fit the signed type ST (all of them here but those of NaN and Inf input,
 * whose output is unspecified): AVX2 compares signed integers in one instruction. */
#define LT(ST, a, b) ((ST)(a) < (ST)(b))

/* One encoder per weight dtype (XT patterns, work type WT, M mantissa bits, sign bit SIGN, largest
 * finite magnitude MAXF) and code type CT (OR-reduced as the unsigned UT for the range check).
 * `_range` encodes [lo, hi) and reduces the largest magnitude (> MAXF means NaN/Inf) and the OR of
 * the codes (>> k nonzero means out of range; negative codes set the top bit). */
#define DEFINE_ENCODE(NAME, XT, WT, ST, M, SIGN, MAXF, CT, UT)                                        \
    static NOINLINE void NAME##_range(const XT* restrict x, const CT* restrict c, WT step,       \
                                      XT* restrict out, int64_t lo, int64_t hi, WT* mx_out,       \
                                      UT* or_out) {                                               \
        WT mx = 0;                                                                                \
        UT cor = 0;                                                                               \
        for (int64_t i = lo; i < hi; i++) {                                                       \
            WT raw = x[i], mag = (WT)(raw & (WT)((SIGN) - 1u)), r;                                \
            UT code = (UT)c[i];                                                                   \
            RULE(WT, ST, M, mag, (WT)code, step, (WT)(MAXF), r);                                  \
            out[i] = (XT)(r | (raw & (WT)(SIGN)));                                                \
            mx = LT(ST, mx, mag) ? mag : mx;                                                      \
            cor |= code;                                                                          \
        }                                                                                         \
        *mx_out = mx;                                                                             \
        *or_out = cor;                                                                            \
    }                                                                                             \
    int NAME(const XT* restrict x, const CT* restrict c, int k, XT* restrict out, int64_t n) {    \
        WT step = (WT)(1u << k), mx = 0;                                                          \
        UT cor = 0;                                                                               \
        int nt = threads_for(n);                                                                  \
        advise_huge_pages(out, n * (int64_t)sizeof(XT));                                          \
        if (nt <= 1) {                                                                            \
            NAME##_range(x, c, step, out, 0, n, &mx, &cor);                                       \
        } else {                                                                                  \
            _Pragma("omp parallel for schedule(static) num_threads(nt) reduction(max : mx) reduction(| : cor)") \
            for (int64_t b = 0; b < n; b += BLOCK) {                                              \
                WT m;                                                                             \
                UT o;                                                                             \
                NAME##_range(x, c, step, out, b, b + BLOCK < n ? b + BLOCK : n, &m, &o);          \
                mx = m > mx ? m : mx;                                                             \
                cor |= o;                                                                         \
            }                                                                                     \
        }                                                                                         \
        return (mx > (MAXF) ? 1 : 0) | (((uint64_t)cor >> k) != 0 ? 2 : 0);                       \
    }

#define DEFINE_ENCODE_DTYPE(NAME, XT, WT, ST, M, SIGN, MAXF)                          \
    DEFINE_ENCODE(NAME##_u8, XT, WT, ST, M, SIGN, MAXF, uint8_t, uint8_t)              \
    DEFINE_ENCODE(NAME##_i16, XT, WT, ST, M, SIGN, MAXF, int16_t, uint16_t)            \
    DEFINE_ENCODE(NAME##_i32, XT, WT, ST, M, SIGN, MAXF, int32_t, uint32_t)            \
    DEFINE_ENCODE(NAME##_i64, XT, WT, ST, M, SIGN, MAXF, int64_t, uint64_t)

/* elsa_encode_{f32,bf16,f16}_{u8,i16,i32,i64}(x, codes, k, out, n) -> status */
DEFINE_ENCODE_DTYPE(elsa_encode_f32, uint32_t, uint32_t, int32_t, 23, 0x80000000u, 0x7F7FFFFFu)
DEFINE_ENCODE_DTYPE(elsa_encode_bf16, uint16_t, uint16_t, int16_t, 7, 0x8000u, 0x7F7Fu)
DEFINE_ENCODE_DTYPE(elsa_encode_f16, uint16_t, uint16_t, int16_t, 10, 0x8000u, 0x7BFFu)

/* -- elementwise maps: CALL (using lo_, hi_) over [0, n), in BLOCKs across threads if large ----- */
#define PARALLEL_MAP(n, CALL)                                                                  \
    do {                                                                                       \
        int nt = threads_for(n);                                                               \
        if (nt <= 1) {                                                                         \
            int64_t lo_ = 0, hi_ = (n);                                                        \
            CALL;                                                                              \
        } else {                                                                               \
            _Pragma("omp parallel for schedule(static) num_threads(nt)")                        \
            for (int64_t b_ = 0; b_ < (n); b_ += BLOCK) {                                      \
                int64_t lo_ = b_, hi_ = b_ + BLOCK < (n) ? b_ + BLOCK : (n);                   \
                CALL;                                                                          \
            }                                                                                  \
        }                                                                                      \
    } while (0)

/* elsa_extract_u{32,16}(x, k, t, out, n): out = x where (x & (2^k - 1)) < t, else 0 (+0.0).
 * t >= 1; a t above 2^k keeps every weight (it is clamped to 2^k, which fits the pattern type). */
#define DEFINE_EXTRACT(NAME, XT)                                                               \
    static NOINLINE void NAME##_range(const XT* restrict x, XT low, XT t, XT* restrict out, int64_t lo,   \
                             int64_t hi) {                                                     \
        for (int64_t i = lo; i < hi; i++) out[i] = (XT)((x[i] & low) < t ? x[i] : 0);          \
    }                                                                                          \
    void NAME(const XT* restrict x, int k, int64_t t, XT* restrict out, int64_t n) {                          \
        XT low = (XT)((1u << k) - 1u), tt = (XT)(t > (int64_t)low ? low + 1u : (uint32_t)t);    \
        advise_huge_pages(out, n * (int64_t)sizeof(XT));                                       \
        PARALLEL_MAP(n, NAME##_range(x, low, tt, out, lo_, hi_));                          \
    }

DEFINE_EXTRACT(elsa_extract_u32, uint32_t)
DEFINE_EXTRACT(elsa_extract_u16, uint16_t)

/* elsa_decode_codes_u{32,16}(x, k, out, n): out (uint8) = x & (2^k - 1). */
#define DEFINE_DECODE(NAME, XT)                                                                 \
    static NOINLINE void NAME##_range(const XT* restrict x, XT low, uint8_t* restrict out, int64_t lo,   \
                             int64_t hi) {                                                      \
        for (int64_t i = lo; i < hi; i++) out[i] = (uint8_t)(x[i] & low);                       \
    }                                                                                           \
    void NAME(const XT* restrict x, int k, uint8_t* restrict out, int64_t n) {                               \
        XT low = (XT)((1u << k) - 1u);                                                          \
        advise_huge_pages(out, n);                                                              \
        PARALLEL_MAP(n, NAME##_range(x, low, out, lo_, hi_));                               \
    }

DEFINE_DECODE(elsa_decode_codes_u32, uint32_t)
DEFINE_DECODE(elsa_decode_codes_u16, uint16_t)

#ifdef ELSA_RULE_PYTHON
/* -- CPython entry points (METH_FASTCALL): Python ints in, the C function called as is -----------
 * Pointers are the tensors' data_ptr(); the GIL is released from PAR_MIN elements on (as ctypes
 * releases it on every call). */
static int py_args(Py_ssize_t na, Py_ssize_t want, const char* name) {
    if (na == want) return 0;
    PyErr_Format(PyExc_TypeError, "%s takes %zd arguments (%zd given)", name, want, na);
    return -1;
}

#define PY_ENCODE(NAME, XT, CT)                                                                  \
    static PyObject* py_##NAME(PyObject* self, PyObject* const* a, Py_ssize_t na) {            \
        (void)self;                                                                             \
        if (py_args(na, 5, #NAME)) return NULL;                                                 \
        void *x = PyLong_AsVoidPtr(a[0]), *c = PyLong_AsVoidPtr(a[1]), *out = PyLong_AsVoidPtr(a[3]); \
        long k = PyLong_AsLong(a[2]);                                                           \
        long long n = PyLong_AsLongLong(a[4]);                                                  \
        if (PyErr_Occurred()) return NULL;                                                      \
        int st;                                                                                 \
        if (n < PAR_MIN) {                                                                      \
            st = elsa_##NAME((const XT*)x, (const CT*)c, (int)k, (XT*)out, n);                  \
        } else {                                                                                \
            Py_BEGIN_ALLOW_THREADS st = elsa_##NAME((const XT*)x, (const CT*)c, (int)k, (XT*)out, n); \
            Py_END_ALLOW_THREADS                                                                \
        }                                                                                       \
        return PyLong_FromLong(st);                                                             \
    }
#define PY_ENCODE_DTYPE(D, XT)                                                                   \
    PY_ENCODE(encode_##D##_u8, XT, uint8_t)                                                      \
    PY_ENCODE(encode_##D##_i16, XT, int16_t)                                                     \
    PY_ENCODE(encode_##D##_i32, XT, int32_t)                                                     \
    PY_ENCODE(encode_##D##_i64, XT, int64_t)
PY_ENCODE_DTYPE(f32, uint32_t)
PY_ENCODE_DTYPE(bf16, uint16_t)
PY_ENCODE_DTYPE(f16, uint16_t)

#define PY_EXTRACT(NAME, XT)                                                                     \
    static PyObject* py_##NAME(PyObject* self, PyObject* const* a, Py_ssize_t na) {            \
        (void)self;                                                                             \
        if (py_args(na, 5, #NAME)) return NULL;                                                 \
        void *x = PyLong_AsVoidPtr(a[0]), *out = PyLong_AsVoidPtr(a[3]);                        \
        long k = PyLong_AsLong(a[1]);                                                           \
        long long t = PyLong_AsLongLong(a[2]), n = PyLong_AsLongLong(a[4]);                     \
        if (PyErr_Occurred()) return NULL;                                                      \
        if (n < PAR_MIN) {                                                                      \
            elsa_##NAME((const XT*)x, (int)k, t, (XT*)out, n);                                  \
        } else {                                                                                \
            Py_BEGIN_ALLOW_THREADS elsa_##NAME((const XT*)x, (int)k, t, (XT*)out, n);           \
            Py_END_ALLOW_THREADS                                                                \
        }                                                                                       \
        Py_RETURN_NONE;                                                                         \
    }
PY_EXTRACT(extract_u32, uint32_t)
PY_EXTRACT(extract_u16, uint16_t)

#define PY_DECODE(NAME, XT)                                                                      \
    static PyObject* py_##NAME(PyObject* self, PyObject* const* a, Py_ssize_t na) {            \
        (void)self;                                                                             \
        if (py_args(na, 4, #NAME)) return NULL;                                                 \
        void *x = PyLong_AsVoidPtr(a[0]), *out = PyLong_AsVoidPtr(a[2]);                        \
        long k = PyLong_AsLong(a[1]);                                                           \
        long long n = PyLong_AsLongLong(a[3]);                                                  \
        if (PyErr_Occurred()) return NULL;                                                      \
        if (n < PAR_MIN) {                                                                      \
            elsa_##NAME((const XT*)x, (int)k, (uint8_t*)out, n);                                \
        } else {                                                                                \
            Py_BEGIN_ALLOW_THREADS elsa_##NAME((const XT*)x, (int)k, (uint8_t*)out, n);         \
            Py_END_ALLOW_THREADS                                                                \
        }                                                                                       \
        Py_RETURN_NONE;                                                                         \
    }
PY_DECODE(decode_codes_u32, uint32_t)
PY_DECODE(decode_codes_u16, uint16_t)

#define PY_METHOD(NAME) {#NAME, (PyCFunction)(void (*)(void))py_##NAME, METH_FASTCALL, NULL},
#define PY_ENCODE_METHODS(D)                                                                     \
    PY_METHOD(encode_##D##_u8) PY_METHOD(encode_##D##_i16) PY_METHOD(encode_##D##_i32) PY_METHOD(encode_##D##_i64)
static PyMethodDef py_methods[] = {
    PY_ENCODE_METHODS(f32) PY_ENCODE_METHODS(bf16) PY_ENCODE_METHODS(f16)
    PY_METHOD(extract_u32) PY_METHOD(extract_u16) PY_METHOD(decode_codes_u32) PY_METHOD(decode_codes_u16)
    {NULL, NULL, 0, NULL}};
static struct PyModuleDef py_module = {PyModuleDef_HEAD_INIT, "_elsa_rule",
                                       "The ELSA code rule (elsa_codec/format/elsa_rule.c).", -1, py_methods,
                                       NULL, NULL, NULL, NULL};
PyMODINIT_FUNC PyInit__elsa_rule(void) { return PyModule_Create(&py_module); }
#endif
