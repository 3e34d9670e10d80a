// The sum all-reduce of ranks on one host through a shared-memory segment; the wait spins briefly, then sleeps.
//
//   msrec::shm_all_reduce_sum_(Tensor(a!) t, Tensor region, int rank, int world, int done_rounds,
//                              float timeout_s, int divisor=1) -> int      (the rounds done after this call)
//
// region: a uint8 CPU tensor over a file every rank of the group has mapped MAP_SHARED
// (msrec_dist/distributed/collectives.py, SharedMemoryAllReduce, maps it with torch.from_file). Layout:
//
//   [world lines of 64 bytes: the rank's round, its lengths (int64)] [2 parities x world slots of `capacity` bytes]
//
// One round sums up to `capacity` bytes of t (longer tensors take several rounds):
//   1. copy my part of t into my slot of parity (round & 1);
//   2. publish: length[rank][parity] = elements, then flag[rank] = round (release store);
//   3. wait until every flag[p] >= round (acquire loads): spinning for up to kSpinTime, then
//      sleeping in growing steps (kFirstSleep doubling up to kMaxSleep) until timeout_s;
//   4. t = slot[0] + slot[1] + ... + slot[world-1], in rank order on every rank, so every rank
//      ends with bitwise the same sum; with divisor > 1 (floating types), t = that sum / divisor.
//      One pass over t, block by block (a block of t stays in L1 while the slots are added in):
//      the slots are read once and t written once. The data-parallel gradients' mean is this sum
//      with divisor = world: bitwise the sum followed by t.div_(world), without that second pass
//      over the buffer (2 ranks, 1.2 MB of gradients: ~0.18 ms a step on this project's CPU).
// Two parities make a second barrier unnecessary: a rank rewrites its slot of one parity two rounds
// later, and it gets there only after every peer has published the round in between, i.e. after
// every peer has finished reading this round's slots.
//
// Why by hand: torch.distributed offers gloo alone for CPU tensors, and its TCP transport between
// two ranks bound to one core each takes 3-5 ms in more than half of its small all-reduces on this
// project's 2-core VM (benchmarks/results/collectives.md: each hand-off between gloo's threads on
// a busy core waits for the scheduler). Shared memory with a spinning wait is how DeepSpeed's and
// vLLM's CPU back-ends sum among the ranks of one host; neither is a dependency here.
//
// The wait: the train loop's ranks mostly arrive within microseconds of each other, and a short
// spin catches them with no system call (the small sums' latency). A peer that is further behind
// (a slow step, a checkpoint) or gone for good (a rank started without torchrun that died: no
// launcher stops the others) is waited for by sleeping, so the waiting rank leaves its core to
// its read-ahead thread or to others and costs ~nothing until the timeout (train.collective_timeout_s)
// names the late rank. The sleeps double from kFirstSleep to kMaxSleep: a peer that arrives during
// them is noticed at most ~1 ms (or twice the wait so far) late. The caller (torch.ops) releases the
// GIL while the op runs, so a rank's read-ahead thread keeps decoding while the rank waits.

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <thread>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MSREC_CPU_RELAX() _mm_pause()
#else
#define MSREC_CPU_RELAX() ((void)0)
#endif

namespace msrec {
namespace {

constexpr int64_t kLine = 64;        // bytes per flag: one cache line each, no false sharing
// The wait: spin (a pause per poll, ~10-40 ns) for kSpinTime, then sleep kFirstSleep, doubling up to kMaxSleep
constexpr std::chrono::microseconds kSpinTime{100};
constexpr std::chrono::microseconds kFirstSleep{10};
constexpr std::chrono::microseconds kMaxSleep{1000};

int64_t header_bytes(int64_t world) { return world * kLine; }

int64_t slot_capacity(int64_t region_bytes, int64_t world) {
  return (region_bytes - header_bytes(world)) / (2 * world) / kLine * kLine;
}

// rank's line: [0] the last round it published, [1 + parity] the elements it sent in the last
// round of that parity (per parity, like the slots: a peer may still check round r's lengths
// while this rank writes round r + 1's)
int64_t* flag(uint8_t* base, int64_t rank) { return reinterpret_cast<int64_t*>(base + rank * kLine); }
int64_t* length(uint8_t* base, int64_t rank, int64_t parity) { return flag(base, rank) + 1 + parity; }

uint8_t* slot(uint8_t* base, int64_t world, int64_t capacity, int64_t parity, int64_t rank) {
  return base + header_bytes(world) + (parity * world + rank) * capacity;
}

// Waits until every rank has published `round`; throws after timeout_s naming the first late rank.
void wait_for_peers(uint8_t* base, int64_t rank, int64_t world, int64_t round, double timeout_s) {
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  const auto spin_until = start + kSpinTime;
  const auto deadline = start + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(timeout_s));
  auto sleep = std::chrono::duration_cast<clock::duration>(kFirstSleep);  // one backoff for all peers of the wait
  bool spinning = true;
  for (int64_t p = 0; p < world; ++p) {
    if (p == rank) continue;
    int64_t polls = 0;
    while (__atomic_load_n(flag(base, p), __ATOMIC_ACQUIRE) < round) {
      if (spinning) {
        MSREC_CPU_RELAX();
        if ((++polls & 63) != 0) continue;  // the clock every 64 polls (~1-3 us)
        const auto now = clock::now();
        if (now < spin_until && now <= deadline) continue;
        spinning = false;
      } else {
        std::this_thread::sleep_for(std::min<clock::duration>(sleep, std::max<clock::duration>(deadline - clock::now(), clock::duration(0))));
        sleep = std::min<clock::duration>(sleep * 2, std::chrono::duration_cast<clock::duration>(kMaxSleep));
      }
      if (clock::now() > deadline && __atomic_load_n(flag(base, p), __ATOMIC_ACQUIRE) < round) {
        TORCH_CHECK(false, "msrec::shm_all_reduce_sum_: rank ", rank, " waited more than ", timeout_s,
                    " s for rank ", p, " in round ", round, " (rank ", p, " is at round ",
                    __atomic_load_n(flag(base, p), __ATOMIC_ACQUIRE), "): did it fail or leave the loop?");
      }
    }
  }
}

constexpr int64_t kBlock = 2048;  // elements of t per block: 8 KiB of float32, well inside L1

// out = ((slot[0] + slot[1]) + ...) / divisor, the slots added in rank order. A power-of-two
// divisor multiplies by its reciprocal: exact, so the same bits as the division.
template <typename scalar_t>
void sum_slots(uint8_t* base, int64_t world, int64_t capacity, int64_t parity, scalar_t* out, int64_t n,
               int64_t divisor) {
  const bool exact_reciprocal = (divisor & (divisor - 1)) == 0;
  const scalar_t inverse = scalar_t(1) / static_cast<scalar_t>(divisor);
  const scalar_t div = static_cast<scalar_t>(divisor);
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t m = std::min(kBlock, n - start);
    scalar_t* __restrict__ o = out + start;
    const scalar_t* __restrict__ s0 =
        reinterpret_cast<const scalar_t*>(slot(base, world, capacity, parity, 0)) + start;
    for (int64_t i = 0; i < m; ++i) o[i] = s0[i];
    for (int64_t p = 1; p < world; ++p) {
      const scalar_t* __restrict__ sp =
          reinterpret_cast<const scalar_t*>(slot(base, world, capacity, parity, p)) + start;
      for (int64_t i = 0; i < m; ++i) o[i] += sp[i];
    }
    if (divisor == 1) continue;
    if (exact_reciprocal) {
      for (int64_t i = 0; i < m; ++i) o[i] *= inverse;
    } else {
      for (int64_t i = 0; i < m; ++i) o[i] /= div;
    }
  }
}

// Rounds of one call: ceil(n / per_round) (none for an empty tensor: every rank skips it alike).
template <typename scalar_t>
int64_t reduce_in_rounds(scalar_t* data, int64_t n, uint8_t* base, int64_t rank, int64_t world, int64_t capacity,
                         int64_t round, double timeout_s, int64_t divisor) {
  const int64_t per_round = capacity / static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t start = 0; start < n; start += per_round) {
    const int64_t len = std::min(per_round, n - start);
    const int64_t parity = ++round & 1;
    std::memcpy(slot(base, world, capacity, parity, rank), data + start, len * sizeof(scalar_t));
    *length(base, rank, parity) = len;
    __atomic_store_n(flag(base, rank), round, __ATOMIC_RELEASE);  // publishes the slot and the length
    wait_for_peers(base, rank, world, round, timeout_s);
    for (int64_t p = 0; p < world; ++p) {
      TORCH_CHECK(*length(base, p, parity) == len, "msrec::shm_all_reduce_sum_: rank ", p, " sent ", *length(base, p, parity),
                  " elements in round ", round, ", rank ", rank, " ", len, ": the ranks' tensors differ in size");
    }
    sum_slots(base, world, capacity, parity, data + start, len, divisor);
  }
  return round;
}

int64_t shm_all_reduce_sum_(at::Tensor& t, const at::Tensor& region, int64_t rank, int64_t world,
                            int64_t done_rounds, double timeout_s, int64_t divisor) {
  const char* name = "msrec::shm_all_reduce_sum_";
  TORCH_CHECK(t.device().is_cpu() && region.device().is_cpu(), name, ": CPU tensors only");
  TORCH_CHECK(t.is_contiguous(), name, ": t must be contiguous");
  TORCH_CHECK(region.scalar_type() == at::kByte && region.dim() == 1 && region.is_contiguous(), name,
              ": region must be a contiguous 1-D uint8 tensor");
  TORCH_CHECK(world >= 1 && rank >= 0 && rank < world, name, ": rank ", rank, " outside a world of ", world);
  TORCH_CHECK(done_rounds >= 0, name, ": done_rounds must be >= 0");
  TORCH_CHECK(divisor >= 1, name, ": divisor must be >= 1, got ", divisor);
  TORCH_CHECK(divisor == 1 || c10::isFloatingType(t.scalar_type()), name, ": a divisor needs a floating type, got ",
              t.scalar_type());
  const int64_t capacity = slot_capacity(region.numel(), world);
  TORCH_CHECK(capacity >= 8, name, ": a region of ", region.numel(), " bytes holds no slot for a world of ", world);
  uint8_t* base = region.data_ptr<uint8_t>();
  TORCH_CHECK(reinterpret_cast<uintptr_t>(base) % kLine == 0, name, ": region must be 64-byte aligned");
  const int64_t n = t.numel();
  switch (t.scalar_type()) {
    case at::kFloat:
      return reduce_in_rounds(t.data_ptr<float>(), n, base, rank, world, capacity, done_rounds, timeout_s, divisor);
    case at::kDouble:
      return reduce_in_rounds(t.data_ptr<double>(), n, base, rank, world, capacity, done_rounds, timeout_s, divisor);
    case at::kLong:
      return reduce_in_rounds(t.data_ptr<int64_t>(), n, base, rank, world, capacity, done_rounds, timeout_s, 1);
    case at::kInt:
      return reduce_in_rounds(t.data_ptr<int32_t>(), n, base, rank, world, capacity, done_rounds, timeout_s, 1);
    default:
      TORCH_CHECK(false, name, ": float32, float64, int64 or int32 only, got ", t.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(msrec, m) {
  m.def("shm_all_reduce_sum_(Tensor(a!) t, Tensor region, int rank, int world, int done_rounds, float timeout_s, "
        "int divisor=1) -> int");
}

TORCH_LIBRARY_IMPL(msrec, CPU, m) {
  m.impl("shm_all_reduce_sum_", &shm_all_reduce_sum_);
}

}  // namespace msrec
