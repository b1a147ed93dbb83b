/* The dense CRF's mean-field iterations on the CPU, on the lattices permutohedral.py builds: the iterations of
 * meanfield.py's torch loop reorganised so that each iteration reads the point lists once. Per iteration:
 *   1. blur each lattice along its d+1 directions, v + ½·(n₋ + n₊), absent neighbours counting 0, the first
 *      direction reading the threads' splat tables, added up into thread 0's first;
 *   2. per point: slice its simplex vertices, add the unary, softmax in base 2, and (before the last
 *      iteration) splat the new Q straight back into this thread's table, cleared first, for the next one;
 *      before the first iteration the same without messages gives Q₀ = softmax(log p).
 * The splat is a scatter from each point to its vertices (the slice's own index and weights, rescaled per
 * kernel), so Q is never stored until the end, label-major (the caller's layout). POSIX threads share each
 * pass (see `take`) and meet at a barrier between passes.
 *
 * Plain C (GNU vector extensions, no Python API), loaded by native.py with ctypes, which releases the GIL for
 * the call; the data layout is native.py's `Problem`. Lattice rows are whole vector blocks (16 + 8 floats for
 * 21 labels; the padding lanes stay 0). The results differ from the torch loop's by float rounding only:
 * other summation orders, and exp2 as a polynomial (relative error < 1e-7; 0 below 2⁻¹²⁶·⁵).
 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_WIDE 4 /* labels per row ≤ 16·MAX_WIDE (meanfield.py uses the torch loop beyond) */
#define MAX_KERNELS 4
#define MAX_DIRECTIONS 8

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
/* One build for every x86-64 CPU; the loader picks the widest vector code the CPU runs. */
#define VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VECTOR_CLONES
#endif
#define INLINE static inline __attribute__((always_inline))
#pragma GCC diagnostic ignored "-Wpsabi" /* vectors only pass between inlined functions */

typedef struct {
    int64_t n, c, rows, stride; /* points, labels, lattice rows (all kernels), floats per row (native.row_stride) */
    int32_t kernels, slice_size, iterations, exact;    /* exact: subtract each row's maximum before exp2 */
    int64_t m[MAX_KERNELS];                            /* lattice vertices of each kernel */
    int64_t row[MAX_KERNELS];                          /* each kernel's first row in the tables */
    int32_t d1[MAX_KERNELS];                           /* blur directions (= simplex vertices per point) */
    const int32_t *blur_index[MAX_KERNELS][MAX_DIRECTIONS];   /* present neighbours, − before + */
    const int32_t *blur_bounds[MAX_KERNELS][MAX_DIRECTIONS];  /* (m + 1,) where each vertex's neighbours start */
    const int32_t *slice_index;                        /* (n, slice_size) each point's vertex rows, all kernels */
    const float *slice_weights;                        /* (n, slice_size) their slice weights */
    const float *splat_scale;                          /* (slice_size,) splat weight / slice weight per slot */
    const float *unary;                                /* (n, c) log₂ p, shifted; ≥ stride − c floats after */
    float *out;                                        /* (c, n) Q after the last iteration */
    float *table, *spare;                              /* (rows, stride) each: the blur's ping-pong */
    float *splats;                                     /* (threads, rows, stride) each thread's splat */
} Problem;

/* A pass's items (points or lattice rows) are split into one contiguous region per thread; a thread takes
 * chunks from the front of its own region, then from the back of the others' (a static split left one
 * thread waiting ~15 % of the time; chunks dealt out in turn were slower still: neighbouring pixels, which
 * share lattice vertices, ended up in different threads' caches and splat tables). */
#define CHUNK 1024

typedef struct {
    atomic_int waiting, phase;
    int threads;
    atomic_ullong *regions; /* (threads,) each region's first and end item, 32 bits each */
} Barrier;

/* Splits [0, total) into the threads' regions. */
static void deal(Barrier *b, int64_t total) {
    for (int r = 0; r < b->threads; r++)
        atomic_store(&b->regions[r], (uint64_t)(total * r / b->threads) << 32 | (uint64_t)(total * (r + 1) / b->threads));
}

/* Waits for every thread; the last to arrive deals the next pass's `total` items before releasing them. */
static void barrier_wait(Barrier *b, int64_t total) {
    int phase = atomic_load(&b->phase);
    if (atomic_fetch_sub(&b->waiting, 1) == 1) {
        deal(b, total);
        atomic_store(&b->waiting, b->threads);
        atomic_store(&b->phase, phase + 1);
        return;
    }
    for (int spins = 0; atomic_load(&b->phase) == phase; spins++)
        if (spins > 2000) sched_yield(); /* more threads than free cores: let the others run */
}

/* Takes the next chunk for thread `id` into [*lo, *hi): 0 once none is left anywhere. */
static int take(Barrier *b, int id, int64_t *lo, int64_t *hi) {
    for (int k = 0; k < b->threads; k++) {
        atomic_ullong *region = &b->regions[(id + k) % b->threads];
        unsigned long long seen = atomic_load(region);
        for (;;) {
            const int64_t first = (int64_t)(seen >> 32), end = (int64_t)(seen & 0xffffffffu);
            if (first >= end) break;
            int64_t l = first, h = first + CHUNK < end ? first + CHUNK : end; /* own region: from the front */
            if (k > 0) l = end - CHUNK > first ? end - CHUNK : first, h = end; /* another's: from the back */
            const unsigned long long left = k == 0 ? (uint64_t)h << 32 | (uint64_t)end : (uint64_t)first << 32 | (uint64_t)l;
            if (atomic_compare_exchange_weak(region, &seen, left)) {
                *lo = l, *hi = h;
                return 1;
            }
        }
    }
    return 0;
}

typedef struct {
    atomic_int go; /* set once the team is known */
    int size;
    Barrier barrier;
} Team;

typedef struct {
    const Problem *p;
    Team *team;
    int id;
} Worker;



/* A lattice row of c labels is `wide` blocks of 16 floats and, where c needs it, a `narrow` block of 8 (21
 * labels: 16 + 8), in GNU C vectors: one AVX-512 register per wide block, one AVX2 register per narrow one
 * (two or four SSE2 registers on older CPUs). Padding lanes stay 0 in the tables; rows of Q and the unary are
 * read as whole blocks too, past the row's end, and those lanes are masked. */
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));
typedef float u16 __attribute__((vector_size(64), aligned(4), may_alias)); /* unaligned access */
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
typedef float u8 __attribute__((vector_size(32), aligned(4), may_alias));
typedef float v4 __attribute__((vector_size(16)));

INLINE v16 load16(const float *at) { return *(const u16 *)at; }
INLINE v8 load8(const float *at) { return *(const u8 *)at; }
INLINE void save16(float *at, v16 v) { *(u16 *)at = v; }
INLINE void save8(float *at, v8 v) { *(u8 *)at = v; }
INLINE v16 pick16(i16 mask, v16 yes, v16 no) { return (v16)((mask & (i16)yes) | (~mask & (i16)no)); }
INLINE v8 pick8(i8 mask, v8 yes, v8 no) { return (v8)((mask & (i8)yes) | (~mask & (i8)no)); }

INLINE v8 fold16(v16 v) { /* lanes l and l + 8 added: a register extract, not memory */
    v8 a, b;
    memcpy(&a, &v, sizeof a);
    memcpy(&b, (const char *)&v + sizeof a, sizeof b);
    return a + b;
}

INLINE float sum8(v8 v) {
    v4 a, b;
    memcpy(&a, &v, sizeof a);
    memcpy(&b, (const char *)&v + sizeof a, sizeof b);
    a += b;
    return (a[0] + a[2]) + (a[1] + a[3]);
}

INLINE float max8(v8 v) {
    float m = v[0];
    for (int l = 1; l < 8; l++) m = v[l] > m ? v[l] : m;
    return m;
}

/* 2^x: 0 below −126.5; Taylor series of e^(f·ln 2) to degree 7 on f ∈ [−½, ½] (truncation < 6e-9). */
#define EXP2(V, I, PICK)                                                                               \
    x = PICK(x < (V){0} - 127.0f, (V){0} - 127.0f, x);                                                 \
    x = PICK(x > (V){0} + 127.0f, (V){0} + 127.0f, x);                                                 \
    const V r = (x + 12582912.0f) - 12582912.0f; /* nearest integer (the 1.5·2²³ trick) */           \
    const V f = x - r;                                                                                 \
    V y = (V){0} + 1.525273380405984e-05f;                                                             \
    y = y * f + 1.5403530393381606e-04f;                                                               \
    y = y * f + 1.3333558146428443e-03f;                                                               \
    y = y * f + 9.618129107628477e-03f;                                                                \
    y = y * f + 5.550410866482158e-02f;                                                                \
    y = y * f + 2.402265069591007e-01f;                                                                \
    y = y * f + 6.931471805599453e-01f;                                                                \
    y = y * f + 1.0f;                                                                                  \
    return y * (V)((__builtin_convertvector(r, I) + 127) << 23); /* 2^r; r = −127 gives +0 */
INLINE v16 exp16(v16 x) { EXP2(v16, i16, pick16) }
INLINE v8 exp8(v8 x) { EXP2(v8, i8, pick8) }
#undef EXP2

/* A row's values while a point is processed: wide blocks, then the narrow one (if any). */
typedef struct {
    v16 w[MAX_WIDE];
    v8 n;
} Row;

/* Adds weight·row to the table row at `at`. */
INLINE void add_to(float *at, float weight, const Row *x, int wide, int narrow) {
    for (int b = 0; b < wide; b++) save16(at + 16 * b, load16(at + 16 * b) + weight * x->w[b]);
    if (narrow) save8(at + 16 * wide, load8(at + 16 * wide) + weight * x->n);
}

/* x += weight·(the row at `at`). */
INLINE void add_from(Row *x, float weight, const float *at, int wide, int narrow) {
    for (int b = 0; b < wide; b++) x->w[b] += weight * load16(at + 16 * b);
    if (narrow) x->n += weight * load8(at + 16 * wide);
}

INLINE void load_row(Row *x, const float *at, int wide, int narrow) {
    for (int b = 0; b < wide; b++) x->w[b] = load16(at + 16 * b);
    if (narrow) x->n = load8(at + 16 * wide);
}

/* Lanes past the c labels set to `fill`. */
INLINE void mask_row(Row *x, int64_t c, int wide, int narrow, float fill) {
    if (narrow) {
        i8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
        x->n = pick8(lane < (i8){0} + (int32_t)(c - 16 * wide), x->n, (v8){0} + fill);
    } else {
        i16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
        x->w[wide - 1] = pick16(lane < (i16){0} + (int32_t)(c - 16 * (wide - 1)), x->w[wide - 1], (v16){0} + fill);
    }
}

/* Adds w[j]·scale[j]·x to this thread's splat rows index[j], j < s. */
INLINE void scatter(float *restrict splats, int64_t stride, const int32_t *restrict index, const float *restrict w,
                    const float *restrict scale, int64_t s, const Row *x, int wide, int narrow) {
    for (int64_t j = 0; j < s; j++) add_to(splats + (int64_t)index[j] * stride, w[j] * scale[j], x, wide, narrow);
}

/* Step 2 for points [p0, p1): the new Q, splatted (last = 0) or stored (last = 1). Before the first iteration
 * (messages = 0) the same without messages: Q₀ = softmax(log p), splatted. */
INLINE void update_points(const Problem *p, float *restrict splats, int64_t p0, int64_t p1, int messages, int last,
                          int wide, int narrow) {
    const int64_t c = p->c, s = p->slice_size, stride = p->stride;
    Row x;
    for (int64_t n = p0; n < p1; n++) {
        const int32_t *restrict index = p->slice_index + n * s;
        const float *restrict w = p->slice_weights + n * s;
        load_row(&x, p->unary + n * c, wide, narrow);
        for (int64_t j = 0; j < s && messages; j++) add_from(&x, w[j], p->table + (int64_t)index[j] * stride, wide, narrow);
        mask_row(&x, c, wide, narrow, -3.0e38f); /* padding: below every label's logit, and exp2 gives 0 */
        if (p->exact) {
            float top = narrow ? max8(x.n) : -3.0e38f;
            for (int b = 0; b < wide; b++)
                for (int l = 0; l < 16; l++) top = x.w[b][l] > top ? x.w[b][l] : top;
            for (int b = 0; b < wide; b++) x.w[b] -= top;
            if (narrow) x.n -= top;
        }
        v8 sum = {0};
        for (int b = 0; b < wide; b++) sum += fold16(x.w[b] = exp16(x.w[b]));
        if (narrow) sum += x.n = exp8(x.n);
        const float inverse = 1.0f / sum8(sum);
        for (int b = 0; b < wide; b++) x.w[b] *= inverse;
        if (narrow) x.n *= inverse;
        if (!last) {
            scatter(splats, stride, index, w, p->splat_scale, s, &x, wide, narrow);
            continue;
        }
        float row[16 * MAX_WIDE + 8];
        for (int b = 0; b < wide; b++) save16(row + 16 * b, x.w[b]);
        if (narrow) save8(row + 16 * wide, x.n);
        for (int64_t l = 0; l < c; l++) p->out[l * p->n + n] = row[l]; /* label-major: the caller's layout */
    }
}

/* The point steps with the block counts as constants (rows stay in registers). */
VECTOR_CLONES
static void points_step(const Problem *p, float *splats, int64_t p0, int64_t p1, int initial, int last) {
    const int wide = (int)(p->stride / 16), narrow = (int)(p->stride % 16 != 0);
    switch ((wide * 2 + narrow) * 3 + (initial ? 2 : last)) {
#define CASE(W, N)                                                                                 \
    case (W * 2 + N) * 3: update_points(p, splats, p0, p1, 1, 0, W, N); break;                    \
    case (W * 2 + N) * 3 + 1: update_points(p, splats, p0, p1, 1, 1, W, N); break;                \
    case (W * 2 + N) * 3 + 2: update_points(p, splats, p0, p1, 0, 0, W, N); break;
        CASE(0, 1) CASE(1, 0) CASE(1, 1) CASE(2, 0) CASE(2, 1) CASE(3, 0) CASE(3, 1) CASE(4, 0)
#undef CASE
    }
}

/* Step 1, one direction: out[v] = in[v] + ½·(n₋ + n₊) for vertices [v0, v1), absent neighbours counting 0. */
VECTOR_CLONES
static void blur(const int32_t *restrict index, const int32_t *restrict bounds, const float *restrict in,
                 float *restrict out, int64_t stride, int64_t v0, int64_t v1) {
    const int64_t wide = stride / 16 * 16;
    for (int64_t v = v0; v < v1; v++) {
        const int32_t e = bounds[v], count = bounds[v + 1] - e;
        const float *n0 = in + (int64_t)index[count > 0 ? e : 0] * stride, *n1 = in + (int64_t)index[count > 1 ? e + 1 : 0] * stride;
        for (int64_t i = 0; i < wide; i += 16) {
            v16 sum = {0};
            if (count > 0) sum += load16(n0 + i);
            if (count > 1) sum += load16(n1 + i);
            save16(out + v * stride + i, load16(in + v * stride + i) + 0.5f * sum);
        }
        if (wide < stride) {
            v8 sum = {0};
            if (count > 0) sum += load8(n0 + wide);
            if (count > 1) sum += load8(n1 + wide);
            save8(out + v * stride + wide, load8(in + v * stride + wide) + 0.5f * sum);
        }
    }
}

/* The other threads' splats added into thread 0's, floats [from, to) (multiples of 8) of each table: in order,
 * where the first blur direction would read them at random. */
VECTOR_CLONES
static void add_splats(float *restrict splats, int threads, int64_t plane, int64_t from, int64_t to) {
    int64_t i = from;
    for (; i + 16 <= to; i += 16) {
        v16 sum = load16(splats + i);
        for (int t = 1; t < threads; t++) sum += load16(splats + t * plane + i);
        save16(splats + i, sum);
    }
    for (; i < to; i += 8) {
        v8 sum = load8(splats + i);
        for (int t = 1; t < threads; t++) sum += load8(splats + t * plane + i);
        save8(splats + i, sum);
    }
}

static void *run(void *arg) {
    const Worker *w = arg;
    const Problem *p = w->p;
    while (!atomic_load(&w->team->go)) sched_yield();
    const int threads = w->team->size;
    Barrier *barrier = &w->team->barrier;
    const int64_t plane = p->rows * p->stride;
    float *splats = p->splats + w->id * plane;
    int64_t lo, hi;
    int max_d1 = 0;
    for (int k = 0; k < p->kernels; k++) max_d1 = p->d1[k] > max_d1 ? p->d1[k] : max_d1;
    memset(splats, 0, sizeof(float) * (size_t)plane); /* only this thread writes it until the first barrier */
    while (take(barrier, w->id, &lo, &hi)) points_step(p, splats, lo, hi, 1, 0);
    for (int it = 0; it < p->iterations; it++) {
        if (threads > 1) {
            barrier_wait(barrier, p->rows);
            while (take(barrier, w->id, &lo, &hi)) add_splats(p->splats, threads, plane, lo * p->stride, hi * p->stride);
        }
        for (int j = 0; j < max_d1; j++) {
            barrier_wait(barrier, p->rows);
            /* Kernels' vertices numbered one after the other: a chunk may span both. */
            while (take(barrier, w->id, &lo, &hi))
                for (int k = 0; k < p->kernels; k++) {
                    const int64_t v0 = lo > p->row[k] ? lo - p->row[k] : 0;
                    const int64_t v1 = hi - p->row[k] < p->m[k] ? hi - p->row[k] : p->m[k];
                    if (j >= p->d1[k] || v0 >= v1) continue;
                    /* Directions alternate between spare and table so that the last one ends in the table. */
                    const int64_t at = p->row[k] * p->stride;
                    float *to = ((p->d1[k] - 1 - j) % 2 ? p->spare : p->table) + at;
                    const float *from = j == 0 ? p->splats + at : ((p->d1[k] - j) % 2 ? p->spare : p->table) + at;
                    blur(p->blur_index[k][j], p->blur_bounds[k][j], from, to, p->stride, v0, v1);
                }
        }
        barrier_wait(barrier, p->n);
        memset(splats, 0, sizeof(float) * (size_t)plane); /* every thread has read it: clear for the next splat */
        while (take(barrier, w->id, &lo, &hi)) points_step(p, splats, lo, hi, 0, it == p->iterations - 1);
    }
    return NULL;
}

/* Runs p->iterations mean-field iterations on `threads` threads (fewer if some cannot start): 0 when done,
 * −1 when memory for the team was not available (q is then untouched). */
int deeplab_mean_field(const Problem *p, int threads) {
    if (threads < 1) threads = 1;
    Worker *workers = calloc((size_t)threads, sizeof(Worker));
    pthread_t *ids = calloc((size_t)threads, sizeof(pthread_t));
    atomic_ullong *regions = calloc((size_t)threads, sizeof(atomic_ullong));
    if (!workers || !ids || !regions) {
        free(workers), free(ids), free(regions);
        return -1;
    }
    Team team = {.size = 1};
    atomic_init(&team.go, 0);
    team.barrier.regions = regions;
    for (int t = 0; t < threads; t++) workers[t] = (Worker){p, &team, t};
    /* The team is whoever started: threads wait for `go` and only then read its size. */
    while (team.size < threads && pthread_create(&ids[team.size], NULL, run, &workers[team.size]) == 0) team.size++;
    team.barrier.threads = team.size;
    atomic_init(&team.barrier.waiting, team.size);
    atomic_init(&team.barrier.phase, 0);
    deal(&team.barrier, p->n); /* the first pass: Q₀'s splat */
    atomic_store(&team.go, 1);
    run(&workers[0]);
    for (int t = 1; t < team.size; t++) pthread_join(ids[t], NULL);
    free(workers), free(ids), free(regions);
    return 0;
}
