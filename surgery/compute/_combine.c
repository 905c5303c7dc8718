/* One pass over a merge's inputs: a weighted sum of tensors, read in their stored dtype, computed in
float32 and written in the output's dtype, without the GIL.

The torch path (surgery/compute/updates.py, sphere.py) makes about eight passes over memory per block
for the same numbers (decode each input, subtract, scale, add, encode); fused, a merge costs about
what reading its inputs costs. The arithmetic is that path's, operation for operation and in the same
order (compiled with -ffp-contract=off, so no multiply-add is fused), so both give the same bits.
Optional: without a C compiler the torch path runs. TIES' magnitude trim and sign election have their
own passes here too (magnitude_window, magnitude_counts, nth_equal, ties: below).

combine(out, out_dtype, inputs, dtype, coefficients, has_base, centered, zero_start, divisor, factor)
  inputs      buffers of the same number of elements, all of `dtype` ("BF16", "F16" or "F32"); with
              `has_base` the first is the base b, the others the models m_k
  coefficients  c_k, one per model
  out         a writable buffer of as many elements of `out_dtype`
  per element, in float32: v_k = m_k - b when `centered`, else m_k; acc = 0 + v_0 c_0 (`zero_start`)
  or v_0 c_0, then acc + v_k c_k for each further model; acc / divisor unless divisor is 0; + b when
  centered; (acc - b) * factor + b unless factor is 1. bfloat16 is rounded to nearest even, NaN
  written as 0xFFFF, as torch's vectorised conversion writes them. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 8
#define MAX_INPUTS 64

typedef float vf __attribute__((vector_size(4 * LANES)));
typedef uint32_t vu __attribute__((vector_size(4 * LANES)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));
typedef uint16_t vh __attribute__((vector_size(2 * LANES)));
typedef uint64_t vq __attribute__((vector_size(8 * LANES)));
typedef uint8_t vb __attribute__((vector_size(LANES)));
typedef double vd4 __attribute__((vector_size(32)));
#ifdef __FLT16_MAX__
#define HAVE_F16 1
typedef _Float16 vhf __attribute__((vector_size(2 * LANES)));
#endif

enum dtype { BF16, F16, F32 };

typedef struct {
    const char *in[MAX_INPUTS];
    int n_in, has_base, centered, zero_start, divided, scaled; /* the last two decided in double, as Python does */
    float c[MAX_INPUTS], divisor, factor;
} formula;

#define INLINE static inline __attribute__((always_inline))

INLINE vf load(const char *p, enum dtype t, Py_ssize_t i) {
    vf out;
    if (t == BF16) { /* bfloat16 is the high half of a float32 */
        vh h;
        memcpy(&h, p + 2 * i, sizeof h);
        vu u = __builtin_convertvector(h, vu) << 16;
        memcpy(&out, &u, sizeof out);
#ifdef HAVE_F16
    } else if (t == F16) {
        vhf h;
        memcpy(&h, p + 2 * i, sizeof h);
        out = __builtin_convertvector(h, vf);
#endif
    } else {
        memcpy(&out, p + 4 * i, sizeof out);
    }
    return out;
}

INLINE void store(char *p, enum dtype t, Py_ssize_t i, vf x) {
    if (t == BF16) {
        vu u;
        memcpy(&u, &x, sizeof u);
        vu nan = (vu)(x != x);
        vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
        rounded = (rounded & ~nan) | (0xffffu & nan);
        vh h = __builtin_convertvector(rounded, vh);
        memcpy(p + 2 * i, &h, sizeof h);
#ifdef HAVE_F16
    } else if (t == F16) {
        vhf h = __builtin_convertvector(x, vhf);
        memcpy(p + 2 * i, &h, sizeof h);
#endif
    } else {
        memcpy(p + 4 * i, &x, sizeof x);
    }
}

/* A chunk of CHUNK elements at a time, input by input, so each inner loop is one straight pass with
the formula's choices (constants at each call) folded away. */
#define CHUNK 512

INLINE void chunk(const formula *f, enum dtype t, char *out, enum dtype to, Py_ssize_t at, int has_base,
                  int centered, int zero_start, int divided, int scaled) {
    vf b[CHUNK / LANES], acc[CHUNK / LANES];
    const int per = CHUNK / LANES;
    for (int j = 0; j < per; j++) {
        b[j] = has_base ? load(f->in[0], t, at + j * LANES) : (vf){0};
        acc[j] = (vf){0};
    }
    for (int k = has_base; k < f->n_in; k++) {
        const char *in = f->in[k];
        const float c = f->c[k - has_base];
        const int first = k == has_base && !zero_start;
        for (int j = 0; j < per; j++) {
            vf v = load(in, t, at + j * LANES);
            if (centered) v = v - b[j];
            vf term = v * c;
            acc[j] = first ? term : acc[j] + term;
        }
    }
    for (int j = 0; j < per; j++) {
        vf x = acc[j];
        if (divided) x = x / f->divisor;
        if (centered) x = x + b[j];
        if (scaled) x = (x - b[j]) * f->factor + b[j];
        store(out, to, at + j * LANES, x);
    }
}

INLINE void dtyped(const formula *f, enum dtype t, char *out, enum dtype to, Py_ssize_t n) {
#define RUN(...) for (Py_ssize_t at = 0; at < n; at += CHUNK) chunk(f, t, out, to, at, __VA_ARGS__); return
    if (f->has_base && f->centered && !f->zero_start && !f->divided && !f->scaled) { RUN(1, 1, 0, 0, 0); }
    if (f->has_base && f->centered && f->zero_start && !f->divided && !f->scaled) { RUN(1, 1, 1, 0, 0); }
    if (!f->has_base && !f->centered && f->zero_start && f->divided && !f->scaled) { RUN(0, 0, 1, 1, 0); }
    if (!f->has_base && !f->centered && f->zero_start && !f->divided && !f->scaled) { RUN(0, 0, 1, 0, 0); }
    RUN(f->has_base, f->centered, f->zero_start, f->divided, f->scaled);
#undef RUN
}

/* One specialised loop per dtype pair: the dtype tests fold away. */
INLINE void dispatch(const formula *f, enum dtype t, char *out, enum dtype to, Py_ssize_t n) {
#define CASE(a, b) if (t == a && to == b) { dtyped(f, a, out, b, n); return; }
    CASE(BF16, BF16) CASE(BF16, F16) CASE(BF16, F32)
    CASE(F16, BF16) CASE(F16, F16) CASE(F16, F32)
    CASE(F32, BF16) CASE(F32, F16) CASE(F32, F32)
#undef CASE
}

/* Each entry point is compiled three times, plain, for AVX2 with F16C's conversions, and for AVX-512 (whose
64-bit multiply, vpmullq, DARE's SplitMix64 noise needs: AVX2 emulates it with three 32-bit products), and
picked by the CPU's features at run time (not target_clones' "arch=", which picks by CPU model). Every
version does the same IEEE operations in the same order (no contraction: -ffp-contract=off), so the same bits. */
#if defined(__GNUC__) && defined(__x86_64__)
#define AVX512 "avx512f,avx512dq,avx512vl,avx512bw,avx2,f16c"
#define VERSIONED(name, params, args)                                                                         \
    static void name##_default params { name##_any args; }                                                  \
    __attribute__((target("avx2,f16c"))) static void name##_avx2 params { name##_any args; }                \
    __attribute__((target(AVX512))) static void name##_avx512 params { name##_any args; }                   \
    static void name params {                                                                                 \
        static int level = -1;                                                                                \
        if (level < 0) level = cpu_level();                                                                   \
        (level == 2 ? name##_avx512 : level == 1 ? name##_avx2 : name##_default) args;                        \
    }
/* The widest version the CPU runs, or a narrower one named by SURGERY_KERNEL_ISA (default, avx2): how the
tests compare the versions on one machine. */
static int cpu_level(void) {
    int level = 0;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c"))
        level = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")
                && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") ? 2 : 1;
    const char *asked = getenv("SURGERY_KERNEL_ISA");
    if (asked != NULL && strcmp(asked, "default") == 0) return 0;
    if (asked != NULL && strcmp(asked, "avx2") == 0 && level > 1) return 1;
    return level;
}
#else
#define VERSIONED(name, params, args) static void name params { name##_any args; }
#endif

#define combine_body_any dispatch
VERSIONED(combine_body, (const formula *f, enum dtype t, char *out, enum dtype to, Py_ssize_t n), (f, t, out, to, n))

static int parse_dtype(const char *name, enum dtype *t, Py_ssize_t *size) {
    if (strcmp(name, "BF16") == 0) { *t = BF16; *size = 2; return 0; }
#ifdef HAVE_F16
    if (strcmp(name, "F16") == 0) { *t = F16; *size = 2; return 0; }
#endif
    if (strcmp(name, "F32") == 0) { *t = F32; *size = 4; return 0; }
    PyErr_Format(PyExc_ValueError, "merge kernel: dtype %s is not one this build computes", name);
    return -1;
}

/* The inputs (a tuple of buffers, at least `least`) as pointers, each of n elements of `size` bytes. */
static int get_inputs(PyObject *inputs, int least, Py_buffer *views, int *held, const char **in, Py_ssize_t size,
                      Py_ssize_t *n) {
    if (!PyTuple_Check(inputs) || PyTuple_GET_SIZE(inputs) > MAX_INPUTS || PyTuple_GET_SIZE(inputs) < least) {
        PyErr_SetString(PyExc_ValueError, "merge kernel: inputs must be a tuple of the base and the models' buffers");
        return -1;
    }
    for (int k = 0; k < PyTuple_GET_SIZE(inputs); k++) {
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(inputs, k), &views[k], PyBUF_SIMPLE) < 0) return -1;
        (*held)++;
        if (*n < 0) *n = views[k].len / size;
        if (views[k].len != *n * size) {
            PyErr_SetString(PyExc_ValueError, "merge kernel: the buffers hold different numbers of elements");
            return -1;
        }
        in[k] = views[k].buf;
    }
    return 0;
}

/* Zero-padded copies of elements [from, n) of each input (at most CHUNK of them), for a last pass over whole
vectors or chunks whose padding's results are dropped. */
static void padded_tail(const char *const *in, int count, Py_ssize_t from, Py_ssize_t n, Py_ssize_t size,
                        const char **tail) {
    static __thread char copies[MAX_INPUTS][4 * CHUNK];
    for (int k = 0; k < count; k++) {
        memset(copies[k], 0, sizeof copies[k]);
        memcpy(copies[k], in[k] + from * size, (n - from) * size);
        tail[k] = copies[k];
    }
}

static PyObject *combine(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer out;
    const char *out_name, *in_name;
    PyObject *inputs, *coefficients;
    int has_base, centered, zero_start;
    double divisor, factor;
    if (!PyArg_ParseTuple(args, "w*sOsOpppdd", &out, &out_name, &inputs, &in_name, &coefficients, &has_base,
                          &centered, &zero_start, &divisor, &factor))
        return NULL;
    Py_buffer views[MAX_INPUTS];
    int held = 0;
    PyObject *result = NULL;
    formula f = {.has_base = has_base, .centered = centered, .zero_start = zero_start, .divided = divisor != 0.0,
                 .scaled = factor != 1.0, .divisor = (float)divisor, .factor = (float)factor};
    enum dtype t, to;
    Py_ssize_t size, out_size, n = -1;
    if (parse_dtype(out_name, &to, &out_size) < 0 || parse_dtype(in_name, &t, &size) < 0) goto done;
    if (!PyTuple_Check(inputs) || !PyTuple_Check(coefficients)
        || PyTuple_GET_SIZE(coefficients) != PyTuple_GET_SIZE(inputs) - has_base) {
        PyErr_SetString(PyExc_ValueError, "combine: inputs must be a tuple of buffers, coefficients one per model");
        goto done;
    }
    if (get_inputs(inputs, has_base + 1, views, &held, f.in, size, &n) < 0) goto done;
    f.n_in = held;
    if (out.len != n * out_size) {
        PyErr_SetString(PyExc_ValueError, "combine: the output buffer holds another number of elements");
        goto done;
    }
    for (int k = 0; k < f.n_in - has_base; k++) {
        f.c[k] = (float)PyFloat_AsDouble(PyTuple_GET_ITEM(coefficients, k));
        if (PyErr_Occurred()) goto done;
    }
    Py_ssize_t whole = n / CHUNK * CHUNK;
    Py_BEGIN_ALLOW_THREADS
    combine_body(&f, t, out.buf, to, whole);
    if (whole < n) { /* the tail, through zero-padded copies */
        static __thread char tail_out[4 * CHUNK];
        formula tail = f;
        padded_tail(f.in, f.n_in, whole, n, size, tail.in);
        combine_body(&tail, t, tail_out, to, CHUNK);
        memcpy((char *)out.buf + whole * out_size, tail_out, (n - whole) * out_size);
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    for (int k = 0; k < held; k++) PyBuffer_Release(&views[k]);
    PyBuffer_Release(&out);
    return result;
}


/* ---- TIES -------------------------------------------------------------------------------------------------
The exact k-th largest |tau_t| = |m_t - b| of a tensor: magnitude_window (below) finds it in one pass where
a sample brackets it; elsewhere a radix select on its float32 bits, as surgery/compute/select.py does it:
magnitude_counts histograms the high 16 bits, then the low 16 bits of the entries in the bin that holds
the rank; nth_equal finds where the n-th entry equal to the cut sits. ties then makes the merge:
SparseMerge.__call__ (surgery/compute/sparse.py) operation for operation. */

#define BINS 65536
#define SPLIT 4 /* copies of each high histogram, lanes spread over them: runs of one bin do not wait on each other */
enum keep { KEEP_ALL, KEEP_NONE, KEEP_TOP, KEEP_BAND, KEEP_RANDOM, KEEP_DELLA };

INLINE uint32_t magnitude_bits1(const char *m, const char *b, enum dtype t, Py_ssize_t i) {
    float x = load(m, t, i)[0] - load(b, t, i)[0]; /* lane 0 of a vector load: callers keep 8 readable */
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u & 0x7fffffffu;
}

INLINE vu magnitude_bits(const char *m, const char *b, enum dtype t, Py_ssize_t i) {
    vf d = load(m, t, i) - load(b, t, i);
    vu u;
    memcpy(&u, &d, sizeof u);
    return u & 0x7fffffffu;
}

/* counts[model][bin] += entries of [0, n) whose magnitude's high 16 bits are `bin` (wanted -1), or whose
low 16 bits are `bin` among those whose high 16 bits are `wanted` (>= 0); wanted -2 skips the model. */
INLINE void magnitude_counts_body_any(const char *const *in, int models, enum dtype t, const long *wanted, uint32_t *counts,
                                 Py_ssize_t n) {
    for (int k = 0; k < models; k++) {
        if (wanted[k] == -2) continue;
        uint32_t *c = counts + (Py_ssize_t)k * SPLIT * BINS;
        const char *m = in[k + 1];
        Py_ssize_t i = 0;
        if (wanted[k] < 0) {
            for (; i + LANES <= n; i += LANES) {
                vu u = magnitude_bits(m, in[0], t, i) >> 16;
                for (int l = 0; l < LANES; l++) c[(l % SPLIT) * BINS + u[l]]++;
            }
            for (; i < n; i++) c[magnitude_bits1(m, in[0], t, i) >> 16]++;
        } else {
            const uint32_t high = (uint32_t)wanted[k];
            for (; i + LANES <= n; i += LANES) {
                vu u = magnitude_bits(m, in[0], t, i);
                vu in_bin = (u >> 16) == high;
                if (!memcmp(&in_bin, &(vu){0}, sizeof in_bin)) continue;
                for (int l = 0; l < LANES; l++) if (in_bin[l]) c[u[l] & 0xffffu]++;
            }
            for (; i < n; i++) {
                uint32_t u = magnitude_bits1(m, in[0], t, i);
                if (u >> 16 == high) c[u & 0xffffu]++;
            }
        }
    }
}
VERSIONED(magnitude_counts_body, (const char *const *in, int models, enum dtype t, const long *wanted,
                                  uint32_t *counts, Py_ssize_t n), (in, models, t, wanted, counts, n))

typedef struct {
    const char *in[MAX_INPUTS];
    int models, consensus, normalize, lam_scaled;
    int kind[MAX_INPUTS], rescaled[MAX_INPUTS];
    float value[MAX_INPUTS], high_value[MAX_INPUTS], weight[MAX_INPUTS], scale[MAX_INPUTS], divisor, lam;
    /* within the block: top keeps an entry equal to `value` below `limit`; a band keeps entries at or above
    (value, limit) and not at or above (high_value, high_limit), where at or above an equal entry means at or
    past the limit (ascending ranks, ties by position) */
    int32_t limit[MAX_INPUTS], high_limit[MAX_INPUTS];
    uint64_t key[MAX_INPUTS]; /* random: the stream (noise.py's stream_key) */
    uint32_t threshold[MAX_INPUTS]; /* random: kept where the noise's 24 bits are below it */
    /* della: rows of `row` entries, each kept where its noise is below offset + spread * rank / (row - 1), the
    masks made for the block before its pass (with LANES bytes of padding) */
    Py_ssize_t row[MAX_INPUTS];
    float spread[MAX_INPUTS], offset[MAX_INPUTS];
    uint8_t *mask[MAX_INPUTS];
    /* della's masks kept between passes as bits, model k's entry at tensor position p in bit p % 8 of byte
    k * packed_stride + p / 8: the L1 pass writes them (packing 1), the merge reads them (packing -1) */
    uint8_t *packed;
    Py_ssize_t packed_stride;
    int packing;
    int64_t start; /* the block's first position in its tensor */
} ties_formula;

INLINE vf ones_where(vi mask) { /* 1.0 where the mask is set, else 0.0: a bool tensor multiplied in, as torch does */
    vi bits = mask & 0x3f800000;
    vf out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

/* The noise of positions i .. i + 7 of the stream `key` (noise.py's uniform: SplitMix64 of key + (i + 1) *
golden, its top 24 bits). */
INLINE vq noise_lanes(uint64_t key, int64_t i) {
    const uint64_t golden = 0x9E3779B97F4A7C15ull; /* (i + 1 + l) * golden + key, mod 2^64: one product per vector */
    vq z = (vq){0, golden, 2 * golden, 3 * golden, 4 * golden, 5 * golden, 6 * golden, 7 * golden}
           + ((uint64_t)(i + 1) * golden + key);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z = z ^ (z >> 31);
    return z >> 40;
}

/* The entries a random trim keeps: those whose noise is below `threshold`. */
INLINE vi random_kept(uint64_t key, uint32_t threshold, int64_t i) {
    return __builtin_convertvector(noise_lanes(key, i) < threshold, vi);
}

INLINE vi at_or_above(vf magnitude, float value, vi index, int32_t limit) {
    return (magnitude > value) | ((magnitude == value) & (index >= limit));
}

/* tau_k as its trim leaves it (SparseMerge._trimmed): multiplied by its mask, as torch multiplies a bool mask. */
INLINE vf trimmed(const ties_formula *f, int k, vf tau, vi index, Py_ssize_t i) {
    const int kind = f->kind[k];
    if (kind == KEEP_ALL) return tau;
    if (kind == KEEP_NONE) return (vf){0};
    vi keep;
    if (kind == KEEP_RANDOM) {
        keep = random_kept(f->key[k], f->threshold[k], f->start + i);
    } else if (kind == KEEP_DELLA) {
        vb kept;
        memcpy(&kept, f->mask[k] + i, sizeof kept);
        keep = __builtin_convertvector(kept, vi) != 0;
    } else {
        vu u;
        memcpy(&u, &tau, sizeof u);
        u &= 0x7fffffffu;
        vf magnitude;
        memcpy(&magnitude, &u, sizeof magnitude);
        if (kind == KEEP_TOP)
            keep = (magnitude > f->value[k]) | ((magnitude == f->value[k]) & (index < f->limit[k]));
        else
            keep = at_or_above(magnitude, f->value[k], index, f->limit[k])
                   & ~at_or_above(magnitude, f->high_value[k], index, f->high_limit[k]);
    }
    return tau * ones_where(keep);
}

/* `models` is a constant (2 or 3, the common cases: everything stays in registers) or f->models. */
INLINE vf ties_lanes(const ties_formula *f, enum dtype t, Py_ssize_t i, const int models) {
    const vi index = (vi){0, 1, 2, 3, 4, 5, 6, 7} + (int32_t)i;
    vf b = load(f->in[0], t, i);
    vf delta[MAX_INPUTS];
    for (int k = 0; k < models; k++) {
        vf tau = trimmed(f, k, load(f->in[k + 1], t, i) - b, index, i);
        if (f->rescaled[k]) tau = tau * f->scale[k];
        delta[k] = tau * f->weight[k];
    }
    vf mixed, divisor;
    if (f->consensus) {
        vf sum = delta[0];
        for (int k = 1; k < models; k++) sum = sum + delta[k];
        vi positive = sum >= 0.0f;
        vf agree = ones_where(((delta[0] > 0.0f) & positive) | ((delta[0] < 0.0f) & ~positive));
        mixed = delta[0] * agree;
        divisor = f->weight[0] * agree;
        for (int k = 1; k < models; k++) {
            agree = ones_where(((delta[k] > 0.0f) & positive) | ((delta[k] < 0.0f) & ~positive));
            mixed = mixed + delta[k] * agree;
            divisor = divisor + f->weight[k] * agree;
        }
        vi zero = divisor == 0.0f;
        divisor = (vf)(((vi)divisor & ~zero) | (0x3f800000 & zero));
    } else {
        mixed = delta[0];
        for (int k = 1; k < models; k++) mixed = mixed + delta[k];
        divisor = (vf){0} + f->divisor;
    }
    if (f->normalize) mixed = mixed / divisor;
    if (f->lam_scaled) mixed = mixed * f->lam;
    return mixed + b;
}

/* The formula for the elements from `by` on (a tail's padded copy): limits and the stream's start move with it. */
static void shift_trims(ties_formula *f, Py_ssize_t by) {
    for (int k = 0; k < f->models; k++) {
        f->limit[k] -= (int32_t)by;
        f->high_limit[k] -= (int32_t)by;
        if (f->mask[k] != NULL) f->mask[k] += by;
    }
    f->start += by;
}

INLINE void ties_body_any(const ties_formula *f, enum dtype t, char *out, enum dtype to, Py_ssize_t n) {
#define LOOP(a, o, m) for (Py_ssize_t i = 0; i < n; i += LANES) store(out, o, i, ties_lanes(f, a, i, m))
#define CASE(a, o) if (t == a && to == o) { \
        if (f->models == 2) LOOP(a, o, 2); else if (f->models == 3) LOOP(a, o, 3); else LOOP(a, o, f->models); return; }
    CASE(BF16, BF16) CASE(BF16, F16) CASE(BF16, F32)
    CASE(F16, BF16) CASE(F16, F16) CASE(F16, F32)
    CASE(F32, BF16) CASE(F32, F16) CASE(F32, F32)
#undef CASE
#undef LOOP
}
VERSIONED(ties_body, (const ties_formula *f, enum dtype t, char *out, enum dtype to, Py_ssize_t n), (f, t, out, to, n))

static PyObject *magnitude_counts(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer counts, views[MAX_INPUTS];
    PyObject *inputs, *wanted_tuple, *result = NULL;
    const char *in_name, *in[MAX_INPUTS];
    int held = 0;
    long wanted[MAX_INPUTS];
    if (!PyArg_ParseTuple(args, "w*OsO", &counts, &inputs, &in_name, &wanted_tuple)) return NULL;
    enum dtype t;
    Py_ssize_t size, n = -1;
    uint32_t *scratch = NULL;
    if (parse_dtype(in_name, &t, &size) < 0 || get_inputs(inputs, 2, views, &held, in, size, &n) < 0) goto done;
    int models = held - 1;
    if (!PyTuple_Check(wanted_tuple) || PyTuple_GET_SIZE(wanted_tuple) != models
        || counts.len != (Py_ssize_t)models * BINS * (Py_ssize_t)sizeof(int64_t)) {
        PyErr_SetString(PyExc_ValueError, "magnitude_counts: one wanted bin and 65536 int64 counts per model");
        goto done;
    }
    for (int k = 0; k < models; k++) {
        wanted[k] = PyLong_AsLong(PyTuple_GET_ITEM(wanted_tuple, k));
        if (PyErr_Occurred()) goto done;
    }
    scratch = calloc((size_t)models * SPLIT * BINS, sizeof *scratch); /* 32 bits: a block holds under 2^32 entries */
    if (scratch == NULL) { PyErr_NoMemory(); goto done; }
    Py_BEGIN_ALLOW_THREADS
    /* whole vectors are read up to n rounded down; the lane-0 loads of the tail read 8 lanes, so the last 7
    entries go through a padded copy */
    Py_ssize_t safe = n > LANES ? n - LANES + 1 : 0;
    magnitude_counts_body(in, models, t, wanted, scratch, safe);
    if (safe < n) {
        const char *tail_in[MAX_INPUTS];
        padded_tail(in, models + 1, safe, n, size, tail_in);
        magnitude_counts_body(tail_in, models, t, wanted, scratch, n - safe);
    }
    int64_t *total = counts.buf;
    for (int k = 0; k < models; k++)
        for (int copy = 0; copy < SPLIT; copy++)
            for (Py_ssize_t j = 0; j < BINS; j++) total[(Py_ssize_t)k * BINS + j] += scratch[((Py_ssize_t)k * SPLIT + copy) * BINS + j];
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    free(scratch);
    for (int k = 0; k < held; k++) PyBuffer_Release(&views[k]);
    PyBuffer_Release(&counts);
    return result;
}

/* How many entries of [0, n) have |m - b| bits equal to `bits`, up to the nth (0-based), and where that one is. */
INLINE void nth_equal_body_any(const char *b, const char *m, enum dtype t, uint32_t bits, Py_ssize_t nth, Py_ssize_t n,
                               Py_ssize_t *count, Py_ssize_t *at) {
    Py_ssize_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        vi equal = (vi)(magnitude_bits(m, b, t, i) == bits);
        if (!memcmp(&equal, &(vi){0}, sizeof equal)) continue;
        for (int l = 0; l < LANES; l++)
            if (equal[l] && (*count)++ == nth) { *at = i + l; return; }
    }
    for (; i < n; i++) { /* the tail, element by element */
        float x, y;
        if (t == F32) { memcpy(&x, m + 4 * i, 4); memcpy(&y, b + 4 * i, 4); }
        else { char one[4 * LANES] = {0}, other[4 * LANES] = {0}; memcpy(one, m + 2 * i, 2); memcpy(other, b + 2 * i, 2);
               x = load(one, t, 0)[0]; y = load(other, t, 0)[0]; }
        float d = x - y;
        uint32_t u;
        memcpy(&u, &d, sizeof u);
        if ((u & 0x7fffffffu) == bits && (*count)++ == nth) { *at = i; return; }
    }
}
VERSIONED(nth_equal_body, (const char *b, const char *m, enum dtype t, uint32_t bits, Py_ssize_t nth, Py_ssize_t n,
                           Py_ssize_t *count, Py_ssize_t *at), (b, m, t, bits, nth, n, count, at))

static PyObject *nth_equal(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer views[MAX_INPUTS];
    PyObject *inputs;
    const char *in_name, *in[MAX_INPUTS];
    int held = 0, model;
    unsigned long value_bits;
    Py_ssize_t nth;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "Osikn", &inputs, &in_name, &model, &value_bits, &nth)) return NULL;
    enum dtype t;
    Py_ssize_t size, n = -1, count = 0, at = -1;
    if (parse_dtype(in_name, &t, &size) < 0 || get_inputs(inputs, 2, views, &held, in, size, &n) < 0) goto done;
    if (model < 0 || model >= held - 1) {
        PyErr_SetString(PyExc_ValueError, "nth_equal: no such model");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    nth_equal_body(in[0], in[model + 1], t, (uint32_t)value_bits, nth, n, &count, &at);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(nn)", count, at);
done:
    for (int k = 0; k < held; k++) PyBuffer_Release(&views[k]);
    return result;
}

/* ---- DELLA's masks -------------------------------------------------------------------------------------------
SparseMerge._della_probabilities and its random keep (surgery/compute/sparse.py): per row, the rank of each
|tau| in ascending order, ties by position (a stable LSD radix sort of the magnitudes' bits, every NaN
as one value, as torch's sort places them), its keep probability offset + spread * rank / (row - 1) in
float32, and the entry kept where its noise (noise.py) is below it. */

INLINE float load_one(const char *p, enum dtype t, Py_ssize_t i) {
    if (t == F32) { float x; memcpy(&x, p + 4 * i, 4); return x; }
    uint16_t h;
    memcpy(&h, p + 2 * i, 2);
#ifdef HAVE_F16
    if (t == F16) { _Float16 x; memcpy(&x, &h, 2); return (float)x; }
#endif
    uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, 4);
    return x;
}

/* noise_lanes' top 24 bits for one position. */
INLINE uint32_t noise_bits(uint64_t key, int64_t i) {
    uint64_t z = (uint64_t)(i + 1) * 0x9E3779B97F4A7C15ull + key;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (uint32_t)((z ^ (z >> 31)) >> 40);
}

/* Each row's magnitudes ranked by a stable LSD radix sort (three digits of 11 bits, their histograms from
one read of the keys; a digit one value throughout is skipped), every NaN as one value, as torch's stable
sort places them; each entry kept where its noise (made 8 positions at a time first) is below
rank / (row - 1) * spread + offset.
scratch: 5 * row uint32. */
#define DIGIT_BITS 11
static void della_mask_any(const char *b, const char *m, enum dtype t, Py_ssize_t n, Py_ssize_t row, uint64_t key,
                           float spread, float offset, int64_t start, uint8_t *mask, uint32_t *scratch) {
    uint32_t *keys = scratch, *order = scratch + row, *keys2 = scratch + 2 * row, *order2 = scratch + 3 * row;
    uint32_t *noise = scratch + 4 * row;
    const float last = (float)(row - 1);
    for (Py_ssize_t at = 0; at < n; at += row) {
        Py_ssize_t j = 0;
        for (; j + LANES <= row; j += LANES) {
            vu u = magnitude_bits(m, b, t, at + j);
            vi nan = (vi)(u > 0x7f800000u); /* every NaN as one value */
            u = (vu)(((vi)u & ~nan) | (nan & 0x7fc00000));
            memcpy(keys + j, &u, sizeof u);
            vu top = __builtin_convertvector(noise_lanes(key, start + at + j), vu);
            memcpy(noise + j, &top, sizeof top);
        }
        for (; j < row; j++) { /* one at a time: a vector load here could read past the block */
            float d = load_one(m, t, at + j) - load_one(b, t, at + j);
            uint32_t u;
            memcpy(&u, &d, 4);
            u &= 0x7fffffffu;
            keys[j] = u > 0x7f800000u ? 0x7fc00000u : u;
            noise[j] = noise_bits(key, start + at + j);
        }
        for (j = 0; j < row; j++) order[j] = (uint32_t)j;
        const uint32_t digits = 1u << DIGIT_BITS, low = digits - 1;
        uint32_t counts[3][(1 << DIGIT_BITS) + 1] = {{0}}; /* every digit's histogram from one read of the keys */
        for (j = 0; j < row; j++) {
            counts[0][(keys[j] & low) + 1]++;
            counts[1][((keys[j] >> DIGIT_BITS) & low) + 1]++;
            counts[2][((keys[j] >> 2 * DIGIT_BITS) & low) + 1]++;
        }
        for (int pass = 0; pass < 3; pass++) {
            const int shift = pass * DIGIT_BITS;
            uint32_t *count = counts[pass];
            if (count[((keys[0] >> shift) & low) + 1] == (uint32_t)row) continue; /* one digit throughout: in order */
            for (uint32_t d = 0; d < digits; d++) count[d + 1] += count[d];
            for (j = 0; j < row; j++) {
                uint32_t to = count[(keys[j] >> shift) & low]++;
                keys2[to] = keys[j];
                order2[to] = order[j];
            }
            uint32_t *swap = keys; keys = keys2; keys2 = swap;
            swap = order; order = order2; order2 = swap;
        }
        for (Py_ssize_t r = 0; r < row; r++) {
            Py_ssize_t at_j = order[r];
            float rank = row > 1 ? (float)r / last : 0.0f;
            float p = rank * spread + offset;
            mask[at + at_j] = (float)noise[at_j] * (1.0f / 16777216.0f) < p;
        }
    }
}
#undef DIGIT_BITS
VERSIONED(della_mask, (const char *b, const char *m, enum dtype t, Py_ssize_t n, Py_ssize_t row, uint64_t key,
                       float spread, float offset, int64_t start, uint8_t *mask, uint32_t *scratch),
          (b, m, t, n, row, key, spread, offset, start, mask, scratch))

/* The della models' masks for the formula's block of n entries (GIL released by the caller), ranked afresh
or unpacked from the bits an earlier pass kept; -1 when out of memory. */
static int della_masks(ties_formula *f, enum dtype t, Py_ssize_t n) {
    for (int k = 0; k < f->models; k++) {
        if (f->kind[k] != KEEP_DELLA) continue;
        f->mask[k] = calloc((size_t)n + LANES, 1);
        if (f->mask[k] == NULL) return -1;
        uint8_t *bits = f->packed == NULL ? NULL : f->packed + (Py_ssize_t)k * f->packed_stride;
        if (f->packing < 0) {
            for (Py_ssize_t i = 0; i < n; i++) f->mask[k][i] = (bits[(f->start + i) >> 3] >> ((f->start + i) & 7)) & 1;
            continue;
        }
        uint32_t *scratch = malloc(5 * sizeof(uint32_t) * (size_t)f->row[k]);
        if (scratch == NULL) return -1;
        della_mask(f->in[0], f->in[k + 1], t, n, f->row[k], f->key[k], f->spread[k], f->offset[k], f->start,
                   f->mask[k], scratch);
        free(scratch);
        if (f->packing > 0) /* bits outside the block untouched: a concurrent half writes only its own bytes */
            for (Py_ssize_t i = 0; i < n; i++)
                if (f->mask[k][i]) bits[(f->start + i) >> 3] |= (uint8_t)(1u << ((f->start + i) & 7));
    }
    return 0;
}

/* An optional buffer of della's packed masks (None: none kept): one stride of at least ceil(end / 8) bytes per
model, end the block's last position, read only unless `writable`. 0, or -1 with the error set. */
static int get_packed(PyObject *packed, int writable, ties_formula *f, Py_ssize_t n, Py_buffer *view) {
    if (packed == Py_None) return 0;
    if (PyObject_GetBuffer(packed, view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) return -1;
    f->packed = view->buf;
    f->packed_stride = view->len / f->models;
    f->packing = writable ? 1 : -1;
    if (f->packed_stride * f->models != view->len || f->packed_stride < (f->start + n + 7) / 8) {
        PyErr_SetString(PyExc_ValueError, "packed masks: one stride of ceil(entries / 8) bytes per model");
        PyBuffer_Release(view);
        f->packed = NULL;
        return -1;
    }
    return 0;
}

static void free_masks(ties_formula *f) {
    for (int k = 0; k < f->models; k++) { free(f->mask[k]); f->mask[k] = NULL; }
}

/* Each model's trim from its tuple (kind, value, position, high value, high position, key, threshold, row,
spread, offset), the positions made relative to the block (its first element at `start`) and clamped to it. */
static int parse_trims(PyObject *trims, ties_formula *f, Py_ssize_t n, long long start) {
    if (!PyTuple_Check(trims) || PyTuple_GET_SIZE(trims) != f->models) {
        PyErr_SetString(PyExc_ValueError, "merge kernel: one trim per model");
        return -1;
    }
    f->start = start;
    for (int k = 0; k < f->models; k++) {
        int kind;
        double value, high_value, spread, offset;
        long long limit, high_limit;
        unsigned long long key;
        unsigned long threshold;
        Py_ssize_t row;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(trims, k), "idLdLKkndd", &kind, &value, &limit, &high_value, &high_limit,
                              &key, &threshold, &row, &spread, &offset))
            return -1;
        if (kind < KEEP_ALL || kind > KEEP_DELLA) {
            PyErr_SetString(PyExc_ValueError, "merge kernel: no such trim");
            return -1;
        }
        if (kind == KEEP_DELLA && (row < 1 || n % row != 0 || start % row != 0)) {
            PyErr_SetString(PyExc_ValueError, "merge kernel: della's blocks must be whole rows");
            return -1;
        }
        f->row[k] = row;
        f->spread[k] = (float)spread;
        f->offset[k] = (float)offset;
        limit -= start;
        high_limit -= start;
        f->kind[k] = kind;
        f->value[k] = (float)value;
        f->high_value[k] = (float)high_value;
        f->limit[k] = (int32_t)(limit < 0 ? 0 : limit > n ? n : limit);
        f->high_limit[k] = (int32_t)(high_limit < 0 ? 0 : high_limit > n ? n : high_limit);
        f->key[k] = key;
        f->threshold[k] = (uint32_t)threshold;
    }
    return 0;
}

static PyObject *ties(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer out, views[MAX_INPUTS], packed_view;
    PyObject *inputs, *trims, *weights, *scales, *packed = Py_None, *result = NULL;
    const char *out_name, *in_name;
    int held = 0, consensus, normalize;
    double divisor, lam;
    long long start;
    if (!PyArg_ParseTuple(args, "w*sOsOOOppddL|O", &out, &out_name, &inputs, &in_name, &trims, &weights, &scales,
                          &consensus, &normalize, &divisor, &lam, &start, &packed))
        return NULL;
    ties_formula f = {.consensus = consensus, .normalize = normalize, .lam_scaled = lam != 1.0,
                      .divisor = (float)divisor, .lam = (float)lam};
    enum dtype t, to;
    Py_ssize_t size, out_size, n = -1;
    if (parse_dtype(out_name, &to, &out_size) < 0 || parse_dtype(in_name, &t, &size) < 0
        || get_inputs(inputs, 2, views, &held, f.in, size, &n) < 0)
        goto done;
    f.models = held - 1;
    if (!PyTuple_Check(weights) || PyTuple_GET_SIZE(weights) != f.models || !PyTuple_Check(scales)
        || PyTuple_GET_SIZE(scales) != f.models) {
        PyErr_SetString(PyExc_ValueError, "ties: weights and scales: one per model");
        goto done;
    }
    if (out.len != n * out_size) {
        PyErr_SetString(PyExc_ValueError, "ties: the output buffer holds another number of elements");
        goto done;
    }
    if (n > INT32_MAX - LANES) {
        PyErr_SetString(PyExc_ValueError, "ties: a block of more than 2^31 entries");
        goto done;
    }
    if (parse_trims(trims, &f, n, start) < 0 || get_packed(packed, 0, &f, n, &packed_view) < 0) goto done;
    for (int k = 0; k < f.models; k++) {
        f.weight[k] = (float)PyFloat_AsDouble(PyTuple_GET_ITEM(weights, k));
        double scale = PyFloat_AsDouble(PyTuple_GET_ITEM(scales, k));
        f.scale[k] = (float)scale;
        f.rescaled[k] = scale != 1.0;
        if (PyErr_Occurred()) goto done;
    }
    Py_ssize_t whole = n / LANES * LANES;
    int masked;
    Py_BEGIN_ALLOW_THREADS
    masked = della_masks(&f, t, n);
    if (masked == 0) {
        ties_body(&f, t, out.buf, to, whole);
        if (whole < n) { /* the tail, through zero-padded copies; the limits stay relative to the block's start */
            char tail_out[4 * LANES];
            ties_formula tail = f;
            padded_tail(f.in, f.models + 1, whole, n, size, tail.in);
            shift_trims(&tail, whole);
            ties_body(&tail, t, tail_out, to, LANES);
            memcpy((char *)out.buf + whole * out_size, tail_out, (n - whole) * out_size);
        }
    }
    Py_END_ALLOW_THREADS
    if (masked < 0) {
        PyErr_NoMemory();
        goto done;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    free_masks(&f);
    if (f.packed != NULL) PyBuffer_Release(&packed_view);
    for (int k = 0; k < held; k++) PyBuffer_Release(&views[k]);
    PyBuffer_Release(&out);
    return result;
}

/* ---- L1 norms of the task vectors, before and after their trims (SparseMerge._l1_norms), in double ---- */

INLINE vf magnitude_of(vf x) {
    vu u;
    memcpy(&u, &x, sizeof u);
    u &= 0x7fffffffu;
    vf out;
    memcpy(&out, &u, sizeof out);
    return out;
}

/* Adds x's 8 lanes, widened to double, to two 4-lane accumulators: AVX2's own width (GCC lowers an 8-double
vector through memory, ten times slower here). */
INLINE void add_widened(vd4 *sum, vf x) {
    sum[0] += __builtin_convertvector(__builtin_shufflevector(x, x, 0, 1, 2, 3), vd4);
    sum[1] += __builtin_convertvector(__builtin_shufflevector(x, x, 4, 5, 6, 7), vd4);
}

/* `models` is a constant (2 or 3) or f->models, as in ties_lanes: the base is read once for all models. */
INLINE void l1_lanes(const ties_formula *f, enum dtype t, Py_ssize_t i, vd4 *whole, vd4 *kept, const int models) {
    const vi index = (vi){0, 1, 2, 3, 4, 5, 6, 7} + (int32_t)i;
    vf b = load(f->in[0], t, i);
    for (int k = 0; k < models; k++) {
        vf tau = load(f->in[k + 1], t, i) - b;
        add_widened(whole + 2 * k, magnitude_of(tau));
        add_widened(kept + 2 * k, magnitude_of(trimmed(f, k, tau, index, i)));
    }
}

INLINE void l1_body_any(const ties_formula *f, enum dtype t, double *before, double *after, Py_ssize_t n) {
    vd4 whole[2 * MAX_INPUTS], kept[2 * MAX_INPUTS];
    for (int k = 0; k < 2 * f->models; k++) whole[k] = kept[k] = (vd4){0};
#define LOOP(m) for (Py_ssize_t i = 0; i < n; i += LANES) l1_lanes(f, t, i, whole, kept, m)
    if (f->models == 2) LOOP(2); else if (f->models == 3) LOOP(3); else LOOP(f->models);
#undef LOOP
    for (int k = 0; k < f->models; k++)
        for (int l = 0; l < 4; l++) {
            before[k] += whole[2 * k][l] + whole[2 * k + 1][l];
            after[k] += kept[2 * k][l] + kept[2 * k + 1][l];
        }
}
VERSIONED(l1_body, (const ties_formula *f, enum dtype t, double *before, double *after, Py_ssize_t n),
          (f, t, before, after, n))

static PyObject *l1_norms(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer views[MAX_INPUTS], packed_view;
    PyObject *inputs, *trims, *packed = Py_None, *result = NULL;
    const char *in_name;
    int held = 0;
    long long start;
    if (!PyArg_ParseTuple(args, "OsOL|O", &inputs, &in_name, &trims, &start, &packed)) return NULL;
    ties_formula f = {0};
    enum dtype t;
    Py_ssize_t size, n = -1;
    double before[MAX_INPUTS] = {0}, after[MAX_INPUTS] = {0};
    if (parse_dtype(in_name, &t, &size) < 0 || get_inputs(inputs, 2, views, &held, f.in, size, &n) < 0) goto done;
    f.models = held - 1;
    if (n > INT32_MAX - LANES) {
        PyErr_SetString(PyExc_ValueError, "l1_norms: a block of more than 2^31 entries");
        goto done;
    }
    if (parse_trims(trims, &f, n, start) < 0 || get_packed(packed, 1, &f, n, &packed_view) < 0) goto done;
    Py_ssize_t whole = n / LANES * LANES;
    int masked;
    Py_BEGIN_ALLOW_THREADS
    masked = della_masks(&f, t, n);
    if (masked == 0) {
        l1_body(&f, t, before, after, whole);
        if (whole < n) { /* zero-padded: the padding adds |0| to both */
            ties_formula tail = f;
            padded_tail(f.in, f.models + 1, whole, n, size, tail.in);
            shift_trims(&tail, whole);
            l1_body(&tail, t, before, after, LANES);
        }
    }
    Py_END_ALLOW_THREADS
    if (masked < 0) {
        PyErr_NoMemory();
        goto done;
    }
    result = PyTuple_New(f.models);
    for (int k = 0; result != NULL && k < f.models; k++)
        PyTuple_SET_ITEM(result, k, Py_BuildValue("(dd)", before[k], after[k]));
done:
    free_masks(&f);
    if (f.packed != NULL) PyBuffer_Release(&packed_view);
    for (int k = 0; k < held; k++) PyBuffer_Release(&views[k]);
    return result;
}

/* ---- the window of a cut ----------------------------------------------------------------------------------
One pass that places the k-th largest |tau_t| exactly when a sample has bracketed it: per model, how many
entries' magnitude bits lie above highs[k] (`above`), and every entry with lows[k] <= bits <= highs[k], its
bits and position (from `offset`), kept while `capacity` lasts (`collected` counts them all). With `every`
above 1 only one CHUNK of each `every` is read: the sample that sets the window. Comparisons, not a
histogram's scattered increments, so it runs at the speed of reading the inputs. */

typedef struct {
    uint32_t low[MAX_INPUTS], high[MAX_INPUTS];
    int64_t above[MAX_INPUTS], collected[MAX_INPUTS];
    uint32_t *bits;
    int64_t *positions;
    Py_ssize_t capacity, every, offset;
} window;

INLINE void keep_entry(window *w, int k, uint32_t u, Py_ssize_t at) {
    int64_t got = w->collected[k]++;
    if (got < w->capacity) {
        w->bits[(Py_ssize_t)k * w->capacity + got] = u;
        w->positions[(Py_ssize_t)k * w->capacity + got] = w->offset + at;
    }
}

INLINE void magnitude_window_body_any(const char *const *in, int models, enum dtype t, window *w, Py_ssize_t n) {
    for (Py_ssize_t c = 0; c < n; c += CHUNK * w->every) {
        const Py_ssize_t end = c + CHUNK < n ? c + CHUNK : n;
        for (int k = 0; k < models; k++) {
            const char *m = in[k + 1];
            const uint32_t low = w->low[k], high = w->high[k];
            vi over = {0};
            Py_ssize_t i = c;
            for (; i + LANES <= end; i += LANES) {
                vu u = magnitude_bits(m, in[0], t, i);
                over -= (vi)(u > high);
                vi inside = (vi)((u >= low) & (u <= high));
                if (!memcmp(&inside, &(vi){0}, sizeof inside)) continue;
                int64_t got = w->collected[k];
                if (got + LANES <= w->capacity) { /* branch-free: every lane written, the count moved past the kept */
                    uint32_t *bits = w->bits + (Py_ssize_t)k * w->capacity;
                    int64_t *positions = w->positions + (Py_ssize_t)k * w->capacity;
                    for (int l = 0; l < LANES; l++) {
                        bits[got] = u[l];
                        positions[got] = w->offset + i + l;
                        got -= inside[l];
                    }
                    w->collected[k] = got;
                } else {
                    for (int l = 0; l < LANES; l++) if (inside[l]) keep_entry(w, k, u[l], i + l);
                }
            }
            for (int l = 0; l < LANES; l++) w->above[k] += over[l];
            for (; i < end; i++) {
                uint32_t u = magnitude_bits1(m, in[0], t, i);
                w->above[k] += u > high;
                if (u >= low && u <= high) keep_entry(w, k, u, i);
            }
        }
    }
}
VERSIONED(magnitude_window_body, (const char *const *in, int models, enum dtype t, window *w, Py_ssize_t n),
          (in, models, t, w, n))

static PyObject *magnitude_window(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer bits, positions, views[MAX_INPUTS];
    PyObject *inputs, *lows, *highs, *result = NULL;
    const char *in_name, *in[MAX_INPUTS];
    int held = 0;
    Py_ssize_t every, offset;
    if (!PyArg_ParseTuple(args, "w*w*OsOOnn", &bits, &positions, &inputs, &in_name, &lows, &highs, &every, &offset))
        return NULL;
    enum dtype t;
    Py_ssize_t size, n = -1;
    window w = {.every = every, .offset = offset};
    if (parse_dtype(in_name, &t, &size) < 0 || get_inputs(inputs, 2, views, &held, in, size, &n) < 0) goto done;
    int models = held - 1;
    w.capacity = bits.len / ((Py_ssize_t)models * (Py_ssize_t)sizeof(uint32_t));
    if (!PyTuple_Check(lows) || !PyTuple_Check(highs) || PyTuple_GET_SIZE(lows) != models
        || PyTuple_GET_SIZE(highs) != models || every < 1
        || bits.len != w.capacity * models * (Py_ssize_t)sizeof(uint32_t)
        || positions.len != w.capacity * models * (Py_ssize_t)sizeof(int64_t)) {
        PyErr_SetString(PyExc_ValueError, "magnitude_window: a low and a high bound per model, capacity uint32 bits "
                                          "and int64 positions per model, every >= 1");
        goto done;
    }
    for (int k = 0; k < models; k++) {
        w.low[k] = (uint32_t)PyLong_AsUnsignedLong(PyTuple_GET_ITEM(lows, k));
        w.high[k] = (uint32_t)PyLong_AsUnsignedLong(PyTuple_GET_ITEM(highs, k));
        if (PyErr_Occurred()) goto done;
    }
    w.bits = bits.buf;
    w.positions = positions.buf;
    Py_BEGIN_ALLOW_THREADS
    /* as magnitude_counts: the last entries, whose lane-0 loads would read past the end, through a padded copy */
    Py_ssize_t safe = n > LANES ? n - LANES + 1 : 0;
    magnitude_window_body(in, models, t, &w, safe);
    if (safe < n) {
        const char *tail_in[MAX_INPUTS];
        padded_tail(in, models + 1, safe, n, size, tail_in);
        w.offset += safe;
        magnitude_window_body(tail_in, models, t, &w, n - safe);
    }
    Py_END_ALLOW_THREADS
    result = PyTuple_New(models);
    for (int k = 0; result != NULL && k < models; k++)
        PyTuple_SET_ITEM(result, k, Py_BuildValue("(LL)", (long long)w.above[k], (long long)w.collected[k]));
done:
    for (int k = 0; k < held; k++) PyBuffer_Release(&views[k]);
    PyBuffer_Release(&bits);
    PyBuffer_Release(&positions);
    return result;
}

/* ---- SCE -------------------------------------------------------------------------------------------------
SceMerge (surgery/compute/sce.py) operation for operation: each entry's variance over the models of tau_t =
m_t - b (population, summed left to right: mean = (tau_0 + tau_1 + ...) / T, var = ((tau_0 - mean)^2 + ...) / T),
the top of it kept (`before` a cut, as TIES' magnitudes), each kept model's energy, and the merge. */

INLINE vf variance_lanes(const char *const *in, int models, enum dtype t, Py_ssize_t i, vf *tau) {
    vf b = load(in[0], t, i), mean = {0}, var = {0};
    for (int k = 0; k < models; k++) {
        tau[k] = load(in[k + 1], t, i) - b;
        mean = k == 0 ? tau[k] : mean + tau[k];
    }
    mean = mean / (float)models;
    for (int k = 0; k < models; k++) {
        vf d = tau[k] - mean;
        var = k == 0 ? d * d : var + d * d;
    }
    return var / (float)models;
}

INLINE vu bits_of(vf x) {
    vu u;
    memcpy(&u, &x, sizeof u);
    return u;
}

/* variance_window: magnitude_window's pass for the variance (one stream), also counting its nonzero entries. */
INLINE void variance_window_body_any(const char *const *in, int models, enum dtype t, window *w, int64_t *nonzero,
                                     Py_ssize_t n) {
    vf tau[MAX_INPUTS];
    for (Py_ssize_t c = 0; c < n; c += CHUNK * w->every) {
        const Py_ssize_t end = c + CHUNK < n ? c + CHUNK : n;
        const uint32_t low = w->low[0], high = w->high[0];
        vi over = {0}, nonzeros = {0};
        Py_ssize_t i = c;
        for (; i + LANES <= end; i += LANES) {
            vu u = bits_of(variance_lanes(in, models, t, i, tau));
            over -= (vi)(u > high);
            nonzeros -= (vi)(u != 0);
            vi inside = (vi)((u >= low) & (u <= high));
            if (!memcmp(&inside, &(vi){0}, sizeof inside)) continue;
            for (int l = 0; l < LANES; l++) if (inside[l]) keep_entry(w, 0, u[l], i + l);
        }
        for (int l = 0; l < LANES; l++) { w->above[0] += over[l]; *nonzero += nonzeros[l]; }
        for (; i < end; i++) { /* lane 0 of a vector load: callers keep 8 readable */
            uint32_t u = bits_of(variance_lanes(in, models, t, i, tau))[0];
            w->above[0] += u > high;
            *nonzero += u != 0;
            if (u >= low && u <= high) keep_entry(w, 0, u, i);
        }
    }
}
VERSIONED(variance_window_body, (const char *const *in, int models, enum dtype t, window *w, int64_t *nonzero,
                                 Py_ssize_t n), (in, models, t, w, nonzero, n))

static PyObject *variance_window(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer bits, positions, views[MAX_INPUTS];
    PyObject *inputs, *result = NULL;
    const char *in_name, *in[MAX_INPUTS];
    int held = 0;
    unsigned long low, high;
    Py_ssize_t every, offset;
    if (!PyArg_ParseTuple(args, "w*w*Oskknn", &bits, &positions, &inputs, &in_name, &low, &high, &every, &offset))
        return NULL;
    enum dtype t;
    Py_ssize_t size, n = -1;
    int64_t nonzero = 0;
    window w = {.every = every, .offset = offset, .low = {(uint32_t)low}, .high = {(uint32_t)high},
                .bits = bits.buf, .positions = positions.buf};
    w.capacity = bits.len / (Py_ssize_t)sizeof(uint32_t);
    if (parse_dtype(in_name, &t, &size) < 0 || get_inputs(inputs, 2, views, &held, in, size, &n) < 0) goto done;
    if (every < 1 || positions.len != w.capacity * (Py_ssize_t)sizeof(int64_t)) {
        PyErr_SetString(PyExc_ValueError, "variance_window: as many uint32 bits as int64 positions, every >= 1");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t safe = n > LANES ? n - LANES + 1 : 0;
    variance_window_body(in, held - 1, t, &w, &nonzero, safe);
    if (safe < n) {
        const char *tail_in[MAX_INPUTS];
        padded_tail(in, held, safe, n, size, tail_in);
        w.offset += safe;
        variance_window_body(tail_in, held - 1, t, &w, &nonzero, n - safe);
    }
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("((LL),L)", (long long)w.above[0], (long long)w.collected[0], (long long)nonzero);
done:
    for (int k = 0; k < held; k++) PyBuffer_Release(&views[k]);
    PyBuffer_Release(&bits);
    PyBuffer_Release(&positions);
    return result;
}

typedef struct {
    const char *in[MAX_INPUTS];
    int models, keep, lam_scaled; /* keep: KEEP_ALL, KEEP_NONE or KEEP_TOP (below the cut) */
    float value, weight[MAX_INPUTS], lam;
    int32_t limit;
} sce_formula;

/* The task vectors as the selection leaves them: zero outside the kept entries. */
INLINE void sce_selected(const sce_formula *f, enum dtype t, Py_ssize_t i, vf *tau, const int models) {
    if (f->keep == KEEP_NONE) {
        for (int k = 0; k < models; k++) tau[k] = (vf){0};
        return;
    }
    vf var = variance_lanes(f->in, models, t, i, tau);
    if (f->keep == KEEP_TOP) {
        const vi index = (vi){0, 1, 2, 3, 4, 5, 6, 7} + (int32_t)i;
        vf kept = ones_where((var > f->value) | ((var == f->value) & (index < f->limit)));
        for (int k = 0; k < models; k++) tau[k] = tau[k] * kept;
    }
}

INLINE vf sce_lanes(const sce_formula *f, enum dtype t, Py_ssize_t i, const int models) {
    vf tau[MAX_INPUTS];
    sce_selected(f, t, i, tau, models);
    vf sum = tau[0];
    for (int k = 1; k < models; k++) sum = sum + tau[k];
    vi positive = sum >= 0.0f;
    vf mixed = {0}, total = {0};
    for (int k = 0; k < models; k++) {
        vf w = f->weight[k] * ones_where(((tau[k] > 0.0f) & positive) | ((tau[k] < 0.0f) & ~positive));
        mixed = k == 0 ? tau[k] * w : mixed + tau[k] * w;
        total = k == 0 ? w : total + w;
    }
    vi small = total < 1e-6f;
    total = (vf)(((vi)total & ~small) | ((vi)((vf){0} + 1e-6f) & small));
    mixed = mixed / total;
    if (f->lam_scaled) mixed = mixed * f->lam;
    return mixed + load(f->in[0], t, i);
}

INLINE void sce_body_any(const sce_formula *f, enum dtype t, char *out, enum dtype to, Py_ssize_t n) {
#define LOOP(a, o, m) for (Py_ssize_t i = 0; i < n; i += LANES) store(out, o, i, sce_lanes(f, a, i, m))
#define CASE(a, o) if (t == a && to == o) { \
        if (f->models == 2) LOOP(a, o, 2); else if (f->models == 3) LOOP(a, o, 3); else LOOP(a, o, f->models); return; }
    CASE(BF16, BF16) CASE(BF16, F16) CASE(BF16, F32)
    CASE(F16, BF16) CASE(F16, F16) CASE(F16, F32)
    CASE(F32, BF16) CASE(F32, F16) CASE(F32, F32)
#undef CASE
#undef LOOP
}
VERSIONED(sce_body, (const sce_formula *f, enum dtype t, char *out, enum dtype to, Py_ssize_t n), (f, t, out, to, n))

/* Per model, the sum of its selected task vector's squares (float32 squares added in double). */
INLINE void sce_energy_lanes(const sce_formula *f, enum dtype t, Py_ssize_t i, vd4 *sums, const int models) {
    vf tau[MAX_INPUTS];
    sce_selected(f, t, i, tau, models);
    for (int k = 0; k < models; k++) add_widened(sums + 2 * k, tau[k] * tau[k]);
}

INLINE void sce_energy_body_any(const sce_formula *f, enum dtype t, double *energy, Py_ssize_t n) {
    vd4 sums[2 * MAX_INPUTS];
    for (int k = 0; k < 2 * f->models; k++) sums[k] = (vd4){0};
#define LOOP(m) for (Py_ssize_t i = 0; i < n; i += LANES) sce_energy_lanes(f, t, i, sums, m)
    if (f->models == 2) LOOP(2); else if (f->models == 3) LOOP(3); else LOOP(f->models);
#undef LOOP
    for (int k = 0; k < f->models; k++)
        for (int l = 0; l < 4; l++) energy[k] += sums[2 * k][l] + sums[2 * k + 1][l];
}
VERSIONED(sce_energy_body, (const sce_formula *f, enum dtype t, double *energy, Py_ssize_t n), (f, t, energy, n))

/* The formula's inputs, keep and cut (the cut's position made relative to the block, clamped to it). */
static int sce_parse(PyObject *inputs, const char *in_name, int keep, double value, long long position,
                     long long start, sce_formula *f, Py_buffer *views, int *held, enum dtype *t, Py_ssize_t *size,
                     Py_ssize_t *n) {
    if (parse_dtype(in_name, t, size) < 0 || get_inputs(inputs, 2, views, held, f->in, *size, n) < 0) return -1;
    if ((keep != KEEP_ALL && keep != KEEP_NONE && keep != KEEP_TOP) || *n > INT32_MAX - LANES) {
        PyErr_SetString(PyExc_ValueError, "sce: keep all, none or the top, in a block of under 2^31 entries");
        return -1;
    }
    long long limit = position - start;
    f->models = *held - 1;
    f->keep = keep;
    f->value = (float)value;
    f->limit = (int32_t)(limit < 0 ? 0 : limit > *n ? *n : limit);
    return 0;
}

static PyObject *sce(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer out, views[MAX_INPUTS];
    PyObject *inputs, *weights, *result = NULL;
    const char *out_name, *in_name;
    int held = 0, keep;
    double value, lam;
    long long position, start;
    if (!PyArg_ParseTuple(args, "w*sOsidLOdL", &out, &out_name, &inputs, &in_name, &keep, &value, &position, &weights,
                          &lam, &start))
        return NULL;
    sce_formula f = {.lam_scaled = lam != 1.0, .lam = (float)lam};
    enum dtype t, to;
    Py_ssize_t size, out_size, n = -1;
    if (parse_dtype(out_name, &to, &out_size) < 0
        || sce_parse(inputs, in_name, keep, value, position, start, &f, views, &held, &t, &size, &n) < 0)
        goto done;
    if (!PyTuple_Check(weights) || PyTuple_GET_SIZE(weights) != f.models || out.len != n * out_size) {
        PyErr_SetString(PyExc_ValueError, "sce: one weight per model, an output of as many elements");
        goto done;
    }
    for (int k = 0; k < f.models; k++) {
        f.weight[k] = (float)PyFloat_AsDouble(PyTuple_GET_ITEM(weights, k));
        if (PyErr_Occurred()) goto done;
    }
    Py_ssize_t whole = n / LANES * LANES;
    Py_BEGIN_ALLOW_THREADS
    sce_body(&f, t, out.buf, to, whole);
    if (whole < n) {
        char tail_out[4 * LANES];
        sce_formula tail = f;
        padded_tail(f.in, f.models + 1, whole, n, size, tail.in);
        tail.limit -= (int32_t)whole;
        sce_body(&tail, t, tail_out, to, LANES);
        memcpy((char *)out.buf + whole * out_size, tail_out, (n - whole) * out_size);
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    for (int k = 0; k < held; k++) PyBuffer_Release(&views[k]);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *sce_energy(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer views[MAX_INPUTS];
    PyObject *inputs, *result = NULL;
    const char *in_name;
    int held = 0, keep;
    double value;
    long long position, start;
    if (!PyArg_ParseTuple(args, "OsidLL", &inputs, &in_name, &keep, &value, &position, &start)) return NULL;
    sce_formula f = {0};
    enum dtype t;
    Py_ssize_t size, n = -1;
    double energy[MAX_INPUTS] = {0};
    if (sce_parse(inputs, in_name, keep, value, position, start, &f, views, &held, &t, &size, &n) < 0) goto done;
    Py_ssize_t whole = n / LANES * LANES;
    Py_BEGIN_ALLOW_THREADS
    sce_energy_body(&f, t, energy, whole);
    if (whole < n) { /* zero-padded: the padding's task vectors are 0 */
        sce_formula tail = f;
        padded_tail(f.in, f.models + 1, whole, n, size, tail.in);
        tail.limit -= (int32_t)whole;
        sce_energy_body(&tail, t, energy, LANES);
    }
    Py_END_ALLOW_THREADS
    result = PyTuple_New(f.models);
    for (int k = 0; result != NULL && k < f.models; k++) PyTuple_SET_ITEM(result, k, PyFloat_FromDouble(energy[k]));
done:
    for (int k = 0; k < held; k++) PyBuffer_Release(&views[k]);
    return result;
}

INLINE void f16_infinities_body_any(const uint16_t *u, Py_ssize_t n, Py_ssize_t *found) {
    Py_ssize_t i = 0, total = 0;
    for (; i + 4096 <= n; i += 4096) { /* 16-bit lane counts, added up before they could overflow */
        vh count = {0};
        for (Py_ssize_t j = i; j < i + 4096; j += LANES) {
            vh x;
            memcpy(&x, u + j, sizeof x);
            count -= (vh)((x & 0x7fffu) == 0x7c00u);
        }
        for (int l = 0; l < LANES; l++) total += count[l];
    }
    for (; i < n; i++) total += (u[i] & 0x7fffu) == 0x7c00u;
    *found = total;
}
VERSIONED(f16_infinities_body, (const uint16_t *u, Py_ssize_t n, Py_ssize_t *found), (u, n, found))

/* How many float16 entries of a buffer are +-inf: a pass written in float16 checks it found none it did not read. */
static PyObject *f16_infinities(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer buffer;
    if (!PyArg_ParseTuple(args, "y*", &buffer)) return NULL;
    const uint16_t *u = buffer.buf;
    Py_ssize_t n = buffer.len / 2, found = 0;
    Py_BEGIN_ALLOW_THREADS
    f16_infinities_body(u, n, &found);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buffer);
    return PyLong_FromSsize_t(found);
}

static PyObject *isa(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(args)) {
#if defined(__GNUC__) && defined(__x86_64__)
    static const char *names[] = {"default", "avx2", "avx512"};
    return PyUnicode_FromString(names[cpu_level()]);
#else
    return PyUnicode_FromString("default");
#endif
}

static PyMethodDef methods[] = {
    {"f16_infinities", f16_infinities, METH_VARARGS, "f16_infinities(buffer) -> how many float16 entries are +-inf"},
    {"isa", isa, METH_NOARGS, "isa() -> the version of the kernels this process runs: default, avx2 or avx512"},
    {"combine", combine, METH_VARARGS,
     "combine(out, out_dtype, inputs, dtype, coefficients, has_base, centered, zero_start, divisor, factor)"},
    {"magnitude_counts", magnitude_counts, METH_VARARGS, "magnitude_counts(counts, inputs, dtype, wanted)"},
    {"magnitude_window", magnitude_window, METH_VARARGS,
     "magnitude_window(bits, positions, inputs, dtype, lows, highs, every, offset) -> ((above, collected), ...)"},
    {"nth_equal", nth_equal, METH_VARARGS, "nth_equal(inputs, dtype, model, value_bits, nth) -> (count, at)"},
    {"ties", ties, METH_VARARGS,
     "ties(out, out_dtype, inputs, dtype, trims, weights, scales, consensus, normalize, divisor, lam, start[, packed])"},
    {"variance_window", variance_window, METH_VARARGS,
     "variance_window(bits, positions, inputs, dtype, low, high, every, offset) -> ((above, collected), nonzero)"},
    {"sce", sce, METH_VARARGS, "sce(out, out_dtype, inputs, dtype, keep, value, position, weights, lam, start)"},
    {"sce_energy", sce_energy, METH_VARARGS, "sce_energy(inputs, dtype, keep, value, position, start) -> energies"},
    {"l1_norms", l1_norms, METH_VARARGS, "l1_norms(inputs, dtype, trims, start[, packed]) -> ((before, after), ...); della's masks kept in packed"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_combine", .m_doc = "Fused weighted sums of tensors.", .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__combine(void) { return PyModule_Create(&module); }
