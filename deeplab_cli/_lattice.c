/* A permutohedral lattice built on the CPU, for permutohedral.py's build_lattice: each point's enclosing simplex
 * and barycentric weights (the float32 arithmetic of pydensecrf's Permutohedral::init, operation by operation,
 * as permutohedral.py's torch version does), its vertices' packed keys, the vertices numbered in the order
 * the points first reach them (as pydensecrf's hash table numbers them) with one hash table (open
 * addressing, linear probing), the splat entries grouped by vertex, each vertex's blur neighbours, and one
 * channel filtered through the lattice.
 *
 * Plain C (POSIX threads for the neighbours' search), no Python API, loaded by native.py with ctypes. The
 * functions that allocate say when memory ran out (−1 or NULL); the caller then builds with torch.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The simplices must come out as pydensecrf's float32 arithmetic makes them: no fused multiply-adds. */
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#define MAX_D 16

typedef struct {
    int64_t *keys;      /* (capacity,) −1: empty */
    int32_t *ids;       /* (capacity,) */
    int64_t capacity;   /* a power of two, at least twice the vertices */
    int64_t count;      /* vertices */
    int64_t *by_id;     /* (room,) each vertex's key */
    int64_t room;
} Hash;

static uint64_t slot_of(int64_t key, int64_t capacity) {
    return ((uint64_t)key * 0x9E3779B97F4A7C15ull) >> (64 - __builtin_ctzll((uint64_t)capacity));
}

static int grow(Hash *h) {
    const int64_t capacity = h->capacity * 2;
    int64_t *keys = malloc(sizeof(int64_t) * (size_t)capacity);
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)capacity);
    if (!keys || !ids) {
        free(keys), free(ids);
        return -1;
    }
    memset(keys, 0xff, sizeof(int64_t) * (size_t)capacity);
    for (int64_t i = 0; i < h->capacity; i++) {
        if (h->keys[i] < 0) continue;
        uint64_t s = slot_of(h->keys[i], capacity);
        while (keys[s] >= 0) s = (s + 1) & (uint64_t)(capacity - 1);
        keys[s] = h->keys[i], ids[s] = h->ids[i];
    }
    free(h->keys), free(h->ids);
    h->keys = keys, h->ids = ids, h->capacity = capacity;
    return 0;
}

static int32_t find(const Hash *h, int64_t key) {
    for (uint64_t s = slot_of(key, h->capacity);; s = (s + 1) & (uint64_t)(h->capacity - 1)) {
        if (h->keys[s] == key) return h->ids[s];
        if (h->keys[s] < 0) return -1;
    }
}

void deeplab_lattice_free(Hash *h) {
    if (!h) return;
    free(h->keys), free(h->ids), free(h->by_id), free(h);
}

/* keys (count,) ≥ 0, point-major: vertex_of[i] = the number of key i's vertex, numbered in order of first
 * appearance; *vertices = how many. Returns the table for deeplab_lattice_neighbours, or NULL (no memory). */
Hash *deeplab_lattice_number(const int64_t *keys, int64_t count, int32_t *vertex_of, int64_t *vertices) {
    Hash *h = calloc(1, sizeof(Hash));
    if (!h) return NULL;
    h->capacity = 1 << 10; /* doubled by grow() before the first insertion */
    h->keys = malloc(sizeof(int64_t) * (size_t)h->capacity);
    h->ids = malloc(sizeof(int32_t) * (size_t)h->capacity);
    h->room = 1 << 12;
    h->by_id = malloc(sizeof(int64_t) * (size_t)h->room);
    if (!h->keys || !h->ids || !h->by_id) goto fail;
    memset(h->keys, 0xff, sizeof(int64_t) * (size_t)h->capacity);
    for (int64_t i = 0; i < count; i++) {
        const int64_t key = keys[i];
        uint64_t s = slot_of(key, h->capacity);
        while (h->keys[s] >= 0 && h->keys[s] != key) s = (s + 1) & (uint64_t)(h->capacity - 1);
        if (h->keys[s] == key) {
            vertex_of[i] = h->ids[s];
            continue;
        }
        if (h->count == h->room) {
            int64_t *by_id = realloc(h->by_id, sizeof(int64_t) * (size_t)(h->room * 2));
            if (!by_id) goto fail;
            h->by_id = by_id, h->room *= 2;
        }
        h->keys[s] = key, h->ids[s] = (int32_t)h->count, h->by_id[h->count] = key;
        vertex_of[i] = (int32_t)h->count++;
        if (2 * h->count > h->capacity && grow(h) != 0) goto fail;
    }
    *vertices = h->count;
    return h;
fail:
    deeplab_lattice_free(h);
    return NULL;
}

/* Each vertex's blur neighbours along direction j < d + 1 that are vertices: those of vertex v are
 * index[j·2m + bounds[j·(m+1) + v] …] up to bounds[j·(m+1) + v + 1], its neighbour − first (every coordinate −1
 * except coordinate j, +d), then its neighbour +; sizes[j] = how many in all. Keys are
 * (… + Σ_c strides[c]·coordinate_c)·(d+1) + r with coordinates in units of d+1 (strides[d] = 0: the packing
 * leaves the last coordinate out), so neighbour −'s key is key + (d+1)·strides[j] − 1 from r ≥ 1 and
 * key + d + (d+1)·(strides[j] − Σ strides) from r = 0; vertex v is neighbour + of its neighbour −. */
typedef struct {
    const Hash *h;
    int d1, first, step; /* this thread's directions: first, first + step, … */
    const int64_t *strides;
    int32_t *bounds, *index;
    int64_t *sizes;
    int failed;
    pthread_t thread;
} NeighbourPart;

static void *neighbour_part(void *arg) {
    NeighbourPart *t = arg;
    const Hash *h = t->h;
    const int64_t m = h->count;
    const int d1 = t->d1;
    int32_t *minus = malloc(sizeof(int32_t) * (size_t)(m + 1)), *plus = malloc(sizeof(int32_t) * (size_t)(m + 1));
    if (!minus || !plus) {
        free(minus), free(plus);
        t->failed = 1;
        return NULL;
    }
    int64_t total = 0;
    for (int j = 0; j < d1; j++) total += t->strides[j];
    for (int j = t->first; j < d1; j += t->step) {
        for (int64_t v = 0; v < m; v++) plus[v] = -1;
        for (int64_t v = 0; v < m; v++) {
            const int64_t key = h->by_id[v];
            minus[v] = find(h, key + (key % d1 ? d1 * t->strides[j] - 1 : (d1 - 1) + d1 * (t->strides[j] - total)));
            if (minus[v] >= 0) plus[minus[v]] = (int32_t)v;
        }
        int32_t *b = t->bounds + j * (m + 1), *at = t->index + j * 2 * m, k = 0;
        b[0] = 0;
        for (int64_t v = 0; v < m; v++) {
            if (minus[v] >= 0) at[k++] = minus[v];
            if (plus[v] >= 0) at[k++] = plus[v];
            b[v + 1] = k;
        }
        t->sizes[j] = k;
    }
    free(minus), free(plus);
    return NULL;
}

/* The directions split between up to `threads` threads (those that cannot start: done here); −1: no memory. */
int deeplab_lattice_neighbours(const Hash *h, int d1, const int64_t *strides, int32_t *bounds, int32_t *index,
                               int64_t *sizes, int threads) {
    threads = threads < 1 ? 1 : threads > d1 ? d1 : threads > 16 ? 16 : threads;
    if (h->count < 8192) threads = 1;
    NeighbourPart parts[16];
    for (int t = 0; t < threads; t++) parts[t] = (NeighbourPart){h, d1, t, threads, strides, bounds, index, sizes, 0, 0};
    int started = 1;
    for (int t = 1; t < threads; t++, started++)
        if (pthread_create(&parts[t].thread, NULL, neighbour_part, &parts[t]) != 0) break;
    for (int t = started; t < threads; t++) neighbour_part(&parts[t]);
    neighbour_part(&parts[0]);
    for (int t = 1; t < started; t++) pthread_join(parts[t].thread, NULL);
    for (int t = 0; t < threads; t++)
        if (parts[t].failed) return -1;
    return 0;
}

/* The entries grouped by vertex, in entry order within a vertex (a counting sort): entries of vertex v are
 * order[bounds[v] .. bounds[v + 1]). */
int deeplab_lattice_group(const int32_t *vertex_of, int64_t count, int64_t vertices, int32_t *bounds,
                          int32_t *order) {
    int32_t *next = malloc(sizeof(int32_t) * (size_t)(vertices + 1));
    if (!next) return -1;
    memset(bounds, 0, sizeof(int32_t) * (size_t)(vertices + 1));
    for (int64_t i = 0; i < count; i++) bounds[vertex_of[i] + 1]++;
    for (int64_t v = 0; v < vertices; v++) bounds[v + 1] += bounds[v];
    memcpy(next, bounds, sizeof(int32_t) * (size_t)(vertices + 1));
    for (int64_t i = 0; i < count; i++) order[next[vertex_of[i]]++] = (int32_t)i;
    free(next);
    return 0;
}

/* One channel through a lattice, as permutohedral.py's Lattice.filter computes it: out[i] =
 * Σ_r slice_weights[i·d1 + r]·B(S(values))[vertices[i·d1 + r]], S the splat (each point's value times its
 * scale, or 1 where scale is NULL, spread on its vertices by barycentric weight, points in order) and B the
 * blur along the d1 directions (neighbours as deeplab_lattice_neighbours gives them). For the normalisation and
 * the softmax shift: one value per point, where torch's gathers spend most of their time on overhead. One
 * thread: splitting it measured twice as slow (per-thread tables, thread starts per step). −1: no memory. */
int deeplab_lattice_filter(int64_t n, int d1, int64_t m, const float *values, const int32_t *vertices,
                           const float *bary, const float *scale, const int32_t *const *blur_index,
                           const int32_t *const *blur_bounds, const float *slice_weights, float *out) {
    float *a = calloc((size_t)(m + 1), sizeof(float)), *b = malloc(sizeof(float) * (size_t)(m + 1));
    if (!a || !b) {
        free(a), free(b);
        return -1;
    }
    for (int64_t i = 0; i < n; i++) {
        const float value = scale ? values[i] * scale[i] : values[i];
        for (int r = 0; r < d1; r++) a[vertices[i * d1 + r]] += bary[i * d1 + r] * value;
    }
    for (int j = 0; j < d1; j++) {
        const int32_t *index = blur_index[j], *bounds = blur_bounds[j];
        for (int64_t v = 0; v < m; v++) {
            float sum = 0.0f;
            for (int32_t e = bounds[v]; e < bounds[v + 1]; e++) sum += a[index[e]];
            b[v] = a[v] + 0.5f * sum;
        }
        float *t = a;
        a = b, b = t;
    }
    for (int64_t i = 0; i < n; i++) {
        float sum = 0.0f;
        for (int r = 0; r < d1; r++) sum += slice_weights[i * d1 + r] * a[vertices[i * d1 + r]];
        out[i] = sum;
    }
    free(a), free(b);
    return 0;
}

/* Each point's enclosing simplex, point-major (permutohedral._enclosing_simplices, the torch version, says what
 * each step is): features (n, d) → zero (n, d) its 0-coloured vertex in units of d+1, place (n, d+1) each
 * coordinate's place in the decreasing order of the residuals, bary (n, d+1) the barycentric weights; lo/hi
 * (d,) the least and largest zero of each coordinate. scale (d,) and down = 1/(d+1) as float32, as the
 * caller computes them. −1 if d > MAX_D. One thread: split between two it measured slower inside the CRF (torch's
 * OpenMP threads still spin on the other core right after its operations). */
int deeplab_lattice_simplices(const float *features, int64_t n, int d, const float *scale, float down,
                              int32_t *zero, uint8_t *place, float *bary, int32_t *lo, int32_t *hi) {
    const int d1 = d + 1;
    if (d > MAX_D) return -1;
    for (int c = 0; c < d; c++) lo[c] = INT32_MAX, hi[c] = INT32_MIN;
    for (int64_t i = 0; i < n; i++) {
        const float *f = features + i * d;
        float elevated[MAX_D + 1], rem0[MAX_D + 1], res[MAX_D + 1], by_place[MAX_D + 1], v[MAX_D + 1];
        float sm = 0.0f;
        for (int j = d; j > 0; j--) {
            const float cf = f[j - 1] * scale[j - 1];
            const float cfj = cf * (float)j;
            elevated[j] = sm - cfj;
            sm = sm + cf;
        }
        elevated[0] = sm;
        int total = 0;
        for (int j = 0; j < d1; j++) {
            const float scaled = elevated[j] * down;
            /* Ties to even: the 1.5·2²³ trick is rintf (without a libm call) below 2²², where rounding is exact. */
            v[j] = fabsf(scaled) < 4194304.0f ? (scaled + 12582912.0f) - 12582912.0f : rintf(scaled);
            rem0[j] = v[j] * (float)d1;
            total += (int)v[j];
            res[j] = elevated[j] - rem0[j];
        }
        int rank[MAX_D + 1];
        for (int j = 0; j < d1; j++) rank[j] = j;
        for (int a = 0; a < d1; a++)
            for (int b = a + 1; b < d1; b++) {
                const int smaller = res[a] < res[b]; /* no branch: these comparisons are coin flips */
                rank[a] += smaller, rank[b] -= smaller;
            }
        uint8_t *pl = place + i * d1;
        for (int j = 0; j < d1; j++) {
            int r = rank[j] + total;
            const int wrap = (r < 0) - (r > d);
            r += wrap * d1;
            pl[j] = (uint8_t)(d - r);
            const float wrapped = rem0[j] + (float)wrap * (float)d1;
            const float residual = elevated[j] - wrapped;
            by_place[d - r] = residual * down;
            if (j < d) {
                const int32_t z = (int32_t)v[j] + wrap;
                zero[i * d + j] = z;
                lo[j] = z < lo[j] ? z : lo[j];
                hi[j] = z > hi[j] ? z : hi[j];
            }
        }
        float *w = bary + i * d1;
        for (int k = 1; k < d1; k++) w[k] = by_place[k] - by_place[k - 1];
        const float one_minus = 1.0f - by_place[d];
        w[0] = by_place[0] + one_minus;
    }
    return 0;
}

/* The d+1 simplex vertices' packed keys, point-major (permutohedral._vertex_keys says how): zero (n, d) as
 * deeplab_lattice_simplices gives it, offset by −lo; image (n,) each point's image. */
void deeplab_lattice_keys(const int32_t *zero, const uint8_t *place, const int64_t *image, int64_t n, int d,
                          const int64_t *lo, const int64_t *strides, int64_t image_stride, int64_t *keys) {
    const int d1 = d + 1;
    for (int64_t i = 0; i < n; i++) {
        int64_t key = image[i] * image_stride, stride_at[MAX_D + 1];
        for (int c = 0; c < d; c++) key += strides[c] * ((int64_t)zero[i * d + c] - lo[c]);
        for (int c = 0; c < d1; c++) stride_at[place[i * d1 + c]] = c < d ? strides[c] : 0;
        key *= d1;
        keys[i * d1] = key;
        for (int r = 1; r < d1; r++) keys[i * d1 + r] = key += 1 - d1 * stride_at[r - 1];
    }
}
