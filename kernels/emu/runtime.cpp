// runtime.cpp: the fiber scheduler behind cuda_emu.h (see its header comment for the model).
//
// Each block: one ucontext fiber per thread, started in a seeded random order. A fiber runs until
// it waits at a barrier or exits; the scheduler (on the launching thread's own stack) then runs
// the next ready fiber. A warp barrier releases when every live lane of its mask waits at it; the
// block barrier when every live thread waits at it (exited threads count as arrived, as on
// sm_70+). Released threads rejoin the ready queue in a freshly shuffled order. When nothing is
// ready and no barrier can release, the launch fails with a deadlock report instead of hanging.
//
// Under AddressSanitizer every switch is announced with __sanitizer_start_switch_fiber /
// __sanitizer_finish_switch_fiber, without which ASan takes a switch for a stack overflow.
// System headers first: cuda_emu.h's macros are meant for kernel code only.
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdlib>
#include <deque>
#include <memory>
#include <mutex>
#include <new>
#include <vector>

#include "cuda_emu.h"

#if defined(__SANITIZE_ADDRESS__)
#define EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define EMU_ASAN 1
#endif
#endif
#ifdef EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// Bounds of the section holding every static __shared__ variable, defined by the linker (weak:
// a build may have none).
extern "C" char __start_emu_shared[] __attribute__((weak));
extern "C" char __stop_emu_shared[] __attribute__((weak));

namespace emu {
namespace {

constexpr unsigned kWarp = 32;
constexpr unsigned kMaxThreads = 1024;
/// Dynamic shared memory a launch may ask for without the opt-in attribute, as on a GPU.
constexpr size_t kMaxDynamicShared = 48 * 1024;
/// Alignment of dynamic shared memory: at least what a GPU gives, so that a kernel may place
/// wmma tiles (32-byte aligned, mma.h checks) from its start.
constexpr size_t kSharedAlign = 128;
#ifdef EMU_ASAN
constexpr size_t kStackBytes = 256 * 1024;  // ASan's redzones make every frame larger
#else
constexpr size_t kStackBytes = 64 * 1024;
#endif

/// Frees dynamic shared memory allocated with kSharedAlign.
struct AlignedDelete {
  void operator()(unsigned char* p) const { ::operator delete[](p, std::align_val_t(kSharedAlign)); }
};

enum class State : unsigned char { Ready, AtSync, AtWarp, Done };

struct Fiber {
  ucontext_t ctx;
  char* stack;  // lowest usable address of its kStackBytes
  uint3 tid;
  unsigned lane, warp;
  State state;
  unsigned syncs;      // __syncthreads calls so far (for Launch::drop_sync)
  unsigned wait_mask;  // the mask of the warp barrier it waits at
  void* fake_stack;    // ASan's fake stack while the fiber is switched out
};

struct Warp {
  unsigned alive;    // lanes that exist and have not exited
  unsigned waiting;  // lanes waiting at the warp barrier
  unsigned mask;     // the mask they wait with
  unsigned gen;      // warp barriers completed: picks the exchange buffer
  // Two buffers: a lane may write the next shuffle's value while a slower lane still reads this
  // one's, but cannot get two shuffles ahead (the next barrier waits for the slow lane).
  unsigned long long slot[2][kWarp];
};

struct Runtime {
  std::mutex mu;  // one launch at a time: static shared memory and this state are global
  size_t page = 0;
  std::vector<char*> stacks;  // kept across launches; each with a guard page below
  // Sized before any context is made: a ucontext_t must not move once initialised.
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::deque<unsigned> ready;
  std::vector<unsigned> released;
  ucontext_t sched;
  Fiber* cur = nullptr;
  uint3 block_idx;
  dim3 block_dim, grid_dim;
  std::unique_ptr<unsigned char[], AlignedDelete> dyn;
  size_t dyn_len = 0;
  unsigned alive = 0, at_sync = 0, drop_sync = 0;
  unsigned long long rng = 0;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
};

Runtime& rt() {
  static Runtime r;
  return r;
}

// ------------------------------------------------------------------------------------------------
// ASan fiber annotations (no-ops without ASan)
// ------------------------------------------------------------------------------------------------

void switch_start(void** fake_stack_save, const void* bottom, size_t size) {
#ifdef EMU_ASAN
  __sanitizer_start_switch_fiber(fake_stack_save, bottom, size);
#else
  (void)fake_stack_save, (void)bottom, (void)size;
#endif
}

void switch_finish(void* fake_stack_save, const void** bottom_old, size_t* size_old) {
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(fake_stack_save, bottom_old, size_old);
#else
  (void)fake_stack_save, (void)bottom_old, (void)size_old;
#endif
}

// ------------------------------------------------------------------------------------------------
// scheduling
// ------------------------------------------------------------------------------------------------

unsigned long long next_random(Runtime& r) {  // splitmix64
  unsigned long long z = (r.rng += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/// Appends `r.released` to the ready queue in a random order.
void enqueue_released(Runtime& r) {
  std::vector<unsigned>& v = r.released;
  for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[next_random(r) % i]);
  for (unsigned id : v) {
    r.fibers[id].state = State::Ready;
    r.ready.push_back(id);
  }
  v.clear();
}

/// Releases warp `w`'s barrier if every live lane of its mask has arrived.
void try_release_warp(Runtime& r, unsigned w) {
  Warp& warp = r.warps[w];
  if (!warp.waiting) return;
  const unsigned need = warp.mask & warp.alive;
  if ((warp.waiting & need) != need) return;
  for (unsigned lane = 0; lane < kWarp; ++lane) {
    if (warp.waiting >> lane & 1u) r.released.push_back(w * kWarp + lane);
  }
  warp.waiting = 0;
  warp.gen += 1;
  // The buffer the next exchange writes: stale values from two exchanges ago must not pass for
  // a lane that does not write (an exited or masked-out source lane reads as all ones).
  memset(warp.slot[warp.gen & 1], 0xff, sizeof warp.slot[0]);
  enqueue_released(r);
}

void fiber_entry() {
  Runtime& r = rt();
  switch_finish(nullptr, &r.sched_stack_bottom, &r.sched_stack_size);
  r.body(r.ctx);
  Fiber* f = r.cur;
  f->state = State::Done;
  switch_start(nullptr, r.sched_stack_bottom, r.sched_stack_size);  // leaving for good
  swapcontext(&f->ctx, &r.sched);
}

/// From a fiber back to the scheduler; returns when the scheduler resumes this fiber.
void yield() {
  Runtime& r = rt();
  Fiber* f = r.cur;
  switch_start(&f->fake_stack, r.sched_stack_bottom, r.sched_stack_size);
  swapcontext(&f->ctx, &r.sched);
  switch_finish(f->fake_stack, &r.sched_stack_bottom, &r.sched_stack_size);
}

void resume(Runtime& r, Fiber* f) {
  r.cur = f;
  void* fake = nullptr;
  switch_start(&fake, f->stack, kStackBytes);
  swapcontext(&r.sched, &f->ctx);
  switch_finish(fake, nullptr, nullptr);
  r.cur = nullptr;
}

/// Points `f`'s context at fiber_entry on its stack. Out of line: getcontext returns twice, which
/// would make the compiler distrust every local of a caller it were inlined into.
__attribute__((noinline)) void make_context(Fiber& f) {
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, fiber_entry, 0);
}

/// Makes sure `n` stacks exist.
void ensure_stacks(Runtime& r, unsigned n) {
  if (!r.page) r.page = (size_t)sysconf(_SC_PAGESIZE);
  while (r.stacks.size() < n) {
    void* m = mmap(nullptr, kStackBytes + r.page, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
      perror("emu: mmap of a fiber stack");
      abort();
    }
    mprotect(m, r.page, PROT_NONE);  // the guard page: stacks grow down into it
    r.stacks.push_back(static_cast<char*>(m) + r.page);
  }
}

void fill_shared(Runtime& r) {
  char* lo = __start_emu_shared;
  char* hi = __stop_emu_shared;
  if (lo && hi > lo) memset(lo, 0xff, (size_t)(hi - lo));
  if (r.dyn_len) memset(r.dyn.get(), 0xff, r.dyn_len);
}

/// Runs the current block to completion; false (with `err` written) on a deadlock.
bool run_block(Runtime& r, const char* kernel, char* err, size_t err_len) {
  const unsigned bx = r.block_dim.x, by = r.block_dim.y;
  const unsigned n = bx * by * r.block_dim.z;
  fill_shared(r);
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = r.fibers[i];
    f.stack = r.stacks[i];
    f.tid = uint3{i % bx, (i / bx) % by, i / (bx * by)};
    f.lane = i % kWarp;
    f.warp = i / kWarp;
    f.state = State::Ready;
    f.syncs = 0;
    f.wait_mask = 0;
    f.fake_stack = nullptr;
#ifdef EMU_ASAN
    // A fiber abandoned by a deadlock (or by fiber_entry's final switch) leaves poisoned frames.
    __asan_unpoison_memory_region(f.stack, kStackBytes);
#endif
    make_context(f);
  }
  const unsigned warps = (n + kWarp - 1) / kWarp;
  for (unsigned w = 0; w < warps; ++w) {
    Warp& warp = r.warps[w];
    const unsigned lanes = n - w * kWarp < kWarp ? n - w * kWarp : kWarp;
    warp.alive = lanes == kWarp ? 0xffffffffu : (1u << lanes) - 1u;
    warp.waiting = 0;
    warp.mask = 0;
    warp.gen = 0;
    memset(warp.slot, 0xff, sizeof warp.slot);
  }
  r.alive = n;
  r.at_sync = 0;
  r.ready.clear();
  for (unsigned i = 0; i < n; ++i) r.released.push_back(i);
  enqueue_released(r);

  for (;;) {
    if (!r.ready.empty()) {
      Fiber* f = &r.fibers[r.ready.front()];
      r.ready.pop_front();
      resume(r, f);
      Warp& warp = r.warps[f->warp];
      switch (f->state) {
        case State::Done:
          r.alive -= 1;
          warp.alive &= ~(1u << f->lane);
          try_release_warp(r, f->warp);  // its lanes may have been waiting only for this one
          break;
        case State::AtWarp:
          warp.waiting |= 1u << f->lane;
          warp.mask = f->wait_mask;
          try_release_warp(r, f->warp);
          break;
        case State::AtSync:
          r.at_sync += 1;
          break;
        case State::Ready:
          break;
      }
      continue;
    }
    if (r.alive == 0) return true;
    if (r.at_sync == r.alive) {
      for (unsigned i = 0; i < n; ++i) {
        if (r.fibers[i].state == State::AtSync) r.released.push_back(i);
      }
      r.at_sync = 0;
      enqueue_released(r);
      continue;
    }
    unsigned at_warp = 0;
    for (unsigned i = 0; i < n; ++i) at_warp += r.fibers[i].state == State::AtWarp;
    snprintf(err, err_len,
             "%s: deadlock in block (%u,%u,%u): %u threads wait at __syncthreads and %u at a warp "
             "barrier (shuffle, ballot or __syncwarp) that some lane of their warp never reaches",
             kernel, r.block_idx.x, r.block_idx.y, r.block_idx.z, r.at_sync, at_warp);
    return false;
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// what kernels call (through cuda_emu.h)
// ------------------------------------------------------------------------------------------------

const uint3& thread_idx() { return rt().cur->tid; }
const uint3& block_idx() { return rt().block_idx; }
const dim3& block_dim() { return rt().block_dim; }
const dim3& grid_dim() { return rt().grid_dim; }
void* dynamic_shared() { return rt().dyn.get(); }
unsigned lane_id() { return rt().cur->lane; }

void syncthreads() {
  Runtime& r = rt();
  Fiber* f = r.cur;
  if (++f->syncs == r.drop_sync) return;  // the barrier a race test removes
  f->state = State::AtSync;
  yield();
}

void syncwarp(unsigned mask) {
  Fiber* f = rt().cur;
  f->state = State::AtWarp;
  f->wait_mask = mask;
  yield();
}

unsigned long long exchange(unsigned mask, unsigned long long bits, int src) {
  Runtime& r = rt();
  Fiber* f = r.cur;
  Warp& warp = r.warps[f->warp];
  unsigned long long* slot = warp.slot[warp.gen & 1];
  slot[f->lane] = bits;
  syncwarp(mask);
  return src >= 0 && src < (int)kWarp ? slot[src] : bits;
}

unsigned ballot(unsigned mask, bool pred) {
  Runtime& r = rt();
  Fiber* f = r.cur;
  Warp& warp = r.warps[f->warp];
  unsigned long long* slot = warp.slot[warp.gen & 1];
  slot[f->lane] = pred ? 1u : 0u;
  syncwarp(mask);
  unsigned votes = 0;
  for (unsigned lane = 0; lane < kWarp; ++lane) {
    if ((mask >> lane & 1u) && slot[lane] == 1u) votes |= 1u << lane;
  }
  return votes;
}

int run(const char* kernel, const Launch* cfg, void (*body)(void*), void* ctx, char* err,
        size_t err_len) {
  const unsigned* g = cfg->grid;
  const unsigned* b = cfg->block;
  const unsigned long long threads = (unsigned long long)b[0] * b[1] * b[2];
  if (!g[0] || !g[1] || !g[2] || !threads) {
    snprintf(err, err_len, "%s: empty launch grid (%u,%u,%u) x block (%u,%u,%u)", kernel, g[0],
             g[1], g[2], b[0], b[1], b[2]);
    return 1;
  }
  if (threads > kMaxThreads || b[2] > 64 || g[1] > 65535 || g[2] > 65535 || g[0] > 0x7fffffffu) {
    snprintf(err, err_len, "%s: launch of grid (%u,%u,%u) x block (%u,%u,%u) exceeds CUDA's limits",
             kernel, g[0], g[1], g[2], b[0], b[1], b[2]);
    return 1;
  }
  if (cfg->shared_bytes > kMaxDynamicShared) {
    snprintf(err, err_len, "%s: %u bytes of dynamic shared memory exceed the %zu a block may use",
             kernel, cfg->shared_bytes, kMaxDynamicShared);
    return 1;
  }
  Runtime& r = rt();
  std::lock_guard<std::mutex> lock(r.mu);
  ensure_stacks(r, (unsigned)threads);
  if (r.fibers.size() < threads) r.fibers.resize(threads);
  if (r.warps.size() < (threads + kWarp - 1) / kWarp) r.warps.resize((threads + kWarp - 1) / kWarp);
  // Exactly the size asked for, so that ASan reports an access past it; at least one byte, so
  // that dynamic_shared() is never null (CUDA gives an address).
  r.dyn.reset(static_cast<unsigned char*>(
      ::operator new[](cfg->shared_bytes ? cfg->shared_bytes : 1, std::align_val_t(kSharedAlign))));
  r.dyn_len = cfg->shared_bytes;
  r.block_dim = dim3{b[0], b[1], b[2]};
  r.grid_dim = dim3{g[0], g[1], g[2]};
  r.drop_sync = cfg->drop_sync;
  r.body = body;
  r.ctx = ctx;
  for (unsigned z = 0; z < g[2]; ++z) {
    for (unsigned y = 0; y < g[1]; ++y) {
      for (unsigned x = 0; x < g[0]; ++x) {
        r.block_idx = uint3{x, y, z};
        const unsigned long long linear = ((unsigned long long)z * g[1] + y) * g[0] + x;
        r.rng = cfg->seed ^ (linear * 0xd1b54a32d192ed03ull);
        if (!run_block(r, kernel, err, err_len)) return 1;
      }
    }
  }
  return 0;
}

}  // namespace emu
