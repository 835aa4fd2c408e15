// The SIMT emulator (emu/emulator.h): fibers, the block scheduler, barriers and warp collectives,
// the shared-memory shadow (bounds, poison, cp.async, races, bank conflicts) and the launch.
#include "emu/emulator.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <unordered_map>

#include "core/errors.h"

#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
#define LLMK_EMU_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

namespace llmk::emu {

thread_local const ThreadCoordinates* current_coordinates = nullptr;

// -- settings -------------------------------------------------------------------------------------------
namespace {
std::mutex settings_mutex;
Settings global_settings;
}  // namespace

Settings settings() {
  std::lock_guard<std::mutex> lock(settings_mutex);
  return global_settings;
}
void set_settings(const Settings& s) {
  std::lock_guard<std::mutex> lock(settings_mutex);
  global_settings = s;
}

namespace {

// -- fibers: a hand-written x86-64 switch (~10 ns; glibc's swapcontext makes a signal-mask system
// call per switch, ~160 ns) or ucontext elsewhere and under AddressSanitizer (which understands it).
constexpr size_t kStackBytes = 256 * 1024;  // virtual; the measured high-water mark is a few KB

#if defined(LLMK_EMU_ASM_SWITCH)
extern "C" void llmk_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl llmk_emu_switch
  .type llmk_emu_switch,@function
llmk_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size llmk_emu_switch,.-llmk_emu_switch
  .section .note.GNU-stack,"",@progbits
  .text
)");
#endif

struct Stack {
  uint8_t* base = nullptr;  // guard page first
  size_t bytes = 0;
  Stack() {
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    bytes = kStackBytes + page;
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw EmulatorError("emulator: cannot map a fiber stack");
    base = static_cast<uint8_t*>(p);
    mprotect(base, page, PROT_NONE);
  }
  ~Stack() { if (base) munmap(base, bytes); }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  uint8_t* top() const { return base + bytes; }
};

enum class Status : uint8_t { ready, barrier, warp, exited };

struct PendingCopy {
  uint8_t* destination;
  uint8_t data[16];
  int bytes;
  int64_t group;
  Site site;
};

struct Rendezvous {
  bool active = false;
  const char* what = nullptr;
  uint32_t mask = 0, arrived = 0;
  Site site;
  int first_lane = 0;
  CombineFn combine = nullptr;  // the first lane's (every lane passes the same operation)
  void* context = nullptr;
  const void* inputs[32];
  void* outputs[32];
};

struct Thread {
  ThreadCoordinates coordinates;
  int lane = 0, warp = 0;
  Status status = Status::ready;
  bool yielded = false;  // its last run ended in a spin-wait's yield (__nanosleep)
  const char* wait_what = "";
  Site wait_site;
  uint32_t wait_mask = 0;
  std::vector<PendingCopy> copies;
  int64_t open_group = 0;  // the group new copies join; commit closes it
  std::vector<uint32_t> occurrences;  // per interned site: this thread's accesses there (bank log)
  Stack* stack = nullptr;
#if defined(LLMK_EMU_ASM_SWITCH)
  void* sp = nullptr;
#else
  ucontext_t context;
#endif
};

struct Warp {
  Rendezvous rendezvous[8];
  uint32_t sync_seq = 0;               // completed __syncwarp()s
  uint32_t synced_with[32][32];        // [a][b]: seq of the last __syncwarp() holding lanes a and b
};

// The shadow of one byte of shared memory.
enum : uint8_t { kUnwritten = 0, kPending = 1, kWritten = 2 };
// The reads since the last write are kept as a set: the lanes of one warp (`reader_lanes` of
// `reader`'s warp, with the largest __syncwarp count any of them read at) plus one reader from
// another warp, if any, all in barrier epoch `read_epoch`.
struct Shadow {
  uint8_t state;
  uint16_t writer, reader, other_warp_reader;  // thread indices
  uint32_t reader_lanes;
  uint32_t write_epoch, read_epoch, write_seq, read_seq, write_site, read_site;
};
constexpr uint16_t kNobody = 0xffff;

struct BankRecord {
  uint32_t warp, site, occurrence, lane, offset, bytes;
};

struct Launch {
  const char* name;
  Dim3 grid, block;
  size_t shared_bytes;
  KernelBody body;
  void* context;
  std::vector<MemoryRange> operands;  // sorted by begin
  Settings settings;
};

// -- interned source sites ---------------------------------------------------------------------------
std::mutex sites_mutex;
std::vector<Site> site_table;
std::map<std::pair<const char*, int>, uint32_t> site_ids;

uint32_t intern(Site site) {
  thread_local std::unordered_map<const char*, std::unordered_map<int, uint32_t>> cache;
  auto& by_line = cache[site.file];
  auto found = by_line.find(site.line);
  if (found != by_line.end()) return found->second;
  std::lock_guard<std::mutex> lock(sites_mutex);
  auto [it, inserted] = site_ids.emplace(std::make_pair(site.file, site.line), uint32_t(site_table.size()));
  if (inserted) site_table.push_back(site);
  by_line[site.line] = it->second;
  return it->second;
}

std::string site_str(Site site) {
  const char* file = site.file;
  if (const char* csrc = std::strstr(file, "csrc/")) file = csrc + 5;
  return detail::concat(file, ":", site.line);
}
std::string site_str(uint32_t id) {
  std::lock_guard<std::mutex> lock(sites_mutex);
  return id < site_table.size() ? site_str(site_table[id]) : "?";
}

std::string dim_str(Index3 i) { return detail::concat("(", i.x, ",", i.y, ",", i.z, ")"); }
std::string dim_str(Dim3 i) { return detail::concat("(", i.x, ",", i.y, ",", i.z, ")"); }
std::string hex(uint32_t v) {
  char buffer[16];
  std::snprintf(buffer, sizeof buffer, "0x%08x", v);
  return buffer;
}

// -- the report -----------------------------------------------------------------------------------------
struct ReportEntry {
  KernelReport totals;
  std::map<uint32_t, int64_t> conflicts;  // site id -> extra wavefronts
};
std::mutex report_mutex;
std::map<std::string, ReportEntry> report_entries;

// -- one block's execution (one per OS thread, reused) ----------------------------------------------------
struct Block {
  const Launch* launch = nullptr;
  Index3 index{0, 0, 0};
  int64_t linear_index = 0;
  int threads_per_block = 0;
  std::vector<Thread> threads;
  std::vector<std::unique_ptr<Stack>> stacks;
  std::vector<Warp> warps;
  Thread* current = nullptr;
  uint32_t epoch = 0;          // completed __syncthreads()
  int barrier_arrived = 0;
  Site barrier_site;
  int barrier_first_thread = 0;
  std::vector<uint8_t> shared;
  std::vector<Shadow> shadow;
  std::vector<BankRecord> bank_log;
  std::exception_ptr error;
  std::mt19937_64 rng;
  // bank statistics of this block, merged into the report at its end
  int64_t accesses = 0, wavefronts = 0, ideal = 0;
  std::map<uint32_t, int64_t> conflicts;
#if defined(LLMK_EMU_ASM_SWITCH)
  void* scheduler_sp = nullptr;
#else
  ucontext_t scheduler_context;
#endif
};

thread_local Block* this_block = nullptr;

Block& block() {
  if (!this_block || !this_block->current)
    throw EmulatorError("a device function ran outside an emulated kernel (call it from a kernel launched with llmk::launch)");
  return *this_block;
}
Thread& thread() { return *block().current; }

std::string who(const Block& b, const Thread& t) {
  return detail::concat("kernel '", b.launch->name, "' block ", dim_str(b.index), " thread ",
                        dim_str(t.coordinates.thread_idx), " (warp ", t.warp, ", lane ", t.lane, ")");
}

// Back to the scheduler; returns when the scheduler runs this thread again.
void suspend() {
  Block& b = *this_block;
  Thread& t = *b.current;
#if defined(LLMK_EMU_ASM_SWITCH)
  llmk_emu_switch(&t.sp, b.scheduler_sp);
#else
  swapcontext(&t.context, &b.scheduler_context);
#endif
}

bool try_complete(Block& b, int warp, Rendezvous& r);

[[noreturn]] void fiber_main() {
  Block& b = *this_block;
  try {
    b.launch->body(b.launch->context);
  } catch (...) {
    if (!b.error) b.error = std::current_exception();
  }
  Thread& t = *b.current;
  t.status = Status::exited;
  t.copies.clear();
  // Collectives this lane's warp waits in may now have every remaining lane.
  try {
    for (Rendezvous& r : b.warps[t.warp].rendezvous)
      if (r.active && ((r.mask >> t.lane) & 1u)) try_complete(b, t.warp, r);
  } catch (...) {
    if (!b.error) b.error = std::current_exception();
  }
  suspend();
  std::abort();  // never resumed
}

#if !defined(LLMK_EMU_ASM_SWITCH)
extern "C" void llmk_emu_fiber_entry() { fiber_main(); }
#endif

void start_fiber(Block& b, Thread& t) {
#if defined(LLMK_EMU_ASM_SWITCH)
  // The stack as llmk_emu_switch expects to find it: mxcsr/x87 control, r15..rbp, return address.
  uintptr_t top = reinterpret_cast<uintptr_t>(t.stack->top()) & ~uintptr_t(15);
  auto* sp = reinterpret_cast<uint64_t*>(top - 8 * 8 - 8);  // sp = 8 (mod 16): entry sees a call's alignment
  uint32_t control[2];
  asm volatile("stmxcsr %0" : "=m"(control[0]));
  asm volatile("fnstcw %0" : "=m"(control[1]));
  std::memcpy(&sp[0], control, 8);
  for (int i = 1; i <= 6; ++i) sp[i] = 0;
  sp[7] = reinterpret_cast<uint64_t>(&fiber_main);
  sp[8] = 0;  // fiber_main's "return address": none
  t.sp = sp;
  (void)b;
#else
  getcontext(&t.context);
  t.context.uc_stack.ss_sp = t.stack->base + size_t(sysconf(_SC_PAGESIZE));
  t.context.uc_stack.ss_size = kStackBytes;
  t.context.uc_link = nullptr;
  makecontext(&t.context, llmk_emu_fiber_entry, 0);
  (void)b;
#endif
}

void resume(Block& b, Thread& t) {
  b.current = &t;
  current_coordinates = &t.coordinates;
#if defined(LLMK_EMU_ASM_SWITCH)
  llmk_emu_switch(&b.scheduler_sp, t.sp);
#else
  swapcontext(&b.scheduler_context, &t.context);
#endif
  b.current = nullptr;
  current_coordinates = nullptr;
}

// -- bank conflicts ---------------------------------------------------------------------------------------
// Shared memory has 32 banks of 4 bytes. A warp-wide access is served in phases (all 32 lanes for
// accesses of up to 4 bytes, half-warps for 8 bytes, quarter-warps for 16 bytes: 128 bytes a phase);
// a phase costs as many wavefronts as the largest number of distinct 4-byte words one bank serves.
void flush_bank_log(Block& b) {
  auto& log = b.bank_log;
  if (log.empty()) return;
  std::sort(log.begin(), log.end(), [](const BankRecord& x, const BankRecord& y) {
    return std::tie(x.warp, x.site, x.occurrence, x.lane) < std::tie(y.warp, y.site, y.occurrence, y.lane);
  });
  size_t i = 0;
  while (i < log.size()) {
    size_t j = i;
    while (j < log.size() && log[j].warp == log[i].warp && log[j].site == log[i].site &&
           log[j].occurrence == log[i].occurrence)
      ++j;
    // one warp-wide access: records i..j
    uint32_t width = 0;
    for (size_t k = i; k < j; ++k) width = std::max(width, log[k].bytes);
    const uint32_t lanes_per_phase = width <= 4 ? 32 : 128 / std::min<uint32_t>(width, 16);
    int64_t cost = 0, phases = 0;
    for (uint32_t phase_begin = 0; phase_begin < 32; phase_begin += lanes_per_phase) {
      // distinct words per bank among the lanes of this phase
      uint32_t words[32][32];
      int counts[32] = {0};
      bool any = false;
      for (size_t k = i; k < j; ++k) {
        if (log[k].lane < phase_begin || log[k].lane >= phase_begin + lanes_per_phase) continue;
        any = true;
        for (uint32_t word = log[k].offset / 4; word <= (log[k].offset + log[k].bytes - 1) / 4; ++word) {
          const uint32_t bank = word % 32;
          bool seen = false;
          for (int c = 0; c < counts[bank]; ++c) seen |= words[bank][c] == word;
          if (!seen && counts[bank] < 32) words[bank][counts[bank]++] = word;
        }
      }
      if (!any) continue;
      ++phases;
      cost += *std::max_element(counts, counts + 32);
    }
    b.accesses += 1;
    b.wavefronts += cost;
    b.ideal += phases;
    if (cost > phases) b.conflicts[log[i].site] += cost - phases;
    i = j;
  }
  log.clear();
}

void record_bank_access(Block& b, Thread& t, uint32_t site, size_t offset, size_t bytes) {
  if (t.occurrences.size() <= site) t.occurrences.resize(site + 1, 0);
  b.bank_log.push_back(BankRecord{uint32_t(t.warp), site, t.occurrences[site]++, uint32_t(t.lane),
                                  uint32_t(offset), uint32_t(bytes)});
}

// -- races -----------------------------------------------------------------------------------------------
// Did thread `other`'s access (made at barrier epoch `epoch`, when its warp had completed `seq`
// __syncwarp()s) happen before the running thread's access now?
bool ordered(const Block& b, const Thread& t, uint16_t other, uint32_t epoch, uint32_t seq) {
  if (other == kNobody || other == uint16_t(t.coordinates.linear)) return true;
  if (epoch < b.epoch) return true;
  const Thread& o = b.threads[other];
  if (o.warp != t.warp) return false;
  return b.warps[t.warp].synced_with[t.lane][o.lane] > seq;
}

void report_race(Block& b, const char* mine, const char* theirs, uint16_t other,
                 uint32_t other_site, size_t offset, Site site) {
  fail(detail::concat("data race on shared memory byte ", offset, ": this thread ", mine, " it at ",
                      site_str(site), ", thread ", dim_str(b.threads[other].coordinates.thread_idx),
                      " ", theirs, " it at ", site_str(other_site),
                      ", with no __syncthreads() (or __syncwarp() of both) between"),
       site);
}

// An access of a power-of-two size must be aligned to it (PTX: a vector access faults otherwise).
void check_alignment(const void* address, size_t bytes, const char* space, bool write, Site site) {
  if ((bytes & (bytes - 1)) == 0 && reinterpret_cast<uintptr_t>(address) % bytes != 0)
    fail(detail::concat(space, " ", write ? "write" : "read", " of ", bytes, " bytes at an address not aligned to ",
                        bytes, " bytes (a misaligned-address fault on the GPU)"), site);
}

// The first reader of byte `s`'s recorded reads that the running thread's access is not ordered
// after, or kNobody.
uint16_t unordered_reader(const Block& b, const Thread& t, const Shadow& s) {
  if (s.read_epoch < b.epoch || s.reader == kNobody) return kNobody;
  const Thread& first = b.threads[s.reader];
  const int base = first.warp * 32;
  for (uint32_t lanes = s.reader_lanes; lanes; lanes &= lanes - 1) {
    const int lane = __builtin_ctz(lanes);
    const uint16_t r = uint16_t(base + lane);
    if (!ordered(b, t, r, s.read_epoch, s.read_seq)) return r;
  }
  if (s.other_warp_reader != kNobody && !ordered(b, t, s.other_warp_reader, s.read_epoch, s.read_seq))
    return s.other_warp_reader;
  return kNobody;
}

void shared_access(const void* address, size_t bytes, bool write, Site site, bool from_async = false) {
  Block& b = block();
  Thread& t = *b.current;
  const uint8_t* base = b.shared.data();
  const auto* p = static_cast<const uint8_t*>(address);
  if (p < base || p + bytes > base + b.shared.size() || bytes == 0)
    fail(detail::concat("shared-memory ", write ? "write" : "read", " of ", bytes, " bytes at ",
                        p >= base ? detail::concat("offset ", p - base) : std::string("an address below the base"),
                        " is outside the block's ", b.shared.size(), " bytes of dynamic shared memory"),
         site);
  check_alignment(address, bytes, "shared-memory", write, site);
  const size_t offset = size_t(p - base);
  const uint32_t site_id = intern(site);
  const uint16_t me = uint16_t(t.coordinates.linear);
  const uint32_t seq = b.warps[t.warp].sync_seq;
  for (size_t k = offset; k < offset + bytes; ++k) {
    Shadow& s = b.shadow[k];
    if (s.state == kPending) {
      const std::string copy = detail::concat("the cp.async that writes byte ", k, " (issued by thread ",
                                              dim_str(b.threads[s.writer].coordinates.thread_idx), " at ",
                                              site_str(s.write_site), ")");
      if (!write)
        fail(detail::concat("shared-memory read of ", bytes, " bytes at offset ", offset, " before ", copy,
                            " completed: a missing cp_async_wait()"), site);
      fail(detail::concat(from_async ? "cp.async to " : "shared-memory write of ", bytes, " bytes at offset ", offset,
                          " while ", copy, " is in flight: its data would land later (a missing cp_async_wait()"
                          " or barrier)"), site);
    }
    if (!write) {
      if (s.state == kUnwritten)
        fail(detail::concat("shared-memory read of ", bytes, " bytes at offset ", offset, " before byte ", k,
                            " was written (shared memory is poisoned at block start)"), site);
      if (!ordered(b, t, s.writer, s.write_epoch, s.write_seq))
        report_race(b, "reads", "wrote", s.writer, s.write_site, k, site);
      if (s.read_epoch < b.epoch || s.reader == kNobody) {  // a new set of readers
        s.reader = me;
        s.reader_lanes = 1u << t.lane;
        s.other_warp_reader = kNobody;
        s.read_epoch = b.epoch;
        s.read_seq = seq;
        s.read_site = site_id;
      } else if (b.threads[s.reader].warp == t.warp) {
        s.reader_lanes |= 1u << t.lane;
        s.read_seq = std::max(s.read_seq, seq);
      } else {
        s.other_warp_reader = me;
      }
    } else {
      if (!ordered(b, t, s.writer, s.write_epoch, s.write_seq))
        report_race(b, "writes", "wrote", s.writer, s.write_site, k, site);
      const uint16_t reader = unordered_reader(b, t, s);
      if (reader != kNobody) report_race(b, "writes", "read", reader, s.read_site, k, site);
      s.state = from_async ? kPending : kWritten;
      s.writer = me;
      s.write_epoch = b.epoch;
      s.write_seq = seq;
      s.write_site = site_id;
      s.reader = kNobody;
      s.reader_lanes = 0;
      s.other_warp_reader = kNobody;
    }
  }
  record_bank_access(b, t, site_id, offset, bytes);
}

// -- the scheduler ---------------------------------------------------------------------------------------
std::string deadlock_report(const Block& b, const std::string& header = "") {
  std::ostringstream out;
  if (header.empty())
    out << "deadlock in kernel '" << b.launch->name << "' block " << dim_str(b.index)
        << ": no thread can continue. Where each thread is:";
  else
    out << header << " Where each thread is:";
  int k = 0;
  const int n = b.threads_per_block;
  while (k < n) {
    const Thread& t = b.threads[k];
    auto describe = [](const Thread& x) {
      switch (x.status) {
        case Status::exited: return std::string("exited");
        case Status::barrier: return "waits at __syncthreads() at " + site_str(x.wait_site);
        case Status::warp:
          return detail::concat("waits at ", x.wait_what, "(mask ", hex(x.wait_mask), ") at ", site_str(x.wait_site));
        default: return std::string(x.yielded ? "spins (__nanosleep) at " + site_str(x.wait_site) : "runnable");
      }
    };
    const std::string d = describe(t);
    int e = k + 1;
    while (e < n && describe(b.threads[e]) == d) ++e;
    out << "\n  threads " << k << ".." << e - 1 << ": " << d;
    k = e;
  }
  return out.str();
}

void run_block(Block& b, const Launch& launch, int64_t linear_index) {
  b.launch = &launch;
  b.linear_index = linear_index;
  const Dim3 g = launch.grid, d = launch.block;
  b.index = Index3{unsigned(linear_index % g.x), unsigned((linear_index / g.x) % g.y),
                   unsigned(linear_index / (int64_t(g.x) * g.y))};
  const int n = int(d.x * d.y * d.z);
  b.threads_per_block = n;
  if (int(b.threads.size()) < n) b.threads.resize(n);
  while (int(b.stacks.size()) < n) b.stacks.push_back(std::make_unique<Stack>());
  const int num_warps = (n + 31) / 32;
  if (int(b.warps.size()) < num_warps) b.warps.resize(num_warps);
  for (int w = 0; w < num_warps; ++w) {
    Warp& warp = b.warps[w];
    for (auto& r : warp.rendezvous) r.active = false;
    warp.sync_seq = 0;
    std::memset(warp.synced_with, 0, sizeof warp.synced_with);
  }
  b.epoch = 0;
  b.barrier_arrived = 0;
  b.error = nullptr;
  b.shared.assign(launch.shared_bytes, 0xff);  // poison: NaN in every float format
  b.shadow.assign(launch.shared_bytes, Shadow{kUnwritten, kNobody, kNobody, kNobody, 0, 0, 0, 0, 0, 0, 0});
  b.bank_log.clear();
  b.rng.seed(launch.settings.seed * 0x9e3779b97f4a7c15ull + uint64_t(linear_index));
  for (int i = 0; i < n; ++i) {
    Thread& t = b.threads[i];
    t.coordinates = ThreadCoordinates{Index3{unsigned(i % d.x), unsigned((i / d.x) % d.y), unsigned(i / (d.x * d.y))},
                                      b.index, d, g, i};
    t.lane = i % 32;
    t.warp = i / 32;
    t.status = Status::ready;
    t.copies.clear();
    t.open_group = 0;
    std::fill(t.occurrences.begin(), t.occurrences.end(), 0);
    t.stack = b.stacks[i].get();
    start_fiber(b, t);
  }

  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  // Rounds in which every thread that ran only yielded (spin-waits): a flag nobody sets would
  // otherwise spin forever. 2^20 rounds is seconds of emulation.
  constexpr int64_t kMaxSpinRounds = int64_t(1) << 20;
  int64_t spin_rounds = 0;
  for (;;) {
    if (launch.settings.schedule == Schedule::shuffled) std::shuffle(order.begin(), order.end(), b.rng);
    bool progress = false, only_yields = true, all_exited = true;
    for (int i : order) {
      Thread& t = b.threads[i];
      if (t.status == Status::ready) {
        progress = true;
        t.yielded = false;
        resume(b, t);
        only_yields &= t.yielded;
        if (b.error) std::rethrow_exception(b.error);
      }
    }
    for (int i = 0; i < n; ++i) all_exited &= b.threads[i].status == Status::exited;
    if (all_exited) break;
    if (!progress) throw EmulatorError(deadlock_report(b));
    spin_rounds = only_yields ? spin_rounds + 1 : 0;
    if (spin_rounds > kMaxSpinRounds)
      throw EmulatorError(deadlock_report(
          b, detail::concat("kernel '", launch.name, "' block ", dim_str(b.index), ": every running thread has only ",
                            "spun (__nanosleep) for ", kMaxSpinRounds, " rounds: a wait on a flag that nothing sets? ",
                            "(or that another block sets: blocks are not guaranteed to run concurrently)")));
  }
  flush_bank_log(b);
}

thread_local std::vector<MemoryRange>* operand_ranges = nullptr;

}  // namespace

// -- the interface ------------------------------------------------------------------------------------------

OperandScope::OperandScope(std::vector<MemoryRange> ranges)
    : previous_(operand_ranges), ranges_(std::move(ranges)) {
  operand_ranges = &ranges_;
}
OperandScope::~OperandScope() { operand_ranges = const_cast<std::vector<MemoryRange>*>(previous_); }

[[noreturn]] void fail(const std::string& message, Site site) {
  Block* b = this_block;
  if (b && b->current)
    throw EmulatorError(detail::concat(who(*b, *b->current), " at ", site_str(site), ": ", message));
  throw EmulatorError(detail::concat("emulator at ", site_str(site), ": ", message));
}

void launch(const char* name, Dim3 grid, Dim3 block_dim, size_t shared_bytes, KernelBody body, void* context) {
  // What the hardware refuses (cudaErrorInvalidConfiguration / shared memory over the opt-in limit).
  const int64_t threads = int64_t(block_dim.x) * block_dim.y * block_dim.z;
  LLMK_CHECK(threads >= 1 && threads <= 1024 && block_dim.x <= 1024 && block_dim.y <= 1024 && block_dim.z <= 64,
             EmulatorError, "launch of kernel '", name, "' refused: block ", dim_str(block_dim),
             " (at most 1024 threads, dimensions up to (1024,1024,64))");
  LLMK_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 2147483647u && grid.y <= 65535 && grid.z <= 65535,
             EmulatorError, "launch of kernel '", name, "' refused: grid ", dim_str(grid),
             " (x up to 2^31-1, y and z up to 65535, none 0)");
  LLMK_CHECK(shared_bytes <= kMaxDynamicSharedBytes, EmulatorError, "launch of kernel '", name, "' refused: ",
             shared_bytes, " bytes of dynamic shared memory is over the ", kMaxDynamicSharedBytes,
             "-byte opt-in limit of the smallest supported GPU (sm_86/sm_89)");
  LLMK_CHECK(operand_ranges != nullptr, EmulatorError, "emulated launch of kernel '", name,
             "' has no operands: launch it through run_on_backend (core/backend.h) or an emu::OperandScope");
  Launch launch;
  launch.name = name;
  launch.grid = grid;
  launch.block = block_dim;
  launch.shared_bytes = shared_bytes;
  launch.body = body;
  launch.context = context;
  launch.settings = settings();
  for (const MemoryRange& r : *operand_ranges)
    if (r.begin != r.end) launch.operands.push_back(r);
  std::sort(launch.operands.begin(), launch.operands.end(),
            [](const MemoryRange& a, const MemoryRange& b) { return a.begin < b.begin; });

  const int64_t blocks = int64_t(grid.x) * grid.y * grid.z;
  std::mutex error_mutex;
  int64_t error_block = -1;
  std::exception_ptr error;
  std::atomic<bool> failed{false};
  int64_t total_accesses = 0, total_wavefronts = 0, total_ideal = 0;
  std::map<uint32_t, int64_t> total_conflicts;
#pragma omp parallel
  {
    thread_local Block runner;
    runner.accesses = runner.wavefronts = runner.ideal = 0;
    runner.conflicts.clear();
#pragma omp for schedule(dynamic, 1)
    for (int64_t index = 0; index < blocks; ++index) {
      if (failed.load(std::memory_order_relaxed)) continue;
      Block* saved = this_block;
      this_block = &runner;
      try {
        run_block(runner, launch, index);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (error_block < 0 || index < error_block) {
          error_block = index;
          error = std::current_exception();
        }
        failed = true;
      }
      runner.current = nullptr;
      this_block = saved;
    }
    std::lock_guard<std::mutex> lock(error_mutex);
    total_accesses += runner.accesses;
    total_wavefronts += runner.wavefronts;
    total_ideal += runner.ideal;
    for (auto& [site, extra] : runner.conflicts) total_conflicts[site] += extra;
  }
  {
    std::lock_guard<std::mutex> lock(report_mutex);
    ReportEntry& entry = report_entries[name];
    entry.totals.kernel = name;
    entry.totals.launches += 1;
    entry.totals.blocks += blocks;
    entry.totals.threads += blocks * threads;
    entry.totals.shared_accesses += total_accesses;
    entry.totals.shared_wavefronts += total_wavefronts;
    entry.totals.shared_ideal_wavefronts += total_ideal;
    for (auto& [site, extra] : total_conflicts) entry.conflicts[site] += extra;
  }
  if (error) std::rethrow_exception(error);
}

void syncthreads(Site site) {
  Block& b = block();
  Thread& t = *b.current;
  if (b.barrier_arrived == 0) {
    b.barrier_site = site;
    b.barrier_first_thread = t.coordinates.linear;
  } else if (b.barrier_site.line != site.line || std::strcmp(b.barrier_site.file, site.file) != 0) {
    fail(detail::concat("__syncthreads() reached at two places: here, and at ", site_str(b.barrier_site),
                        " by thread ", dim_str(b.threads[b.barrier_first_thread].coordinates.thread_idx),
                        " (a barrier in divergent code)"), site);
  }
  if (++b.barrier_arrived == b.threads_per_block) {
    b.barrier_arrived = 0;
    ++b.epoch;
    flush_bank_log(b);
    for (int i = 0; i < b.threads_per_block; ++i)
      if (b.threads[i].status == Status::barrier) b.threads[i].status = Status::ready;
    t.status = Status::ready;  // let the scheduler order who runs first after the barrier
  } else {
    t.status = Status::barrier;
    t.wait_site = site;
  }
  suspend();
}

namespace {

// Lanes of `warp` that have exited, or that the block does not have (a partial last warp): PTX's
// warp collectives wait only for the non-exited lanes of their mask.
uint32_t gone_lanes(const Block& b, int warp) {
  uint32_t gone = 0;
  for (int l = 0; l < 32; ++l) {
    const int index = warp * 32 + l;
    if (index >= b.threads_per_block || b.threads[index].status == Status::exited) gone |= 1u << l;
  }
  return gone;
}

// Runs the rendezvous' operation when every lane of its mask that is still there has arrived.
bool try_complete(Block& b, int warp, Rendezvous& r) {
  const uint32_t required = r.mask & ~gone_lanes(b, warp);
  if (r.arrived == 0 || (r.arrived & required) != required) return false;
  r.active = false;
  r.combine(r.context, r.inputs, r.outputs);
  for (int l = 0; l < 32 && warp * 32 + l < b.threads_per_block; ++l) {
    Thread& other = b.threads[warp * 32 + l];
    if (((r.mask >> l) & 1u) && other.status == Status::warp) other.status = Status::ready;
  }
  return true;
}

}  // namespace

void warp_collective(const char* what, uint32_t mask, const void* input, void* output, CombineFn combine,
                     void* context, Site site) {
  Block& b = block();
  Thread& t = *b.current;
  const uint32_t bit = 1u << t.lane;
  if (!(mask & bit)) fail(detail::concat(what, " with mask ", hex(mask), " that excludes the calling lane ", t.lane), site);
  Warp& w = b.warps[t.warp];
  Rendezvous* r = nullptr;
  for (auto& candidate : w.rendezvous) {
    if (!candidate.active || !(candidate.mask & mask)) continue;
    if (candidate.mask != mask || std::strcmp(candidate.what, what) != 0)
      fail(detail::concat("lanes of warp ", t.warp, " disagree: lane ", t.lane, " calls ", what, "(mask ", hex(mask),
                          ") while lane ", candidate.first_lane, " waits in ", candidate.what, "(mask ",
                          hex(candidate.mask), ") at ", site_str(candidate.site)), site);
    r = &candidate;
  }
  if (!r) {
    for (auto& candidate : w.rendezvous)
      if (!candidate.active) { r = &candidate; break; }
    if (!r) fail("more than 8 warp collectives with disjoint masks in flight in one warp", site);
    r->active = true;
    r->what = what;
    r->mask = mask;
    r->arrived = 0;
    r->site = site;
    r->first_lane = t.lane;
    r->combine = combine;
    r->context = context;
    for (int l = 0; l < 32; ++l) { r->inputs[l] = nullptr; r->outputs[l] = nullptr; }
  }
  r->inputs[t.lane] = input;
  r->outputs[t.lane] = output;
  r->arrived |= bit;
  if (try_complete(b, t.warp, *r)) {
    t.status = Status::ready;  // let the scheduler order who runs first after the collective
  } else {
    t.status = Status::warp;
    t.wait_what = what;
    t.wait_site = site;
    t.wait_mask = mask;
  }
  suspend();
}

void syncwarp(uint32_t mask, Site site) {
  auto combine = [](void* context, const void* const*, void* const*) {
    const uint32_t m = *static_cast<uint32_t*>(context);
    Block& b = *this_block;
    Warp& w = b.warps[b.current->warp];
    const uint32_t seq = ++w.sync_seq;
    for (int a = 0; a < 32; ++a)
      for (int c = 0; c < 32; ++c)
        if (((m >> a) & 1u) && ((m >> c) & 1u)) w.synced_with[a][c] = seq;
  };
  int unused = 0;
  warp_collective("__syncwarp", mask, &unused, &unused, combine, &mask, site);
}

uint32_t active_mask() {
  Block& b = block();
  const Thread& t = *b.current;
  uint32_t mask = 0;
  const int first = t.warp * 32;
  for (int l = 0; l < 32 && first + l < b.threads_per_block; ++l)
    if (b.threads[first + l].status != Status::exited) mask |= 1u << l;
  return mask;
}

int lane_id() { return thread().lane; }

void yield(Site site) {
  Thread& t = thread();
  t.status = Status::ready;
  t.yielded = true;
  t.wait_site = site;
  suspend();
}

uint8_t* dynamic_shared_base() { return block().shared.data(); }
size_t dynamic_shared_bytes() { return block().shared.size(); }

void shared_read(const void* address, size_t bytes, Site site) { shared_access(address, bytes, false, site); }
void shared_write(const void* address, size_t bytes, Site site) { shared_access(address, bytes, true, site); }

void global_access(const void* address, size_t bytes, bool write, Site site) {
  const Block& b = block();
  check_alignment(address, bytes, "global-memory", write, site);
  const auto& ranges = b.launch->operands;
  const auto* p = static_cast<const uint8_t*>(address);
  // the last range starting at or before p, and the few before it (ranges may overlap)
  auto it = std::upper_bound(ranges.begin(), ranges.end(), address,
                             [](const void* a, const MemoryRange& r) { return a < r.begin; });
  for (int steps = 0; it != ranges.begin() && steps < 16; ++steps) {
    --it;
    if (p >= static_cast<const uint8_t*>(it->begin) && p + bytes <= static_cast<const uint8_t*>(it->end)) return;
  }
  std::string nearest = "no operand";
  for (const MemoryRange& r : ranges) {
    const auto* begin = static_cast<const uint8_t*>(r.begin);
    const auto* end = static_cast<const uint8_t*>(r.end);
    if (p + bytes > begin && p < end + 4096 && p + 4096 > begin)
      nearest = detail::concat(r.name, " [", end - begin, " bytes], at byte offset ", p - begin);
  }
  fail(detail::concat("global-memory ", write ? "write" : "read", " of ", bytes, " bytes outside the kernel's operands (",
                      "nearest: ", nearest, ")"), site);
}

void atomic_access(const void* address, size_t bytes, Site site) {
  Block& b = block();
  const auto* p = static_cast<const uint8_t*>(address);
  const uint8_t* base = b.shared.data();
  if (p >= base && p < base + b.shared.size()) {
    if (p + bytes > base + b.shared.size())
      fail(detail::concat("atomic of ", bytes, " bytes at shared offset ", p - base, " past the block's ",
                          b.shared.size(), " bytes"), site);
    return;
  }
  // (A static __shared__ variable is neither: the emulator cannot see it. Kernels keep their shared
  // memory in dynamic_shared_memory(); docs/emulator.md.)
  global_access(address, bytes, true, site);
}

void cp_async(void* destination, const void* source, int copy_bytes, int source_bytes, Site site) {
  Block& b = block();
  Thread& t = *b.current;
  if (!(copy_bytes == 4 || copy_bytes == 8 || copy_bytes == 16))
    fail(detail::concat("cp.async of ", copy_bytes, " bytes (4, 8 or 16)"), site);
  if (source_bytes < 0 || source_bytes > copy_bytes)
    fail(detail::concat("cp.async source size ", source_bytes, " outside [0, ", copy_bytes, "]"), site);
  if (reinterpret_cast<uintptr_t>(destination) % copy_bytes || (source_bytes > 0 && reinterpret_cast<uintptr_t>(source) % copy_bytes))
    fail(detail::concat("cp.async of ", copy_bytes, " bytes from a source or to a destination not aligned to ",
                        copy_bytes, " bytes"), site);
  if (source_bytes > 0) global_access(source, size_t(source_bytes), false, site);  // checked at issue
  shared_access(destination, size_t(copy_bytes), true, site, /*from_async=*/true);
  PendingCopy copy;
  copy.destination = static_cast<uint8_t*>(destination);
  std::memset(copy.data, 0, sizeof copy.data);
  if (source_bytes > 0) std::memcpy(copy.data, source, size_t(source_bytes));
  copy.bytes = copy_bytes;
  copy.group = t.open_group;
  copy.site = site;
  std::memset(destination, 0xff, size_t(copy_bytes));  // poisoned until the wait
  t.copies.push_back(copy);
}

void cp_async_commit() { ++thread().open_group; }

void cp_async_wait(int pending_groups, Site site) {
  Block& b = block();
  Thread& t = *b.current;
  if (pending_groups < 0) fail("cp_async_wait with a negative number of groups", site);
  // Complete every copy of a committed group older than the `pending_groups` most recent ones.
  // The data lands now, written by this thread: a read by another thread needs a barrier after this.
  const int64_t complete_below = t.open_group - pending_groups;
  const uint32_t seq = b.warps[t.warp].sync_seq;
  auto keep = t.copies.begin();
  for (auto it = t.copies.begin(); it != t.copies.end(); ++it) {
    if (it->group < complete_below) {
      const size_t offset = size_t(it->destination - b.shared.data());
      for (int k = 0; k < it->bytes; ++k) {
        Shadow& s = b.shadow[offset + k];
        // (shared_access refuses any access to pending bytes, so this copy still owns them)
        if (s.state != kPending || s.writer != uint16_t(t.coordinates.linear)) continue;
        it->destination[k] = it->data[k];
        s.state = kWritten;
        s.write_epoch = b.epoch;
        s.write_seq = seq;
      }
    } else {
      *keep++ = *it;
    }
  }
  t.copies.erase(keep, t.copies.end());
}

std::vector<KernelReport> report() {
  std::lock_guard<std::mutex> lock(report_mutex);
  std::vector<KernelReport> out;
  for (auto& [name, entry] : report_entries) {
    KernelReport r = entry.totals;
    for (auto& [site, extra] : entry.conflicts) r.conflicts_by_site.emplace_back(site_str(site), extra);
    out.push_back(r);
  }
  return out;
}

void reset_report() {
  std::lock_guard<std::mutex> lock(report_mutex);
  report_entries.clear();
}

}  // namespace llmk::emu
