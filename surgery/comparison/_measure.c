/* One pass over two tensors' raw bytes: the sums `surgery diff` reports, without the GIL.

numpy needs nine passes over memory for the same numbers (decode each side in two, subtract, three
dots, max, min); fused, a pair of weights costs about what reading it costs. Optional: without a C
compiler the package falls back to numpy (surgery/comparison/stats.py), with the same results to float32
rounding.

measure(a, a_dtype, b, b_dtype, atol, rtol) -> (diff_sq, a_sq, dot_ad, max_abs, within)
  a, b      buffers of the same number of elements; dtype "BF16" or "F32"
  diff_sq   sum (b - a)^2        a_sq  sum a^2        dot_ad  sum a (b - a)
  max_abs   max |b - a| (NaN when any difference is NaN)
  within    every |b - a| <= atol + rtol |a|
Sums are taken in float32 over chunks of CHUNK elements (each lane's partial sum spans 128
products) and added in float64. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define LANES 8
#define UNROLL 2 /* independent accumulator chains, so additions overlap instead of waiting on each other */
#define STEP (LANES * UNROLL)
#define CHUNK 2048

typedef float vf __attribute__((vector_size(4 * LANES)));
typedef uint32_t vu __attribute__((vector_size(4 * LANES)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));
typedef uint16_t vh __attribute__((vector_size(2 * LANES)));

enum dtype { BF16, F32 };

typedef struct {
    double diff_sq, a_sq, dot_ad;
    int32_t max_bits; /* of |b - a|: non-negative floats' bit patterns order like their values, NaN last */
    int within;
} sums;

#define INLINE static inline __attribute__((always_inline))

INLINE void load(const char *p, enum dtype t, Py_ssize_t i, vf *out) {
    if (t == BF16) { /* bfloat16 is the high half of a float32 */
        vh h;
        memcpy(&h, p + 2 * i, sizeof h);
        vu u = __builtin_convertvector(h, vu) << 16;
        memcpy(out, &u, sizeof *out);
    } else {
        memcpy(out, p + 4 * i, sizeof *out);
    }
}

INLINE float hsum(const vf *v) {
    float s = 0.0f;
    for (int k = 0; k < LANES; k++) s += (*v)[k];
    return s;
}

/* Elements [0, n) with n a multiple of STEP. `tolerant` is a constant at each call: without a
tolerance, "within" is just max |b - a| == 0 and the per-element test is left out. */
INLINE void accumulate(const char *a, enum dtype ta, const char *b, enum dtype tb, Py_ssize_t n,
                       int tolerant, float atol, float rtol, sums *s) {
    const vi abs_mask = (vi){0} + 0x7fffffff;
    vi max_bits[UNROLL] = {{0}}, outside[UNROLL] = {{0}};
    for (Py_ssize_t chunk = 0; chunk < n; chunk += CHUNK) {
        Py_ssize_t end = chunk + CHUNK < n ? chunk + CHUNK : n;
        vf dd[UNROLL] = {{0}}, aa[UNROLL] = {{0}}, ad[UNROLL] = {{0}};
        for (Py_ssize_t i = chunk; i < end; i += STEP) {
            for (int u = 0; u < UNROLL; u++) {
                vf x, y;
                load(a, ta, i + u * LANES, &x);
                load(b, tb, i + u * LANES, &y);
                vf d = y - x;
                dd[u] += d * d;
                aa[u] += x * x;
                ad[u] += x * d;
                vi d_bits;
                memcpy(&d_bits, &d, sizeof d);
                d_bits &= abs_mask;
                vi larger = d_bits > max_bits[u];
                max_bits[u] = (larger & d_bits) | (~larger & max_bits[u]);
                if (tolerant) {
                    vi x_bits;
                    memcpy(&x_bits, &x, sizeof x);
                    x_bits &= abs_mask;
                    vf abs_d, abs_x;
                    memcpy(&abs_d, &d_bits, sizeof d_bits);
                    memcpy(&abs_x, &x_bits, sizeof x_bits);
                    outside[u] |= ~(abs_d <= atol + rtol * abs_x); /* NaN compares false: outside */
                }
            }
        }
        for (int u = 0; u < UNROLL; u++) {
            s->diff_sq += hsum(&dd[u]);
            s->a_sq += hsum(&aa[u]);
            s->dot_ad += hsum(&ad[u]);
        }
    }
    for (int u = 0; u < UNROLL; u++) {
        for (int k = 0; k < LANES; k++) {
            if (max_bits[u][k] > s->max_bits) s->max_bits = max_bits[u][k];
            if (outside[u][k]) s->within = 0;
        }
    }
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define CLONES __attribute__((target_clones("avx2", "default"))) /* picked at load time by the CPU */
#else
#define CLONES
#endif

INLINE void with_tolerance(const char *a, enum dtype ta, const char *b, enum dtype tb, Py_ssize_t n,
                           float atol, float rtol, sums *s) {
    if (atol != 0.0f || rtol != 0.0f) accumulate(a, ta, b, tb, n, 1, atol, rtol, s);
    else accumulate(a, ta, b, tb, n, 0, 0.0f, 0.0f, s);
}

/* One specialised loop per dtype pair and tolerance use: the tests fold away. */
CLONES static void measure_body(const char *a, enum dtype ta, const char *b, enum dtype tb, Py_ssize_t n,
                                float atol, float rtol, sums *s) {
    if (ta == BF16 && tb == BF16) with_tolerance(a, BF16, b, BF16, n, atol, rtol, s);
    else if (ta == BF16) with_tolerance(a, BF16, b, F32, n, atol, rtol, s);
    else if (tb == BF16) with_tolerance(a, F32, b, BF16, n, atol, rtol, s);
    else with_tolerance(a, F32, b, F32, n, atol, rtol, s);
}

static int parse_dtype(const char *name, enum dtype *t, Py_ssize_t *size) {
    if (strcmp(name, "BF16") == 0) { *t = BF16; *size = 2; return 0; }
    if (strcmp(name, "F32") == 0) { *t = F32; *size = 4; return 0; }
    PyErr_Format(PyExc_ValueError, "measure: dtype %s is not BF16 or F32", name);
    return -1;
}

static PyObject *measure(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer a, b;
    const char *a_name, *b_name;
    double atol, rtol;
    if (!PyArg_ParseTuple(args, "y*sy*sdd", &a, &a_name, &b, &b_name, &atol, &rtol)) return NULL;
    PyObject *result = NULL;
    enum dtype ta, tb;
    Py_ssize_t sa, sb;
    if (parse_dtype(a_name, &ta, &sa) < 0 || parse_dtype(b_name, &tb, &sb) < 0) goto done;
    if (a.len % sa || b.len % sb || a.len / sa != b.len / sb) {
        PyErr_SetString(PyExc_ValueError, "measure: the buffers hold different numbers of elements");
        goto done;
    }
    Py_ssize_t n = a.len / sa, body = n / STEP * STEP;
    sums s = {0.0, 0.0, 0.0, 0, 1};
    Py_BEGIN_ALLOW_THREADS
    measure_body(a.buf, ta, b.buf, tb, body, (float)atol, (float)rtol, &s);
    if (body < n) { /* the tail, zero-padded: zeros add nothing and are within any tolerance */
        char tail_a[4 * STEP] = {0}, tail_b[4 * STEP] = {0};
        memcpy(tail_a, (const char *)a.buf + body * sa, (n - body) * sa);
        memcpy(tail_b, (const char *)b.buf + body * sb, (n - body) * sb);
        measure_body(tail_a, ta, tail_b, tb, STEP, (float)atol, (float)rtol, &s);
    }
    Py_END_ALLOW_THREADS
    if (atol == 0.0 && rtol == 0.0) s.within = s.max_bits == 0;
    float max_abs;
    memcpy(&max_abs, &s.max_bits, sizeof max_abs);
    result = Py_BuildValue("(ddddO)", s.diff_sq, s.a_sq, s.dot_ad, (double)max_abs, s.within ? Py_True : Py_False);
done:
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return result;
}

static PyMethodDef methods[] = {
    {"measure", measure, METH_VARARGS, "measure(a, a_dtype, b, b_dtype, atol, rtol) -> (diff_sq, a_sq, dot_ad, max_abs, within)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_measure", .m_doc = "Fused tensor-difference sums.", .m_size = -1, .m_methods = methods,
};

PyMODINIT_FUNC PyInit__measure(void) { return PyModule_Create(&module); }
