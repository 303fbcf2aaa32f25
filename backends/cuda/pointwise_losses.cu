// Fused elementwise losses with their gradients: MSE and BCE-with-logits.
//
// One grid-stride kernel reads the prediction and the target once, writes the gradient
// once (and the elementwise loss for reduction "none"), and for "mean"/"sum" leaves one
// float64 partial sum per block; a second single-block kernel adds the partials in
// index order. No floating atomics: the result is bitwise reproducible for a given
// grid size (the host derives it from the element count and the device only).
//
// Specialisation through -DNAME=VALUE compile options:
//   LOSS         0 MSE, 1 BCE with logits
//   PRED_KIND    storage of prediction, gradient and loss: 0 float32, 1 float16,
//                2 bfloat16 (16-bit kinds moved as raw bits)
//   TARGET_KIND  0 float32, 1 float16, 2 bfloat16, 3 bool/uint8, 4 int32, 5 int64
//   HAS_WEIGHT   1 with a float32 weight, broadcast by index: w[(i / w_inner) % w_size]
//   HAS_POS      1 with a float32 pos_weight (BCE), broadcast the same way
//   REDUCTION    0 none, 1 mean, 2 sum
//   BLOCK        threads per block
//   VEC          elements per vector access (the host checks divisibility and alignment)
//
// The gradient may alias the prediction (in-place): no pointer is __restrict__.

#ifndef LOSS
#define LOSS 0
#endif
#ifndef PRED_KIND
#define PRED_KIND 0
#endif
#ifndef TARGET_KIND
#define TARGET_KIND PRED_KIND
#endif
#ifndef HAS_WEIGHT
#define HAS_WEIGHT 0
#endif
#ifndef HAS_POS
#define HAS_POS 0
#endif
#ifndef REDUCTION
#define REDUCTION 1
#endif
#ifndef BLOCK
#define BLOCK 256
#endif
#ifndef VEC
#define VEC 1
#endif

typedef long long i64;

template <int KIND> struct Storage { typedef unsigned short type; };
template <> struct Storage<0> { typedef float type; };
template <> struct Storage<3> { typedef unsigned char type; };
template <> struct Storage<4> { typedef int type; };
template <> struct Storage<5> { typedef i64 type; };

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
template <> __device__ __forceinline__ float to_float<3>(unsigned char v) { return (float)v; }
template <> __device__ __forceinline__ float to_float<4>(int v) { return (float)v; }
template <> __device__ __forceinline__ float to_float<5>(i64 v) { return (float)v; }

template <int KIND> __device__ __forceinline__ typename Storage<KIND>::type from_float(float f);
template <> __device__ __forceinline__ float from_float<0>(float f) { return f; }
template <> __device__ __forceinline__ unsigned short from_float<1>(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
template <> __device__ __forceinline__ unsigned short from_float<2>(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

typedef Storage<PRED_KIND>::type pred_t;
typedef Storage<TARGET_KIND>::type target_t;

template <typename T, int N> struct alignas(sizeof(T) * N) Vec { T v[N]; };

__device__ __forceinline__ float broadcast_load(const float* w, i64 i, i64 inner, i64 size) {
    return w[(i / inner) % size];
}

// Elementwise loss and (unscaled) gradient at prediction x, target y.
__device__ __forceinline__ void loss_and_grad(float x, float y, float w, float q, float& l,
                                              float& g) {
#if LOSS == 0
    const float d = x - y;
    const float wd = w * d;
    l = wd * d;
    g = 2.0f * wd;
#else
    // softplus(x) = max(x, 0) + log1p(exp(-|x|)) never overflows; -log(sigmoid(x)) is
    // softplus(-x), formed the same way (softplus(x) - x would cancel for large x).
    const float e = __expf(-fabsf(x));
    const float l1p = log1pf(e);
    const float sp_pos = fmaxf(x, 0.0f) + l1p;
    const float sp_neg = fmaxf(-x, 0.0f) + l1p;
    const float sig = x >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
    const float qy = q * y;
    l = w * (qy * sp_neg + (1.0f - y) * sp_pos);
    g = w * ((qy + 1.0f - y) * sig - qy);
#endif
}

#if REDUCTION == 0
#define LOSS_OUT_T pred_t
#else
#define LOSS_OUT_T double
#endif

// REDUCTION 0: loss_out holds n elementwise losses. Otherwise loss_out holds one
// partial sum per block (gridDim.x of them).
extern "C" __global__ void __launch_bounds__(BLOCK)
pointwise_loss(const pred_t* pred, const target_t* target, const float* weight,
               const float* pos_weight, pred_t* grad, LOSS_OUT_T* loss_out, i64 n,
               float scale, i64 w_inner, i64 w_size, i64 q_inner, i64 q_size) {
#if REDUCTION != 0
    double acc = 0.0;
#endif
    const i64 n_vec = n / VEC;
    const i64 stride = (i64)gridDim.x * BLOCK;
    for (i64 v = (i64)blockIdx.x * BLOCK + threadIdx.x; v < n_vec; v += stride) {
        const i64 i0 = v * VEC;
        const Vec<pred_t, VEC> xr = *reinterpret_cast<const Vec<pred_t, VEC>*>(pred + i0);
        const Vec<target_t, VEC> yr = *reinterpret_cast<const Vec<target_t, VEC>*>(target + i0);
        Vec<pred_t, VEC> gr;
#if REDUCTION == 0
        Vec<pred_t, VEC> lr;
#endif
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            const i64 i = i0 + k;
            (void)i;
            float w = 1.0f, q = 1.0f;
#if HAS_WEIGHT
            w = broadcast_load(weight, i, w_inner, w_size);
#endif
#if HAS_POS
            q = broadcast_load(pos_weight, i, q_inner, q_size);
#endif
            float l, g;
            loss_and_grad(to_float<PRED_KIND>(xr.v[k]), to_float<TARGET_KIND>(yr.v[k]), w, q, l, g);
            gr.v[k] = from_float<PRED_KIND>(g * scale);
#if REDUCTION == 0
            lr.v[k] = from_float<PRED_KIND>(l);
#else
            acc += (double)l;
#endif
        }
        *reinterpret_cast<Vec<pred_t, VEC>*>(grad + i0) = gr;
#if REDUCTION == 0
        *reinterpret_cast<Vec<pred_t, VEC>*>(loss_out + i0) = lr;
#endif
    }
#if REDUCTION != 0
    __shared__ double parts[BLOCK / 32];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if ((threadIdx.x & 31) == 0) parts[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        double r = 0.0;
        for (int w = 0; w < BLOCK / 32; ++w) r += parts[w];
        loss_out[blockIdx.x] = r;
    }
#endif
}

#define SMALL_BLOCK 1024

// loss[0] = scale * (sum of the n_parts block partials, in index order).
extern "C" __global__ void __launch_bounds__(SMALL_BLOCK)
pointwise_finalize(const double* partials, i64 n_parts, pred_t* loss, double scale) {
    __shared__ double parts[SMALL_BLOCK / 32];
    double acc = 0.0;
    for (i64 i = threadIdx.x; i < n_parts; i += blockDim.x) acc += partials[i];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if ((threadIdx.x & 31) == 0) parts[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        double r = 0.0;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) r += parts[w];
        loss[0] = from_float<PRED_KIND>((float)(r * scale));
    }
}
