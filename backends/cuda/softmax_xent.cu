// Fused softmax cross-entropy: loss and gradient in one pass over the logits.
//
// Each row of the logits (N rows of C classes, C-contiguous) is handled by one group of
// threads that holds the whole row on chip, in registers, between the read and the
// write: every logit is read from memory once and every gradient written once.
//
//   VARIANT 0  one warp per row            (short rows)
//   VARIANT 1  one block per row           (rows up to BLOCK * ITEMS * VEC classes)
//   VARIANT 2  one cluster of CLUSTER blocks per row, the blocks exchanging their
//              partial max/sum through distributed shared memory (sm_90 and newer)
//   VARIANT 3  fallback for rows that fit in none of the above (or on GPUs without
//              clusters): one block per row and an online softmax (running max and
//              rescaled sum) over a first read, then a second read of the row to write
//              the gradient. Three memory passes instead of two; the second read often
//              hits L2 because the block re-reads the row it has just streamed.
//
// Specialisation, all through -DNAME=VALUE compile options (defaults below):
//   LOGIT_KIND   storage of logits, gradient and per-row loss: 0 float32, 1 float16,
//                2 bfloat16 (16-bit kinds are moved as raw bits, converted here)
//   LABEL_KIND   0 int32 class indices, 1 int64 class indices, 2 soft targets
//   TARGET_KIND  storage of soft targets (codes of LOGIT_KIND)
//   HAS_WEIGHT   1 when a float32 weight per class is given
//   REDUCTION    0 none (per-row losses in LOGIT_KIND), 1 mean, 2 sum (per-row losses
//                in float32, reduced afterwards by xent_finalize)
//   BLOCK        threads per block
//   ITEMS        vectors held per thread (variants 0 to 2)
//   VEC          elements per vector access: 1, 2, 4 or 8 (the host checks that C is a
//                multiple of it and that the pointers are aligned to VEC elements)
//   CLUSTER      blocks per row (variant 2)
//   SOFTCAP      1: the logits are soft-capped, z -> softcap * tanh(z / softcap), before
//                the loss (Gemma 2), and the gradient is multiplied by 1 - tanh^2(z / softcap);
//                the variants 0 to 2 then hold the tanh of each logit in registers too
//
// Everything is accumulated in float32 (the single-block reductions over rows in
// float64); each gradient element is computed in float32 and rounded once to the
// output type. All reductions are fixed-order trees (warp butterflies, then a
// sequential pass over the warps or blocks in index order): no floating atomics, so
// the results are bitwise reproducible for a given launch configuration (which depends
// on the shapes, the device and the alignment of the data pointers: VEC changes the
// order of the sums).
//
// The gradient may alias the logits (in-place): each element is read into a register
// before the same thread writes it, so no pointer is declared __restrict__.

#ifndef LOGIT_KIND
#define LOGIT_KIND 0
#endif
#ifndef LABEL_KIND
#define LABEL_KIND 0
#endif
#ifndef TARGET_KIND
#define TARGET_KIND LOGIT_KIND
#endif
#ifndef HAS_WEIGHT
#define HAS_WEIGHT 0
#endif
#ifndef REDUCTION
#define REDUCTION 1
#endif
#ifndef VARIANT
#define VARIANT 1
#endif
#ifndef BLOCK
#define BLOCK 256
#endif
#ifndef ITEMS
#define ITEMS 4
#endif
#ifndef VEC
#define VEC 1
#endif
#ifndef CLUSTER
#define CLUSTER 1
#endif
#ifndef SOFTCAP
#define SOFTCAP 0
#endif

#define SOFT (LABEL_KIND == 2)
#define NEG_INF (__int_as_float(0xff800000))
#define F_NAN (__int_as_float(0x7fffffff))

typedef long long i64;

// --- storage types and conversions (no CUDA headers needed) ---------------------------

template <int KIND> struct Storage { typedef unsigned short type; };
template <> struct Storage<0> { typedef float type; };

template <int KIND> __device__ __forceinline__ float to_float(typename Storage<KIND>::type v);
template <> __device__ __forceinline__ float to_float<0>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<1>(unsigned short v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
}
template <> __device__ __forceinline__ float to_float<2>(unsigned short v) {
    return __uint_as_float(((unsigned int)v) << 16);
}

template <int KIND> __device__ __forceinline__ typename Storage<KIND>::type from_float(float f);
template <> __device__ __forceinline__ float from_float<0>(float f) { return f; }
template <> __device__ __forceinline__ unsigned short from_float<1>(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
template <> __device__ __forceinline__ unsigned short from_float<2>(float f) {
    // Round to nearest even; NaN stays a (quiet) NaN.
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

typedef Storage<LOGIT_KIND>::type logit_t;
typedef Storage<TARGET_KIND>::type target_t;
#if LABEL_KIND == 0
typedef int label_t;
#elif LABEL_KIND == 1
typedef i64 label_t;
#else
typedef target_t label_t;
#endif
#if REDUCTION == 0
typedef logit_t rowloss_t;
#else
typedef float rowloss_t;
#endif

template <typename T, int N> struct alignas(sizeof(T) * N) Vec { T v[N]; };

template <int KIND>
__device__ __forceinline__ void load_vec(const typename Storage<KIND>::type* p, float* out) {
    typedef typename Storage<KIND>::type T;
    Vec<T, VEC> raw = *reinterpret_cast<const Vec<T, VEC>*>(p);
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = to_float<KIND>(raw.v[k]);
}

__device__ __forceinline__ void store_vec(logit_t* p, const float* in) {
    Vec<logit_t, VEC> raw;
#pragma unroll
    for (int k = 0; k < VEC; ++k) raw.v[k] = from_float<LOGIT_KIND>(in[k]);
    *reinterpret_cast<Vec<logit_t, VEC>*>(p) = raw;
}

// --- fixed-order reductions over the row's thread group -------------------------------

#if VARIANT == 0
#define GROUP_THREADS 32
#elif VARIANT == 2
#define GROUP_THREADS (BLOCK * CLUSTER)
#else
#define GROUP_THREADS BLOCK
#endif
#define WARPS (BLOCK / 32)

__device__ __forceinline__ float combine(float a, float b, bool is_max) {
    return is_max ? fmaxf(a, b) : a + b;
}

template <int K>
__device__ __forceinline__ void warp_reduce(float (&v)[K], bool is_max) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
        for (int k = 0; k < K; ++k) v[k] = combine(v[k], __shfl_xor_sync(0xffffffffu, v[k], off), is_max);
    }
}

#if VARIANT == 2
__device__ __forceinline__ void cluster_sync_all() {
    // Not .aligned: it is reached right after a branch taken by thread 0 only, and the
    // .aligned form requires the whole warp to execute it convergently.
    asm volatile("barrier.cluster.arrive.release;\n\tbarrier.cluster.wait.acquire;" ::: "memory");
}
__device__ __forceinline__ unsigned int cluster_rank() {
    unsigned int r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
__device__ __forceinline__ float load_remote(const float* local, unsigned int rank) {
    unsigned int addr = (unsigned int)__cvta_generic_to_shared(local);
    unsigned int remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(addr), "r"(rank));
    float v;
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
    return v;
}
#endif

// Reduce K values over the group; every thread of the group gets the result. `scratch`
// holds K * WARPS floats (plus K for the cluster exchange) and must not be reused by
// another reduction before a barrier separates them: each call site has its own.
template <int K>
__device__ __forceinline__ void group_reduce(float (&v)[K], bool is_max, float* scratch) {
    warp_reduce<K>(v, is_max);
#if VARIANT != 0
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) {
#pragma unroll
        for (int k = 0; k < K; ++k) scratch[k * WARPS + warp] = v[k];
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < K; ++k) {
        float r = scratch[k * WARPS];
        for (int w = 1; w < WARPS; ++w) r = combine(r, scratch[k * WARPS + w], is_max);
        v[k] = r;
    }
#if VARIANT == 2
    float* xchg = scratch + K * WARPS;
    if (threadIdx.x == 0) {
#pragma unroll
        for (int k = 0; k < K; ++k) xchg[k] = v[k];
    }
    cluster_sync_all();  // every block's partial is visible cluster-wide
#pragma unroll
    for (int k = 0; k < K; ++k) {
        float r = load_remote(xchg + k, 0);
        for (unsigned int b = 1; b < CLUSTER; ++b) r = combine(r, load_remote(xchg + k, b), is_max);
        v[k] = r;
    }
#endif
#endif
}

// --- the per-row math, shared by all variants ------------------------------------------

struct RowInfo {
    float scale;    // 1/divisor for the mean, else 1
    float coef_w;   // hard: (1-eps) * w_y, the weight of the label's one-hot term
    i64 label;      // hard: the class index
    int state;      // 0 active, 1 ignored, 2 out-of-range label
};

__device__ __forceinline__ float class_weight(const float* weight, i64 c) {
#if HAS_WEIGHT
    return weight[c];
#else
    return 1.0f;
#endif
}

#if VARIANT == 2
#define CLUSTER_ATTR __cluster_dims__(CLUSTER, 1, 1)
#else
#define CLUSTER_ATTR
#endif

extern "C" __global__ void CLUSTER_ATTR __launch_bounds__(BLOCK)
xent_rows(const logit_t* logits, const label_t* labels, const float* weight, logit_t* grad,
          rowloss_t* row_loss, const float* denom, i64 n_rows, i64 n_cols, i64 ignore_index,
          float smoothing, float z_loss, float softcap) {
    __shared__ float scratch[3][4 * WARPS + 4];

    // Which row, and where this thread sits in the row's group.
#if VARIANT == 0
    const i64 row = (i64)blockIdx.x * WARPS + (threadIdx.x >> 5);
    const int t = threadIdx.x & 31;
    if (row >= n_rows) return;  // whole warps leave together: no block barrier below
#elif VARIANT == 2
    const i64 row = (i64)blockIdx.x / CLUSTER;
    const int t = (int)cluster_rank() * BLOCK + threadIdx.x;
#else
    const i64 row = (i64)blockIdx.x;
    const int t = threadIdx.x;
#endif
    const int C = (int)n_cols;
    const i64 base = row * n_cols;  // 64-bit: N * C may exceed 2**31
    const float inv_c = 1.0f / (float)C;
    const float eps_c = smoothing * inv_c;
#if SOFTCAP
    const float inv_cap = 1.0f / softcap;
#else
    (void)softcap;
#endif

    RowInfo info;
#if REDUCTION == 1
    {
        // As PyTorch: with a divisor of 0 (every row ignored, or every present label of
        // class weight 0) the mean is NaN (xent_finalize), every row that is not ignored
        // has a NaN gradient, and ignored rows keep their zero gradient.
        const float d = denom[0];
        info.scale = d == 0.0f ? F_NAN : 1.0f / d;
    }
#else
    info.scale = 1.0f;
#endif
    info.coef_w = 0.0f;
    info.label = -1;
    info.state = 0;
#if !SOFT
    {
        const i64 y = (i64)labels[row];
        info.label = y;
        if (y == ignore_index) {
            info.state = 1;
        } else if (y < 0 || y >= n_cols) {
            info.state = 2;  // never used as an index below
        } else {
            info.coef_w = (1.0f - smoothing) * class_weight(weight, y);
        }
    }
#endif

#if VARIANT != 3
    // ---- one read: the row into registers -------------------------------------------
    float x[ITEMS][VEC];
#if SOFT
    float tw[ITEMS][VEC];  // smoothed target times class weight
#endif
#if SOFTCAP
    float th[ITEMS][VEC];  // tanh(z / softcap): the capped logit over softcap
#endif
    float m = NEG_INF;
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
        const int j0 = (it * GROUP_THREADS + t) * VEC;
        if (j0 < C) {
            load_vec<LOGIT_KIND>(logits + base + j0, x[it]);
#if SOFTCAP
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                th[it][k] = tanhf(x[it][k] * inv_cap);
                x[it][k] = softcap * th[it][k];
            }
#endif
#if SOFT
            load_vec<TARGET_KIND>(labels + base + j0, tw[it]);
#pragma unroll
            for (int k = 0; k < VEC; ++k)
                tw[it][k] = ((1.0f - smoothing) * tw[it][k] + eps_c) * class_weight(weight, j0 + k);
#endif
#pragma unroll
            for (int k = 0; k < VEC; ++k) m = fmaxf(m, x[it][k]);
        } else {
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                x[it][k] = NEG_INF;
#if SOFT
                tw[it][k] = 0.0f;
#endif
#if SOFTCAP
                th[it][k] = 0.0f;
#endif
            }
        }
    }
    {
        float r[1] = {m};
        group_reduce<1>(r, true, scratch[0]);
        m = r[0];
    }
    if (!isfinite(m)) m = 0.0f;  // an all -inf row gives NaN, not an exception

    // ---- sums: exp, and the loss terms that need no lse ------------------------------
    // hard: s, (M - x_y) at the label, sum_c w_c (M - x_c), sum_c w_c
    // soft: s, sum tw, sum tw (M - x)
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
        const int j0 = (it * GROUP_THREADS + t) * VEC;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            const int j = j0 + k;
            const float xv = x[it][k];
            const float e = __expf(xv - m);
            x[it][k] = e;  // the logit is no longer needed, its exponential is
            if (j < C) {
                acc[0] += e;
#if SOFT
                const float u = tw[it][k];
                acc[1] += u;
                if (u != 0.0f) acc[2] += u * (m - xv);
#else
                if ((i64)j == info.label) acc[1] += m - xv;
                if (smoothing > 0.0f) {
                    const float w = class_weight(weight, j);
                    acc[2] += w * (m - xv);
                    acc[3] += w;
                }
#endif
            }
        }
    }
    group_reduce<4>(acc, false, scratch[1]);
    const float s = acc[0];
    const float log_s = logf(s);
    const float lse = m + log_s;
#if SOFT
    const float a = acc[1] + 2.0f * z_loss * lse;
    const float loss = acc[1] * log_s + acc[2] + z_loss * lse * lse;
#else
    const float sw = HAS_WEIGHT ? acc[3] : (float)C;
    const float a = info.coef_w + eps_c * sw + 2.0f * z_loss * lse;
    const float loss = info.coef_w * (log_s + acc[1]) + eps_c * (sw * log_s + acc[2]) +
                       z_loss * lse * lse;
#endif
    const float as = a * info.scale / s;

    // ---- one write -------------------------------------------------------------------
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
        const int j0 = (it * GROUP_THREADS + t) * VEC;
        if (j0 < C) {
            float g[VEC];
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                const int j = j0 + k;
                (void)j;
#if SOFT
                g[k] = fmaf(as, x[it][k], -info.scale * tw[it][k]);
#if SOFTCAP
                g[k] *= 1.0f - th[it][k] * th[it][k];
#endif
#else
                float sub = smoothing > 0.0f ? eps_c * class_weight(weight, j) : 0.0f;
                if ((i64)j == info.label) sub += info.coef_w;
                g[k] = fmaf(as, x[it][k], -info.scale * sub);
#if SOFTCAP
                g[k] *= 1.0f - th[it][k] * th[it][k];
#endif
                if (info.state == 1) g[k] = 0.0f;
                if (info.state == 2) g[k] = F_NAN;
#endif
            }
            store_vec(grad + base + j0, g);
        }
    }
#if VARIANT == 2
    cluster_sync_all();  // no block may leave while another reads its shared memory
    if (cluster_rank() != 0) return;
    if (threadIdx.x == 0) {
#else
    if (t == 0) {
#endif
        float l = loss;
        if (info.state == 1) l = 0.0f;
        if (info.state == 2) l = F_NAN;
#if REDUCTION == 0
        row_loss[row] = from_float<LOGIT_KIND>(l);
#else
        row_loss[row] = l;
#endif
    }

#else  // VARIANT == 3
    // ---- first read: online max and rescaled sum -----------------------------------
    float m_t = NEG_INF, s_t = 0.0f, a_t = 0.0f;  // a_t: sum w (hard) or sum tw (soft)
    for (int j0 = t * VEC; j0 < C; j0 += BLOCK * VEC) {
        float xv[VEC];
        load_vec<LOGIT_KIND>(logits + base + j0, xv);
#if SOFT
        float tv[VEC];
        load_vec<TARGET_KIND>(labels + base + j0, tv);
#endif
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
#if SOFTCAP
            const float v = softcap * tanhf(xv[k] * inv_cap);
#else
            const float v = xv[k];
#endif
            if (v > m_t) {
                s_t = s_t * __expf(m_t - v) + 1.0f;
                m_t = v;
            } else if (v != NEG_INF) {
                s_t += __expf(v - m_t);
            }
#if SOFT
            a_t += ((1.0f - smoothing) * tv[k] + eps_c) * class_weight(weight, j0 + k);
#else
            if (HAS_WEIGHT && smoothing > 0.0f) a_t += class_weight(weight, j0 + k);
#endif
        }
    }
    float m;
    {
        float r[1] = {m_t};
        group_reduce<1>(r, true, scratch[0]);
        m = r[0];
    }
    if (!isfinite(m)) m = 0.0f;
    float acc[2] = {s_t == 0.0f ? 0.0f : s_t * __expf(m_t - m), a_t};
    group_reduce<2>(acc, false, scratch[1]);
    const float s = acc[0];
    const float log_s = logf(s);
    const float lse = m + log_s;
#if SOFT
    const float a = acc[1] + 2.0f * z_loss * lse;
#else
    const float sw = (HAS_WEIGHT && smoothing > 0.0f) ? acc[1] : (float)C;
    const float a = info.coef_w + eps_c * sw + 2.0f * z_loss * lse;
#endif
    const float as = a * info.scale / s;

    // ---- second read, and the write; the loss terms are summed on the way -----------
    float lacc[2] = {0.0f, 0.0f};
    for (int j0 = t * VEC; j0 < C; j0 += BLOCK * VEC) {
        float xv[VEC];
        load_vec<LOGIT_KIND>(logits + base + j0, xv);
#if SOFT
        float tv[VEC];
        load_vec<TARGET_KIND>(labels + base + j0, tv);
#endif
        float g[VEC];
#if SOFTCAP
        float th[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            th[k] = tanhf(xv[k] * inv_cap);
            xv[k] = softcap * th[k];
        }
#endif
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            const int j = j0 + k;
            const float e = __expf(xv[k] - m);
#if SOFT
            const float u = ((1.0f - smoothing) * tv[k] + eps_c) * class_weight(weight, j);
            if (u != 0.0f) lacc[0] += u * (m - xv[k]);
            g[k] = fmaf(as, e, -info.scale * u);
#if SOFTCAP
            g[k] *= 1.0f - th[k] * th[k];
#endif
#else
            if ((i64)j == info.label) lacc[0] += m - xv[k];
            float sub = 0.0f;
            if (smoothing > 0.0f) {
                const float w = class_weight(weight, j);
                lacc[1] += w * (m - xv[k]);
                sub = eps_c * w;
            }
            if ((i64)j == info.label) sub += info.coef_w;
            g[k] = fmaf(as, e, -info.scale * sub);
#if SOFTCAP
            g[k] *= 1.0f - th[k] * th[k];
#endif
            if (info.state == 1) g[k] = 0.0f;
            if (info.state == 2) g[k] = F_NAN;
#endif
        }
        store_vec(grad + base + j0, g);
    }
    group_reduce<2>(lacc, false, scratch[2]);
    if (t == 0) {
#if SOFT
        float l = acc[1] * log_s + lacc[0] + z_loss * lse * lse;
#else
        float l = info.coef_w * (log_s + lacc[0]) + eps_c * (sw * log_s + lacc[1]) +
                  z_loss * lse * lse;
        if (info.state == 1) l = 0.0f;
        if (info.state == 2) l = F_NAN;
#endif
#if REDUCTION == 0
        row_loss[row] = from_float<LOGIT_KIND>(l);
#else
        row_loss[row] = l;
#endif
    }
#endif
}

// --- single-block helpers: the mean's divisor and the reduction over rows --------------
//
// Both run in one block of 1024 threads: each thread sums a fixed strided subset of the
// rows in float64, then a fixed tree combines the threads. Deterministic, and cheap next
// to the row kernel (they touch N numbers, not N * C).

#define SMALL_BLOCK 1024

__device__ __forceinline__ double block_sum_double(double v) {
    __shared__ double parts[SMALL_BLOCK / 32];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) parts[warp] = v;
    __syncthreads();
    double r = 0.0;
    if (threadIdx.x == 0) {
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) r += parts[w];
    }
    return r;  // meaningful in thread 0 only
}

// Sum of the class weights of the rows that are neither ignored nor out of range (the
// mean's divisor for integer labels), written to denom[0] in float32.
extern "C" __global__ void __launch_bounds__(SMALL_BLOCK)
xent_denominator(const label_t* labels, const float* weight, float* denom, i64 n_rows,
                 i64 n_cols, i64 ignore_index) {
    double acc = 0.0;
#if !SOFT
    for (i64 i = threadIdx.x; i < n_rows; i += blockDim.x) {
        const i64 y = (i64)labels[i];
        if (y != ignore_index && y >= 0 && y < n_cols) acc += (double)class_weight(weight, y);
    }
#endif
    const double total = block_sum_double(acc);
    if (threadIdx.x == 0) denom[0] = (float)total;
}

// loss[0] = sum of the per-row losses (divided by denom[0] for the mean), in LOGIT_KIND.
extern "C" __global__ void __launch_bounds__(SMALL_BLOCK)
xent_finalize(const float* row_loss, const float* denom, logit_t* loss, i64 n_rows) {
    double acc = 0.0;
    for (i64 i = threadIdx.x; i < n_rows; i += blockDim.x) acc += (double)row_loss[i];
    const double total = block_sum_double(acc);
    if (threadIdx.x == 0) {
        float v = (float)total;
#if REDUCTION == 1
        // A divisor of 0 gives NaN (as PyTorch), never +-inf from a nonzero total.
        v = denom[0] == 0.0f ? F_NAN : (float)(total / (double)denom[0]);
#endif
        loss[0] = from_float<LOGIT_KIND>(v);
    }
}
