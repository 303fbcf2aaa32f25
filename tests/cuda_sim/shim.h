// CUDA-semantics shim: compiles a (rewritten) .cu file with g++ and runs its kernels on
// the CPU, every CUDA thread a cooperative fiber (ucontext).
//
// The rewriter (build.py) has already replaced every inline-PTX `asm` statement by a call
// of a function below, every static `__shared__` array by a reference into the block's
// shared-memory arena, and appended a table of the file's kernels (their parameter
// types, __launch_bounds__ and __cluster_dims__). This header is force-included.
//
// Execution model: a launch runs cluster after cluster (a cluster is one block for
// ordinary kernels); inside a cluster every thread is a fiber that runs until it
// blocks at a barrier (__syncthreads, a warp *_sync collective, a cluster barrier) or
// exits. A barrier releases when all its participants arrived; the fibers released are
// resumed in the launch's order (forward, reverse, or a seeded shuffle), and so are the
// clusters. When nothing can run and fibers remain, the launch fails with a report of
// where each waits. Shared memory is filled with a poison pattern that depends on the
// order, so a read of memory nobody wrote shows up as a difference between orders.
#pragma once
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

using std::isfinite;
using std::isinf;
using std::isnan;

#define __device__
#define __global__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __cluster_dims__(...)

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

namespace sim {

enum State { RUNNABLE, AT_SYNC, AT_WARP, AT_CLUSTER, EXITED };
enum WarpOp { W_SHFL_XOR, W_SHFL_IDX, W_SHFL_DOWN, W_SHFL_UP, W_BALLOT, W_ANY, W_ALL, W_SYNCWARP };
static const char* const kWarpOpName[] = {"__shfl_xor_sync", "__shfl_sync", "__shfl_down_sync",
                                          "__shfl_up_sync",  "__ballot_sync", "__any_sync",
                                          "__all_sync",      "__syncwarp"};

struct Block;
struct Thread {
    ucontext_t ctx;
    Block* blk = nullptr;
    dim3 tid;
    int linear = 0;  // index in the block
    int state = RUNNABLE;
    int line = 0;  // where it waits
    // warp collective in flight
    int op = 0, width = 32;
    unsigned int mask = 0, param = 0;
    uint64_t value = 0, result = 0;
    int pred = 0;
    // cluster barrier
    unsigned long arrived = 0, waits_for = 0;
};

struct Block {
    dim3 idx;
    unsigned int rank = 0;  // in its cluster
    std::vector<Thread> threads;
    std::vector<unsigned char> arena;
    std::map<std::pair<int, size_t>, size_t> statics;
    size_t static_top = 0;
    int live = 0;
    bool alive = true;
};

static const size_t kStaticMax = 48 * 1024;
static const size_t kStack = 64 * 1024;

struct Launch {
    dim3 grid, block, cluster;
    size_t dynamic_shared = 0;
    int order = 0;  // 0 forward, 1 reverse, 2 shuffle, 3 warp at a time (last first)
    std::mt19937_64 rng;
    unsigned char poison = 0xff;
    std::vector<Block> blocks;  // the cluster running now
    ucontext_t sched;
    std::string error;
    void (*body)(void**) = nullptr;
    void** args = nullptr;
};

// Fiber stacks: one reserved region, grown on demand; pages are touched only when used.
static char* g_stacks = nullptr;
static size_t g_stacks_size = 0;
static char* stacks(size_t bytes) {
    if (bytes > g_stacks_size) {
        if (g_stacks) munmap(g_stacks, g_stacks_size);
        void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) return nullptr;
        g_stacks = static_cast<char*>(p);
        g_stacks_size = bytes;
    }
    return g_stacks;
}

static Launch* g_launch = nullptr;
static Thread* g_cur = nullptr;

// --- errors: recorded, then the fiber goes back to the scheduler, which stops the launch
[[noreturn]] static void fail(const char* fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (g_launch->error.empty()) {
        char where[96];
        snprintf(where, sizeof where, " [block (%u,%u,%u) thread (%u,%u,%u)]", g_cur->blk->idx.x,
                 g_cur->blk->idx.y, g_cur->blk->idx.z, g_cur->tid.x, g_cur->tid.y, g_cur->tid.z);
        g_launch->error = std::string(buf) + where;
    }
    g_cur->state = EXITED;
    swapcontext(&g_cur->ctx, &g_launch->sched);
    __builtin_unreachable();
}

static void block_here(int state, int line) {
    g_cur->state = state;
    g_cur->line = line;
    swapcontext(&g_cur->ctx, &g_launch->sched);
}

// --- barriers -----------------------------------------------------------------------
static void syncthreads(int line) { block_here(AT_SYNC, line); }

template <typename T>
static uint64_t bits_of(T v) {
    static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
    uint64_t u = 0;
    memcpy(&u, &v, sizeof v);
    return u;
}
template <typename T>
static T from_bits(uint64_t u) {
    T v;
    memcpy(&v, &u, sizeof v);
    return v;
}

static int lane_id() { return g_cur->linear & 31; }

static uint64_t warp_collective(int op, unsigned mask, uint64_t value, unsigned param, int width,
                                int line) {
    const int lane = lane_id();
    if (!(mask >> lane & 1u))
        fail("%s at line %d: the calling lane %d is not in mask 0x%08x", kWarpOpName[op], line,
             lane, mask);
    if (width < 1 || width > 32 || (width & (width - 1)))
        fail("%s at line %d: width %d is not a power of two <= 32", kWarpOpName[op], line, width);
    Thread* t = g_cur;
    t->op = op;
    t->mask = mask;
    t->value = value;
    t->param = param;
    t->width = width;
    block_here(AT_WARP, line);
    return t->result;
}

template <typename T>
static T shfl_xor(unsigned mask, T v, int lane_mask, int width, int line) {
    return from_bits<T>(warp_collective(W_SHFL_XOR, mask, bits_of(v), lane_mask, width, line));
}
template <typename T>
static T shfl_idx(unsigned mask, T v, int src, int width, int line) {
    return from_bits<T>(warp_collective(W_SHFL_IDX, mask, bits_of(v), src, width, line));
}
template <typename T>
static T shfl_down(unsigned mask, T v, unsigned d, int width, int line) {
    return from_bits<T>(warp_collective(W_SHFL_DOWN, mask, bits_of(v), d, width, line));
}
template <typename T>
static T shfl_up(unsigned mask, T v, unsigned d, int width, int line) {
    return from_bits<T>(warp_collective(W_SHFL_UP, mask, bits_of(v), d, width, line));
}

// --- shared memory --------------------------------------------------------------------
static void* shared_static(int id, size_t size, size_t align) {
    Block* b = g_cur->blk;
    auto key = std::make_pair(id, size);
    auto it = b->statics.find(key);
    if (it == b->statics.end()) {
        size_t off = (b->static_top + align - 1) / align * align;
        if (off + size > kStaticMax) fail("static __shared__ memory exceeds 48 KB");
        b->static_top = off + size;
        it = b->statics.emplace(key, off).first;
    }
    return b->arena.data() + it->second;
}
static void* shared_dynamic() { return g_cur->blk->arena.data() + kStaticMax; }

static unsigned int cvta_to_shared(const void* p) {
    Block* b = g_cur->blk;
    const unsigned char* c = static_cast<const unsigned char*>(p);
    if (c < b->arena.data() || c >= b->arena.data() + b->arena.size())
        fail("__cvta_generic_to_shared of a pointer outside this block's shared memory");
    return (unsigned int)(c - b->arena.data()) + 0x400u;
}

// --- clusters and distributed shared memory ------------------------------------------
static unsigned int cluster_ctarank() { return g_cur->blk->rank; }
static void cluster_arrive(int) { ++g_cur->arrived; }
static void cluster_wait(int line) {
    g_cur->waits_for = g_cur->arrived;
    block_here(AT_CLUSTER, line);
}
static unsigned int mapa(unsigned int addr, unsigned int rank) {
    const unsigned n = g_launch->cluster.x * g_launch->cluster.y * g_launch->cluster.z;
    if (rank >= n) fail("mapa: rank %u outside the cluster of %u blocks", rank, n);
    if (addr < 0x400u || addr - 0x400u >= g_cur->blk->arena.size())
        fail("mapa: 0x%x is not a shared-memory address", addr);
    return 0x80000000u | (rank << 24) | (addr - 0x400u);
}
static unsigned char* cluster_ptr(unsigned int addr, size_t size, const char* what) {
    if (!(addr & 0x80000000u)) fail("%s: 0x%x is not a shared::cluster address (no mapa)", what, addr);
    const unsigned rank = (addr >> 24) & 0x7f, off = addr & 0xffffffu;
    Block& b = g_launch->blocks[rank];
    if (!b.alive)
        fail("%s: block of rank %u has exited; its shared memory is gone (a cluster barrier "
             "before its exit is missing)",
             what, rank);
    if (off + size > b.arena.size()) fail("%s: offset %u out of shared memory", what, off);
    return b.arena.data() + off;
}
template <typename T>
static T ld_cluster(unsigned int addr) {
    T v;
    memcpy(&v, cluster_ptr(addr, sizeof v, "ld.shared::cluster"), sizeof v);
    return v;
}
template <typename T>
static void st_cluster(unsigned int addr, T v) {
    memcpy(cluster_ptr(addr, sizeof v, "st.shared::cluster"), &v, sizeof v);
}

// --- conversions with the hardware's rounding (round to nearest even) ----------------
static float cvt_f32_f16(unsigned short h) {
    _Float16 f;
    memcpy(&f, &h, 2);
    return (float)f;
}
static unsigned short cvt_rn_f16_f32(float x) {
    _Float16 f = (_Float16)x;  // IEEE conversion: round to nearest even, subnormals kept
    unsigned short h;
    memcpy(&h, &f, 2);
    return h;
}

// --- the scheduler ------------------------------------------------------------------
static void fiber_main() {
    g_launch->body(g_launch->args);
    Thread* t = g_cur;
    t->state = EXITED;
    if (--t->blk->live == 0) {
        t->blk->alive = false;
        memset(t->blk->arena.data(), 0xa5, t->blk->arena.size());
    }
    swapcontext(&t->ctx, &g_launch->sched);
}

static std::string where(const Thread& t) {
    char buf[160];
    const char* what = t.state == AT_SYNC      ? "__syncthreads"
                       : t.state == AT_WARP    ? kWarpOpName[t.op]
                       : t.state == AT_CLUSTER ? "barrier.cluster.wait"
                       : t.state == EXITED     ? "exited"
                                               : "running";
    if (t.state == AT_WARP)
        snprintf(buf, sizeof buf, "%s(mask 0x%08x) at line %d", what, t.mask, t.line);
    else if (t.state == EXITED)
        snprintf(buf, sizeof buf, "%s", what);
    else
        snprintf(buf, sizeof buf, "%s at line %d", what, t.line);
    return buf;
}

// Describe the waiting threads, runs of equal descriptions merged.
static std::string waiting_report() {
    std::string out;
    for (Block& b : g_launch->blocks) {
        std::string prev;
        int first = 0;
        auto flush = [&](int last) {
            if (prev.empty()) return;
            char buf[64];
            snprintf(buf, sizeof buf, "\n  block %u threads %d-%d: ", b.idx.x, first, last);
            out += buf + prev;
        };
        for (int i = 0; i < (int)b.threads.size(); ++i) {
            std::string w = where(b.threads[i]);
            if (w != prev) {
                flush(i - 1);
                prev = w;
                first = i;
            }
        }
        flush((int)b.threads.size() - 1);
        if (out.size() > 4000) break;
    }
    return out;
}

static void finish_warp(Block& b, int w0, std::vector<Thread*>& released) {
    Thread* lanes = &b.threads[w0];
    const int n = std::min(32, (int)b.threads.size() - w0);
    // Find a complete collective: every lane of some mask waits at it with that mask.
    for (int l = 0; l < n; ++l) {
        Thread& t = lanes[l];
        if (t.state != AT_WARP) continue;
        const unsigned mask = t.mask;
        bool complete = true;
        for (int k = 0; k < 32 && complete; ++k) {
            if (!(mask >> k & 1u)) continue;
            if (k >= n) { complete = false; break; }
            Thread& u = lanes[k];
            complete = u.state == AT_WARP && u.mask == mask && u.op == t.op && u.line == t.line &&
                       u.width == t.width;
        }
        if (!complete) continue;
        unsigned ballot = 0;
        for (int k = 0; k < 32; ++k)
            if (mask >> k & 1u) ballot |= (lanes[k].value != 0 ? 1u : 0u) << k;
        for (int k = 0; k < 32; ++k) {
            if (!(mask >> k & 1u)) continue;
            Thread& u = lanes[k];
            const int w = u.width, seg = k & ~(w - 1);
            int src = k;
            switch (u.op) {
                case W_SHFL_XOR: src = seg + (((k - seg) ^ (int)u.param) & (w - 1)); break;
                case W_SHFL_IDX: src = seg + ((int)u.param & (w - 1)); break;
                case W_SHFL_DOWN: src = (k - seg) + (int)u.param < w ? k + (int)u.param : k; break;
                case W_SHFL_UP: src = (k - seg) >= (int)u.param ? k - (int)u.param : k; break;
                default: break;
            }
            if (u.op <= W_SHFL_UP) {
                if (!(mask >> src & 1u)) {
                    char buf[200];
                    snprintf(buf, sizeof buf,
                             "%s at line %d: lane %d reads lane %d, which is not in mask 0x%08x "
                             "(undefined value)",
                             kWarpOpName[u.op], u.line, k, src, mask);
                    g_launch->error = buf;
                    return;
                }
                u.result = lanes[src].value;
            } else if (u.op == W_BALLOT) {
                u.result = ballot;
            } else if (u.op == W_ANY) {
                u.result = ballot != 0;
            } else if (u.op == W_ALL) {
                u.result = ballot == mask;
            }
        }
        for (int k = 0; k < 32; ++k)
            if (mask >> k & 1u) {
                lanes[k].state = RUNNABLE;
                released.push_back(&lanes[k]);
            }
    }
}

static void release(std::vector<Thread*>& released) {
    Launch& L = *g_launch;
    // __syncthreads: every thread of the block that has not exited waits there.
    for (Block& b : L.blocks) {
        if (b.live == 0) continue;
        bool all = true;
        int line = -1;
        bool divergent = false;
        for (Thread& t : b.threads) {
            if (t.state == EXITED) continue;
            if (t.state != AT_SYNC) { all = false; break; }
            if (line >= 0 && t.line != line) divergent = true;
            line = t.line;
        }
        if (all && divergent) {
            L.error = "divergent __syncthreads: the threads of one block wait at different "
                      "barriers;" + waiting_report();
            return;
        }
        if (all)
            for (Thread& t : b.threads)
                if (t.state == AT_SYNC) {
                    t.state = RUNNABLE;
                    released.push_back(&t);
                }
    }
    // warp collectives
    for (Block& b : L.blocks)
        for (size_t w0 = 0; w0 < b.threads.size(); w0 += 32) {
            finish_warp(b, (int)w0, released);
            if (!L.error.empty()) return;
        }
    // cluster barrier: every live thread of the cluster has arrived as often as I have
    unsigned long least = ~0ul;
    bool any_live = false;
    for (Block& b : L.blocks)
        for (Thread& t : b.threads)
            if (t.state != EXITED) {
                least = std::min(least, t.arrived);
                any_live = true;
            }
    if (any_live)
        for (Block& b : L.blocks)
            for (Thread& t : b.threads)
                if (t.state == AT_CLUSTER && t.waits_for <= least) {
                    t.state = RUNNABLE;
                    released.push_back(&t);
                }
}

static void order(std::vector<Thread*>& v) {
    if (g_launch->order == 1) std::reverse(v.begin(), v.end());
    if (g_launch->order == 2) std::shuffle(v.begin(), v.end(), g_launch->rng);
}

// Run one cluster of blocks to completion (or to an error).
static void run_cluster() {
    Launch& L = *g_launch;
    const size_t per_block = (size_t)L.block.x * L.block.y * L.block.z;
    const size_t n = per_block * L.blocks.size();
    char* stack_base = stacks(n * kStack);
    if (!stack_base) {
        L.error = "cannot reserve fiber stacks";
        return;
    }
    std::vector<Thread*> runnable;
    size_t s = 0;
    for (Block& b : L.blocks) {
        b.threads.assign(per_block, Thread());
        b.arena.assign(kStaticMax + L.dynamic_shared, L.poison);
        b.live = (int)per_block;
        for (size_t i = 0; i < per_block; ++i, ++s) {
            Thread& t = b.threads[i];
            t.blk = &b;
            t.linear = (int)i;
            t.tid.x = (unsigned)(i % L.block.x);
            t.tid.y = (unsigned)(i / L.block.x % L.block.y);
            t.tid.z = (unsigned)(i / ((size_t)L.block.x * L.block.y));
            getcontext(&t.ctx);
            t.ctx.uc_stack.ss_sp = stack_base + s * kStack;
            t.ctx.uc_stack.ss_size = kStack;
            t.ctx.uc_link = nullptr;
            makecontext(&t.ctx, fiber_main, 0);
            runnable.push_back(&t);
        }
    }
    while (true) {
        if (L.order == 3) {
            // Warp at a time, last warp first: each warp runs (its shuffles released at
            // once) until it waits at a block or cluster barrier, as if the others were
            // descheduled. A slot reused too early, or a missing __syncthreads, shows.
            std::vector<Thread*> later;
            std::sort(runnable.begin(), runnable.end(), [](Thread* a, Thread* b) {
                return a->blk->rank != b->blk->rank ? a->blk->rank > b->blk->rank
                                                    : a->linear / 32 > b->linear / 32;
            });
            for (size_t i = 0; i < runnable.size();) {
                Block& b = *runnable[i]->blk;
                const int w0 = runnable[i]->linear & ~31;
                std::vector<Thread*> warp;
                for (; i < runnable.size() && runnable[i]->blk == &b &&
                       (runnable[i]->linear & ~31) == w0;
                     ++i)
                    warp.push_back(runnable[i]);
                while (!warp.empty()) {
                    for (Thread* t : warp) {
                        g_cur = t;
                        swapcontext(&L.sched, &t->ctx);
                        if (!L.error.empty()) return;
                    }
                    warp.clear();
                    finish_warp(b, w0, warp);
                    if (!L.error.empty()) return;
                }
            }
        } else {
            order(runnable);
            for (Thread* t : runnable) {
                g_cur = t;
                swapcontext(&L.sched, &t->ctx);
                if (!L.error.empty()) return;
            }
        }
        runnable.clear();
        release(runnable);
        if (!L.error.empty()) return;
        if (runnable.empty()) {
            for (Block& b : L.blocks)
                if (b.live) {
                    L.error = "deadlock: no thread can run and some have not exited;" +
                              waiting_report();
                    return;
                }
            return;
        }
    }
}

struct KernelInfo {
    const char* name;
    void (*invoke)(void**);
    int nparams;
    int sizes[24];
    int kinds[24];  // 0 pointer, 1 signed integer, 2 unsigned integer, 3 floating, 4 other
    int max_threads, min_blocks;
    int cluster[3];
};

template <typename T>
constexpr int kind_of() {
    return std::is_pointer<T>::value         ? 0
           : std::is_floating_point<T>::value ? 3
           : std::is_integral<T>::value       ? (std::is_signed<T>::value ? 1 : 2)
                                              : 4;
}
template <typename... A, size_t... I>
static void invoke_impl(void (*f)(A...), void** a, std::index_sequence<I...>) {
    f(*static_cast<typename std::remove_reference<A>::type*>(a[I])...);
}
template <typename... A>
static KernelInfo info(const char* name, void (*f)(A...), void (*inv)(void**), int max_threads,
                       int min_blocks, int cx, int cy, int cz) {
    static_assert(sizeof...(A) <= 24, "too many kernel parameters");
    KernelInfo k{};
    k.name = name;
    k.invoke = inv;
    k.nparams = (int)sizeof...(A);
    const int sizes[] = {(int)sizeof(A)..., 0};
    const int kinds[] = {kind_of<A>()..., 0};
    for (int i = 0; i < k.nparams; ++i) {
        k.sizes[i] = sizes[i];
        k.kinds[i] = kinds[i];
    }
    k.max_threads = max_threads;
    k.min_blocks = min_blocks;
    k.cluster[0] = cx;
    k.cluster[1] = cy;
    k.cluster[2] = cz;
    (void)f;
    return k;
}
template <typename... A>
static void invoke(void (*f)(A...), void** a) {
    invoke_impl(f, a, std::index_sequence_for<A...>{});
}

}  // namespace sim

// --- the CUDA names kernels use ------------------------------------------------------
#define threadIdx (sim::g_cur->tid)
#define blockIdx (sim::g_cur->blk->idx)
#define blockDim (sim::g_launch->block)
#define gridDim (sim::g_launch->grid)
#define warpSize 32
#define __syncthreads() sim::syncthreads(__LINE__)
#define __syncwarp(...) sim::syncwarp_(__LINE__, ##__VA_ARGS__)
#define __shfl_xor_sync(m, v, o, ...) sim::shfl_xor(m, v, o, sim::width_(__VA_ARGS__ + 0), __LINE__)
#define __shfl_sync(m, v, s, ...) sim::shfl_idx(m, v, s, sim::width_(__VA_ARGS__ + 0), __LINE__)
#define __shfl_down_sync(m, v, d, ...) sim::shfl_down(m, v, d, sim::width_(__VA_ARGS__ + 0), __LINE__)
#define __shfl_up_sync(m, v, d, ...) sim::shfl_up(m, v, d, sim::width_(__VA_ARGS__ + 0), __LINE__)
#define __ballot_sync(m, p) ((unsigned)sim::warp_collective(sim::W_BALLOT, m, (p) != 0, 0, 32, __LINE__))
#define __any_sync(m, p) ((int)sim::warp_collective(sim::W_ANY, m, (p) != 0, 0, 32, __LINE__))
#define __all_sync(m, p) ((int)sim::warp_collective(sim::W_ALL, m, (p) != 0, 0, 32, __LINE__))
#define __trap() sim::fail("__trap() at line %d", __LINE__)
#define __cvta_generic_to_shared(p) sim::cvta_to_shared(p)

namespace sim {
static inline int width_(int w) { return w == 0 ? 32 : w; }
static inline void syncwarp_(int line, unsigned mask = 0xffffffffu) {
    warp_collective(W_SYNCWARP, mask, 0, 0, 32, line);
}
}  // namespace sim

static inline float __int_as_float(int i) { return sim::from_bits<float>((uint32_t)i); }
static inline float __uint_as_float(unsigned int u) { return sim::from_bits<float>(u); }
static inline unsigned int __float_as_uint(float f) { return (unsigned int)sim::bits_of(f); }
static inline int __float_as_int(float f) { return (int)(unsigned int)sim::bits_of(f); }
static inline double __longlong_as_double(long long i) { return sim::from_bits<double>((uint64_t)i); }
static inline long long __double_as_longlong(double d) { return (long long)sim::bits_of(d); }
// The fast intrinsics are approximations on a GPU (__expf: ex2.approx, about 2 ulp);
// here they are the accurate functions.
#define __expf(x) expf(x)
#define __logf(x) logf(x)
static inline float __fdividef(float a, float b) { return a / b; }
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
template <typename T>
static inline T __ldg(const T* p) { return *p; }
template <typename T>
static inline T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }
template <typename T>
static inline T atomicMax(T* p, T v) { T old = *p; *p = old > v ? old : v; return old; }

#define SIM_SHARED(type, name, dims, id)                                                    \
    type(&name) dims = *reinterpret_cast<type(*) dims>(                                    \
        sim::shared_static(id, sizeof(type dims), alignof(type)))
#define SIM_SHARED_DYNAMIC(type, name) type* name = static_cast<type*>(sim::shared_dynamic())

// --- entry points for the Python side ------------------------------------------------
extern "C" const sim::KernelInfo* sim_kernel_table(int* n);

extern "C" int sim_launch(int kernel, const unsigned* grid, const unsigned* block,
                          const unsigned* cluster, unsigned long long dynamic_shared,
                          void** args, int order, unsigned long long seed, char* err,
                          unsigned long long errlen) {
    int n = 0;
    const sim::KernelInfo* table = sim_kernel_table(&n);
    sim::Launch L;
    L.grid = {grid[0], grid[1], grid[2]};
    L.block = {block[0], block[1], block[2]};
    L.cluster = {cluster[0], cluster[1], cluster[2]};
    L.dynamic_shared = dynamic_shared;
    L.order = order;
    L.rng.seed(seed);
    L.poison = order == 0 ? 0xff : (unsigned char)(0x7f ^ (seed & 0x3f));
    L.body = table[kernel].invoke;
    L.args = args;
    sim::g_launch = &L;
    // clusters, in the launch's order
    std::vector<dim3> origins;
    for (unsigned z = 0; z < L.grid.z; z += L.cluster.z)
        for (unsigned y = 0; y < L.grid.y; y += L.cluster.y)
            for (unsigned x = 0; x < L.grid.x; x += L.cluster.x) origins.push_back({x, y, z});
    if (order == 1 || order == 3) std::reverse(origins.begin(), origins.end());
    if (order == 2) std::shuffle(origins.begin(), origins.end(), L.rng);
    for (const dim3& o : origins) {
        L.blocks.clear();
        L.blocks.resize((size_t)L.cluster.x * L.cluster.y * L.cluster.z);
        size_t r = 0;
        for (unsigned z = 0; z < L.cluster.z; ++z)
            for (unsigned y = 0; y < L.cluster.y; ++y)
                for (unsigned x = 0; x < L.cluster.x; ++x, ++r) {
                    L.blocks[r].idx = {o.x + x, o.y + y, o.z + z};
                    L.blocks[r].rank = (unsigned)r;
                }
        sim::run_cluster();
        if (!L.error.empty()) break;
    }
    sim::g_launch = nullptr;
    sim::g_cur = nullptr;
    if (L.error.empty()) return 0;
    snprintf(err, errlen, "%s", L.error.c_str());
    return 1;
}
