/*
** run.c - vcpu:run(): KVM_RUN in a loop, each port-I/O and MMIO exit handed
** to the VM's bus (bus.c), which finds the device; run() returns an Exit for
** anything the bus does not end in (and for what a device or a handler asks
** for: "poweroff", "reset", "debug_exit", "stopped"). A timer signal to this
** thread is the tick: the deadline, the devices' ticks (input, output
** without a newline) and the halted-for-good check.
**
** Everything a run keeps is in its RunState on this thread's stack, or in
** thread-local variables the signal handlers touch: one run per thread.
** Per exit there is no system call but KVM_RUN and no clock read; the time
** spent in run() is read when it starts and ends, handler time is sampled
** (luadev.c).
*/

/*** vcpu:run and vcpu:stop, below, are methods of kvm.vcpu.
@classmod kvm.vcpu
*/
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "run.h"

#define IDLE_TICK_NS 50000000u   /* with the in-kernel irqchip: halted for good? */
#define HALTED_NS 1000000000u    /* halted with IF clear this long at one RIP */

static __thread struct kvm_run *volatile tl_run;
static __thread volatile sig_atomic_t tl_tick, tl_int;
static int tick_installed;

static void on_tick(int sig) {
  (void)sig;
  tl_tick = 1;
  if (tl_run) tl_run->immediate_exit = 1;
}

static void on_int(int sig) {
  (void)sig;
  tl_int = 1;
  if (tl_run) tl_run->immediate_exit = 1;
}

int kvm_enter(Vcpu *c) {
  return ioctl(c->fd, KVM_RUN, 0);
}

/* stack slots during run() */
enum { S_VCPU = 1, S_OPTS, S_VM, S_TAB, S_MSGH, S_IN, S_OUT };

int kvm_traceback(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (msg == NULL) {
    if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING)
      msg = lua_tostring(L, -1);
    else
      msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
  }
  luaL_traceback(L, L, msg, 1);
  return 1;
}

/* ---- set-up and clean-up ---- */

int kvm_run_signals(lua_State *L, RunState *rs, int intr) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sigemptyset(&sa.sa_mask);
  if (!tick_installed) {
    sa.sa_handler = on_tick;
    if (sigaction(KVM_SIG_TICK, &sa, NULL) < 0) return kvm_fail(L, "sigaction");
    tick_installed = 1;
  }
  if (!intr) return 0;
  sa.sa_handler = on_int;
  if (sigaction(SIGINT, &sa, &rs->old_int) == 0) rs->int_installed = 1;
  return 0;
}

void kvm_run_signals_end(RunState *rs) {
  if (rs->int_installed) { sigaction(SIGINT, &rs->old_int, NULL); rs->int_installed = 0; }
}

void kvm_run_enter_thread(RunState *rs) {
  tl_run = rs->c->run;
  tl_tick = 0;
  tl_int = 0;
  rs->tick = &tl_tick;
  rs->intr = &tl_int;
  if (kvm_stop_get(rs->c)) rs->c->run->immediate_exit = 1;
}

volatile sig_atomic_t *kvm_run_intr_flag(void) {
  tl_int = 0;
  return &tl_int;
}

void kvm_run_leave_thread(RunState *rs) {
  tl_run = NULL;
  if (rs->c->run) rs->c->run->immediate_exit = 0;
}

/* a timer signal to this thread: first at the deadline or after a period,
   then every period (the devices' shortest, or the idle check's) */
static int start_timer(lua_State *L, RunState *rs) {
  uint64_t period = kvm_devices_tick_ns(rs->vm);
  if (period == 0 && rs->vm->has_irqchip) period = IDLE_TICK_NS;
  if (rs->deadline == 0 && period == 0) return 0;
  struct sigevent sev;
  memset(&sev, 0, sizeof sev);
  sev.sigev_notify = SIGEV_THREAD_ID;
  sev.sigev_signo = KVM_SIG_TICK;
#ifdef sigev_notify_thread_id
  sev.sigev_notify_thread_id = (pid_t)syscall(SYS_gettid);
#else
  sev._sigev_un._tid = (pid_t)syscall(SYS_gettid);
#endif
  if (timer_create(CLOCK_MONOTONIC, &sev, &rs->timer) < 0) return kvm_fail(L, "timer_create");
  rs->has_timer = 1;
  uint64_t first = period;
  if (rs->deadline) {
    uint64_t now = kvm_now_ns();
    uint64_t left = rs->deadline > now ? rs->deadline - now : 1;
    if (!first || left < first) first = left;
  }
  if (period == 0) period = 10000000;   /* after the deadline, in case of a race */
  struct itimerspec its;
  its.it_value.tv_sec = (time_t)(first / 1000000000u);
  its.it_value.tv_nsec = (long)(first % 1000000000u);
  its.it_interval.tv_sec = (time_t)(period / 1000000000u);
  its.it_interval.tv_nsec = (long)(period % 1000000000u);
  timer_settime(rs->timer, 0, &its, NULL);
  return 0;
}

/* the timer, the signals, the terminal; the vCPU still counts as running
   (run_done) until the devices' output went out, so that an output function
   cannot close or run it meanwhile */
static void run_cleanup(RunState *rs) {
  if (rs->has_timer) { timer_delete(rs->timer); rs->has_timer = 0; }
  kvm_run_signals_end(rs);
  kvm_run_leave_thread(rs);
  kvm_devices_end_run(rs->vm);
}

static void run_done(RunState *rs) {
  rs->c->running = 0;
  rs->vm->running--;
}

/* ---- the idle check ---- */

/* Halted for good: with the in-kernel irqchip, HLT does not exit; a vCPU
   KVM holds halted (KVM_GET_MP_STATE) with interrupts disabled and no NMI or
   event pending can only be woken by an NMI, and nothing here sends one (a
   kernel's "System halted", or `cli; hlt`). A vCPU that waits for INIT/SIPI
   (an AP never started, or stopped again) counts too: another vCPU must
   wake it, and vm:run ends a run as "halted" only when every one is. */
static int halted_now(Vcpu *c, uint64_t *rip) {
  struct kvm_mp_state mp;
  struct kvm_regs r;
  struct kvm_vcpu_events e;
  if (ioctl(c->fd, KVM_GET_MP_STATE, &mp) < 0) return 0;
  if (mp.mp_state == KVM_MP_STATE_UNINITIALIZED || mp.mp_state == KVM_MP_STATE_INIT_RECEIVED) {
    *rip = 0;                    /* waits for a start-up IPI: only another CPU can send one */
    return 1;
  }
  if (mp.mp_state != KVM_MP_STATE_HALTED) return 0;
  if (ioctl(c->fd, KVM_GET_REGS, &r) < 0 || (r.rflags & 0x200)) return 0;
  if (ioctl(c->fd, KVM_GET_VCPU_EVENTS, &e) < 0) return 0;
  *rip = r.rip;
  return !e.nmi.pending && !e.nmi.injected && !e.interrupt.injected && !e.exception.injected;
}

/* ... and stays so at the same RIP for HALTED_NS: a kernel booting on
   kvm_amd was seen halted with IF clear for a moment (and went on) */
static int halted_for_good(RunState *rs) {
  uint64_t rip, now = kvm_now_ns();
  if (!halted_now(rs->c, &rip)) { rs->halted_since = 0; return 0; }
  if (rs->halted_since == 0 || rip != rs->halted_rip) {
    rs->halted_since = now;
    rs->halted_rip = rip;
    return 0;
  }
  return now - rs->halted_since >= HALTED_NS;
}

static int from_bus(RunState *rs, int st) {
  if (st == BUS_OK) return D_CONTINUE;
  if (st == BUS_ERROR) return D_ERROR;
  rs->why = rs->bc.why;
  return D_RETURN;
}

static int run_tick(RunState *rs) {
  *rs->tick = 0;
  rs->c->run->immediate_exit = 0;
  if (rs->threaded) {          /* the Lua thread does the rest, and ends the run when all halted */
    __atomic_store_n(&rs->c->halted, rs->vm->has_irqchip && halted_for_good(rs), __ATOMIC_RELEASE);
    return D_CONTINUE;
  }
  if (rs->deadline && kvm_now_ns() >= rs->deadline) {
    rs->why = "timeout";
    return D_RETURN;
  }
  int d = from_bus(rs, kvm_devices_tick(rs->vm, &rs->bc));
  if (d != D_CONTINUE) return d;
  if (rs->vm->has_irqchip && halted_for_good(rs)) {
    rs->why = "halted";
    return D_RETURN;
  }
  return D_CONTINUE;
}

/* ---- one exit ---- */

static int dispatch_io(RunState *rs) {
  Vcpu *c = rs->c;
  struct kvm_run *run = c->run;
  uint64_t bytes;
  uint8_t *data = kvm_io_data(c, &bytes);   /* untrusted: inside the kvm_run mapping? */
  if (data == NULL) {
    rs->why = "bad_io";
    return D_RETURN;
  }
  uint16_t port = run->io.port;
  if (c->port_hits == NULL) c->port_hits = calloc(65536, sizeof(uint32_t));   /* the first port exit */
  if (c->port_hits) c->port_hits[port] += run->io.count;
  int unclaimed = 0;
  int st = bus_pio(&rs->vm->pio, &rs->bc, port, run->io.direction == KVM_EXIT_IO_OUT,
                   run->io.size, run->io.count, data, &unclaimed);
  if (unclaimed) {
    c->stats.unclaimed_io++;
    return rs->unclaimed_ignore ? D_CONTINUE : D_RETURN;
  }
  return from_bus(rs, st);
}

static int dispatch_mmio(RunState *rs) {
  Vcpu *c = rs->c;
  struct kvm_run *run = c->run;
  if (run->mmio.len == 0 || run->mmio.len > 8) {
    rs->why = "bad_mmio";
    return D_RETURN;
  }
  int unclaimed = 0;
  int st = bus_mmio(&rs->vm->mmio, &rs->bc, run->mmio.phys_addr, run->mmio.is_write,
                    run->mmio.len, run->mmio.data, &unclaimed);
  if (unclaimed) {
    c->stats.unclaimed_mmio++;
    return rs->unclaimed_ignore ? D_CONTINUE : D_RETURN;
  }
  return from_bus(rs, st);
}

int kvm_run_loop(RunState *rs, int *kvm_errno) {
  Vcpu *c = rs->c;
  uint64_t n = 0;
  volatile sig_atomic_t *tick = rs->tick, *intr = rs->intr;
  for (;;) {
    int rc = c->enter(c);
    int en = rc < 0 ? errno : 0;
    c->seq++;
    int d;
    if (rc < 0) {
      if (en != EINTR && en != EAGAIN) { *kvm_errno = en; return D_RETURN; }
      c->run->immediate_exit = 0;
      d = D_CONTINUE;
    } else {
      uint32_t reason = c->run->exit_reason;
      c->stats.exits++;
      c->stats.exits_by_reason[reason & 63]++;
      n++;
      if (reason == KVM_EXIT_IO) d = dispatch_io(rs);
      else if (reason == KVM_EXIT_MMIO) d = dispatch_mmio(rs);
      else d = reason == KVM_EXIT_INTR ? D_CONTINUE : D_RETURN;
    }
    if (d != D_CONTINUE) return d;
    int stop = kvm_stop_get(c);
    if (stop) { rs->why = kvm_stop_reasons[stop]; return D_RETURN; }
    if (*intr) { rs->why = "intr"; return D_RETURN; }
    if (rs->max_exits && rc >= 0 &&
        (rs->exits ? __atomic_add_fetch(rs->exits, 1, __ATOMIC_RELAXED) : n) >= rs->max_exits) {
      rs->why = "max_exits";
      return D_RETURN;
    }
    if (*tick) {
      if ((d = run_tick(rs)) != D_CONTINUE) return d;
    } else if (en == EINTR && !rs->threaded) {
      rs->why = "intr";          /* another signal (a vCPU thread has them blocked) */
      return D_RETURN;
    }                            /* EAGAIN: a vCPU waiting for INIT/SIPI woke up */
  }
}

/* ---- vcpu:run ---- */

void kvm_run_opts(lua_State *L, int idx, RunState *rs) {
  if (lua_isnoneornil(L, idx)) return;
  luaL_checktype(L, idx, LUA_TTABLE);
  if (lua_getfield(L, idx, "unclaimed") != LUA_TNIL) {
    const char *u = lua_tostring(L, -1);
    if (u && strcmp(u, "ignore") == 0) rs->unclaimed_ignore = 1;
    else if (!u || strcmp(u, "return") != 0)
      luaL_error(L, "bad option 'unclaimed' to 'run' (\"return\" or \"ignore\" expected)");
  }
  if (lua_getfield(L, idx, "max_exits") != LUA_TNIL) {
    int ok;
    lua_Integer n = lua_tointegerx(L, -1, &ok);
    if (!ok || n <= 0) luaL_error(L, "bad option 'max_exits' to 'run' (positive integer expected)");
    rs->max_exits = (uint64_t)n;
  }
  if (lua_getfield(L, idx, "timeout") != LUA_TNIL) {
    int ok;
    lua_Number t = lua_tonumberx(L, -1, &ok);
    if (!ok || !(t > 0) || t > 1e9)
      luaL_error(L, "bad option 'timeout' to 'run' (positive number of seconds expected)");
    rs->deadline = kvm_now_ns() + (uint64_t)(t * 1e9);
  }
  lua_pop(L, 3);
}

/* the stack slots the run and the devices use */
static void push_slots(lua_State *L, RunState *rs) {
  lua_settop(L, 2);
  lua_getiuservalue(L, S_VCPU, 1);     /* S_VM */
  lua_getiuservalue(L, S_VM, 1);       /* S_TAB */
  lua_pushcfunction(L, kvm_traceback);     /* S_MSGH */
  lua_pushliteral(L, "in");            /* S_IN */
  lua_pushliteral(L, "out");           /* S_OUT */
  luaL_checkstack(L, 16, "run loop");
  rs->bc.L = L;
  rs->bc.tab = S_TAB;
  rs->bc.msgh = S_MSGH;
  rs->bc.strs = S_IN;
  rs->bc.c = rs->c;
}

/* after the loop: hand out the devices' output, then the Exit or the error */
static int finish(lua_State *L, RunState *rs, int outcome, int kvm_errno) {
  Vcpu *c = rs->c;
  if (outcome == D_ERROR) {
    /* message (with traceback) on top; what the guest wrote so far goes out first */
    lua_insert(L, S_OUT + 1);
    rs->bc.msgh = 0;
    (void)kvm_devices_flush(rs->vm, &rs->bc);
    lua_settop(L, S_OUT + 1);
    run_done(rs);
    return lua_error(L);
  }
  int flushed = kvm_devices_flush(rs->vm, &rs->bc);
  run_done(rs);
  if (flushed != BUS_OK) return lua_error(L);
  if (kvm_errno) { errno = kvm_errno; return kvm_fail(L, "KVM_RUN"); }
  kvm_push_exit(L, S_VCPU, c, rs->why);
  if (rs->why && strcmp(rs->why, "debug_exit") == 0) {
    lua_getiuservalue(L, -1, 2);
    lua_pushinteger(L, rs->bc.code);
    lua_setfield(L, -2, "code");
    lua_pop(L, 1);
  }
  return 1;
}

/*** Run the vCPU. Port and MMIO exits go to the devices on the VM's bus (C
devices and Lua handlers) and KVM_RUN is entered again without returning;
run() returns an Exit for anything not handled.
@function vcpu:run
@tparam[opt] table opts {unclaimed = "return"|"ignore", max_exits = n, timeout = seconds}
@treturn kvm.exit reason "hlt", "io", "mmio", "shutdown", "internal_error", ...,
  or the synthetic "timeout", "max_exits", "intr", "stopped", "poweroff",
  "reset", "debug_exit", "bad_io", "bad_mmio" (KVM reported an exit whose data
  lies outside the kvm_run page, or an MMIO length over 8), "halted" (in-kernel
  irqchip: halted with interrupts disabled and nothing pending, at the same
  RIP for a second)
@return[2] fail, "KVM_RUN: ...", errno
*/
int l_vcpu_run(lua_State *L) {
  Vcpu *c = kvm_checkvcpu(L, 1);
  Vm *vm = c->vm;
  if (c->running || vm->in_handler)
    return luaL_error(L, "run() called from inside a handler (re-entry is not allowed)");
  if (vm->fd < 0) return luaL_error(L, "attempt to use a closed kvm.vm");
  RunState rs;
  memset(&rs, 0, sizeof rs);
  rs.c = c;
  rs.vm = vm;
  kvm_run_opts(L, 2, &rs);
  push_slots(L, &rs);

  c->running = 1;
  vm->running++;
  int r = kvm_run_signals(L, &rs, 1);
  if (!r) r = start_timer(L, &rs);
  if (r) { run_cleanup(&rs); run_done(&rs); return r; }
  kvm_devices_begin_run(vm);
  kvm_run_enter_thread(&rs);
  uint64_t t0 = kvm_now_ns();
  int kvm_errno = 0;
  int outcome = kvm_run_loop(&rs, &kvm_errno);
  c->stats.ns_in_run += kvm_now_ns() - t0;
  run_cleanup(&rs);      /* restore everything before anything can raise */
  __atomic_store_n(&c->stop, 0, __ATOMIC_RELEASE);
  return finish(L, &rs, outcome, kvm_errno);
}

/*** Make the current or next run() return with reason "stopped" (or the
reason given: "poweroff" or "reset", as a device that turned the machine off
or reset it would). Callable from a handler.
@function vcpu:stop
@tparam[opt="stopped"] string reason
*/
int l_vcpu_stop(lua_State *L) {
  Vcpu *c = kvm_checkvcpu(L, 1);
  int why = luaL_checkoption(L, 2, "stopped", kvm_stop_reasons + 1) + 1;
  kvm_stop_raise(c, why);
  if (c->on_thread && !c->serving) pthread_kill(c->thread, KVM_SIG_TICK);   /* out of KVM_RUN */
  else if (c->run) c->run->immediate_exit = 1;
  return 0;
}
