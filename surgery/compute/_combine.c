/* One pass over a merge's inputs: a weighted sum of tensors, read in their stored dtype, computed in
float32 and written in the output's dtype, without the GIL.

The torch path (surgery/compute/updates.py, sphere.py) makes about eight passes over memory per block
for the same numbers (decode each input, subtract, scale, add, encode); fused, a merge costs about
what reading its inputs costs. The arithmetic is that path's, operation for operation and in the same
order (compiled with -ffp-contract=off, so no multiply-add is fused), so both give the same bits.
Optional: without a C compiler the torch path runs.

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
#include <string.h>

#define LANES 8
#define MAX_INPUTS 64

typedef float vf __attribute__((vector_size(4 * LANES)));
typedef uint32_t vu __attribute__((vector_size(4 * LANES)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));
typedef uint16_t vh __attribute__((vector_size(2 * LANES)));
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

/* Each entry point is compiled twice, plain and for AVX2 with F16C's conversions, and picked by the CPU's
features at run time (not target_clones' "arch=", which picks by CPU model). */
#if defined(__GNUC__) && defined(__x86_64__)
#define VERSIONED(name, params, args)                                                                         \
    static void name##_default params { name##_any args; }                                                  \
    __attribute__((target("avx2,f16c"))) static void name##_avx2 params { name##_any args; }                \
    static void name params {                                                                                 \
        static int avx2 = -1;                                                                                 \
        if (avx2 < 0) avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");                \
        (avx2 ? name##_avx2 : name##_default) args;                                                           \
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
    Py_ssize_t size, out_size;
    if (parse_dtype(out_name, &to, &out_size) < 0 || parse_dtype(in_name, &t, &size) < 0) goto done;
    if (!PyTuple_Check(inputs) || !PyTuple_Check(coefficients) || PyTuple_GET_SIZE(inputs) > MAX_INPUTS
        || PyTuple_GET_SIZE(inputs) <= has_base
        || PyTuple_GET_SIZE(coefficients) != PyTuple_GET_SIZE(inputs) - has_base) {
        PyErr_SetString(PyExc_ValueError, "combine: inputs must be a tuple of buffers, coefficients one per model");
        goto done;
    }
    f.n_in = (int)PyTuple_GET_SIZE(inputs);
    if (out.len % out_size) {
        PyErr_SetString(PyExc_ValueError, "combine: the output buffer is not a whole number of elements");
        goto done;
    }
    Py_ssize_t n = out.len / out_size;
    for (int k = 0; k < f.n_in - has_base; k++) {
        f.c[k] = (float)PyFloat_AsDouble(PyTuple_GET_ITEM(coefficients, k));
        if (PyErr_Occurred()) goto done;
    }
    for (int k = 0; k < f.n_in; k++) {
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(inputs, k), &views[k], PyBUF_SIMPLE) < 0) goto done;
        held++;
        if (views[k].len != n * size) {
            PyErr_SetString(PyExc_ValueError, "combine: the buffers hold different numbers of elements");
            goto done;
        }
        f.in[k] = views[k].buf;
    }
    Py_ssize_t whole = n / CHUNK * CHUNK;
    Py_BEGIN_ALLOW_THREADS
    combine_body(&f, t, out.buf, to, whole);
    if (whole < n) { /* the tail, through zero-padded copies */
        static __thread char tail_in[MAX_INPUTS][4 * CHUNK], tail_out[4 * CHUNK];
        formula tail = f;
        for (int k = 0; k < f.n_in; k++) {
            memset(tail_in[k], 0, sizeof tail_in[k]);
            memcpy(tail_in[k], f.in[k] + whole * size, (n - whole) * size);
            tail.in[k] = tail_in[k];
        }
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


static PyMethodDef methods[] = {
    {"combine", combine, METH_VARARGS,
     "combine(out, out_dtype, inputs, dtype, coefficients, has_base, centered, zero_start, divisor, factor)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_combine", .m_doc = "Fused weighted sums of tensors.", .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__combine(void) { return PyModule_Create(&module); }
