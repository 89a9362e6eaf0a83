/*
** smp.c - vm:run(): every vCPU of a VM on a thread of its own, each running
** run.c's KVM_RUN loop, until one of them (or the clock, ^C, a handler)
** ends the run; then every vCPU stops, every thread is joined, and one Exit
** says which vCPU ended it and why.
**
** The Lua state stays on the calling thread (the Lua thread). Exits that C
** devices serve stay on their vCPU's thread, under the device's lock. What
** needs Lua -- a Lua port or MMIO handler, output to a Lua function or file
** -- a vCPU thread hands to the Lua thread (bus_lua, through the Hub's
** port) and waits for: a script never sees two handlers at once. The Lua
** thread also ticks the devices (input, output without a newline), keeps
** the deadline, takes ^C, and every IDLE_NS kicks each vCPU thread so it
** looks whether it is halted for good: when all are, the run is "halted".
**
** Stopping: a vCPU's own reason ends its thread; the Lua thread then sets
** every other vCPU's stop flag and sends its thread the tick signal, whose
** handler sets immediate_exit (run.c), so a vCPU inside KVM_RUN (halted
** included) comes out at once. Requests still queued are served, or
** refused (reads all ones) when a handler raised. The Lua side of all this
** runs inside lua_pcall, so not even a memory error leaves a thread behind.
*/

/*** vm:run, below, is a method of kvm.vm.
@classmod kvm.vm
*/
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "run.h"

#define IDLE_NS 50000000u         /* with the in-kernel irqchip: halted for good? */
#define KICK_NS 10000000u         /* while stopping: kick the threads again */

typedef struct Request {
  BusWork fn;
  void *arg;
  Vcpu *c;
  int status, code, done;
  const char *why;
  struct Request *next;
} Request;

typedef struct Hub Hub;

typedef struct Worker {
  Hub *hub;
  RunState rs;
  pthread_t tid;
  int started, finished;
  int kvm_errno;
} Worker;

struct Hub {
  LuaPort port;                 /* first: bus_lua's way here */
  pthread_mutex_t mu;
  pthread_cond_t wake;          /* the Lua thread waits on it */
  pthread_cond_t served;        /* vCPU threads wait on it for their request */
  Request *head, *tail;
  Worker *w;
  int n, nfinished;
  Worker *first;                /* the first vCPU thread to finish its loop */
  int stopping;
  int refuse;                   /* a handler raised: refuse further requests */
  const char *why;              /* the Lua thread's own reason (timeout, intr, halted) */
  Worker *decider;              /* the vCPU whose reason ends the run */
  uint64_t exits;               /* over every vCPU, for max_exits */
  uint64_t deadline;
  BusCall bc;                   /* the Lua thread's */
  int err_slot;                 /* stack slot of the first handler error, nil until then */
  volatile sig_atomic_t *intr;
  int create_err;               /* pthread_create failed: the errno */
};

/* ---- the vCPU threads' side ---- */

static int hub_call(LuaPort *p, BusCall *bc, BusWork fn, void *arg) {
  Hub *h = (Hub *)p;
  Request r;
  memset(&r, 0, sizeof r);
  r.fn = fn;
  r.arg = arg;
  r.c = bc->c;
  pthread_mutex_lock(&h->mu);
  if (h->refuse) {
    r.status = BUS_STOP;
    r.why = "stopped";
  } else {
    if (h->tail) h->tail->next = &r; else h->head = &r;
    h->tail = &r;
    pthread_cond_signal(&h->wake);
    while (!r.done) pthread_cond_wait(&h->served, &h->mu);
  }
  pthread_mutex_unlock(&h->mu);
  if (r.status == BUS_STOP) { bc->why = r.why; bc->code = r.code; }
  /* BUS_ERROR: the message waits on the Lua thread's stack */
  return r.status;
}

static void *vcpu_thread(void *arg) {
  Worker *w = arg;
  RunState *rs = &w->rs;
  Hub *h = w->hub;
  char name[16];                 /* "vcpu 3" in top -H, gdb, /proc/PID/task */
  snprintf(name, sizeof name, "vcpu %d", rs->c->id);
  pthread_setname_np(pthread_self(), name);
  kvm_run_enter_thread(rs);
  uint64_t t0 = kvm_now_ns();
  /* its outcome: an error (only Lua work on the Lua thread raises one) is in
     the Hub already; why it returned is in rs */
  (void)kvm_run_loop(rs, &w->kvm_errno);
  rs->c->stats.ns_in_run += kvm_now_ns() - t0;
  kvm_run_leave_thread(rs);
  pthread_mutex_lock(&h->mu);
  w->finished = 1;
  if (h->first == NULL) h->first = w;
  h->nfinished++;
  pthread_cond_signal(&h->wake);
  pthread_mutex_unlock(&h->mu);
  return NULL;
}

/* ---- the Lua thread's side ---- */

/* every vCPU still running: stop, and out of KVM_RUN now (called with mu) */
static void stop_all(Hub *h) {
  h->stopping = 1;
  for (int i = 0; i < h->n; i++) {
    Worker *w = &h->w[i];
    if (!w->started || w->finished) continue;
    kvm_stop_raise(w->rs.c, 1);                  /* "stopped", unless it has a stronger reason */
    pthread_kill(w->tid, KVM_SIG_TICK);
  }
}

static void decide(Hub *h, const char *why) {
  if (h->why == NULL && h->decider == NULL) h->why = why;
  stop_all(h);
}

/* serve one request (mu not held): run it with this thread's BusCall */
static void serve(lua_State *L, Hub *h, Request *r) {
  BusCall bc = h->bc;
  bc.c = r->c;
  bc.why = NULL;
  bc.code = 0;
  r->c->serving = 1;             /* its thread waits for this: its state may be touched */
  int st = r->fn(&bc, r->arg);
  r->c->serving = 0;
  if (st == BUS_ERROR) {
    if (!h->refuse) lua_replace(L, h->err_slot);   /* the first error is the one raised */
    else lua_pop(L, 1);
  }
  pthread_mutex_lock(&h->mu);
  if (st == BUS_ERROR && !h->refuse) { h->refuse = 1; stop_all(h); }
  r->status = st;
  r->why = bc.why;
  r->code = bc.code;
  r->done = 1;
  pthread_cond_broadcast(&h->served);
  pthread_mutex_unlock(&h->mu);
}

/* after a handler raised: what waits is not served (reads get all ones);
   called with mu */
static void refuse_waiting(Hub *h) {
  while (h->head) {
    Request *q = h->head;
    h->head = q->next;
    q->status = BUS_STOP;
    q->why = "stopped";
    q->done = 1;
  }
  h->tail = NULL;
  pthread_cond_broadcast(&h->served);
}

static int all_halted(Hub *h) {
  for (int i = 0; i < h->n; i++)
    if (!__atomic_load_n(&h->w[i].rs.c->halted, __ATOMIC_ACQUIRE)) return 0;
  return 1;
}

static void deadline_in(struct timespec *ts, uint64_t ns) {
  clock_gettime(CLOCK_MONOTONIC, ts);
  ts->tv_sec += (time_t)(ns / 1000000000u);
  ts->tv_nsec += (long)(ns % 1000000000u);
  if (ts->tv_nsec >= 1000000000L) { ts->tv_sec++; ts->tv_nsec -= 1000000000L; }
}

/* the Lua thread until every vCPU thread finished; inside lua_pcall, with
   (hub, the VM's table, message handler, "in", "out"); returns the first
   handler error, or nil */
enum { A_HUB = 1, A_TAB, A_MSGH, A_IN, A_OUT, A_ERR };

static int serve_all(lua_State *L) {
  Hub *h = lua_touserdata(L, A_HUB);
  lua_settop(L, A_OUT);
  lua_pushnil(L);                                /* A_ERR */
  luaL_checkstack(L, 16, "vm:run");
  h->bc.L = L;
  h->bc.tab = A_TAB;
  h->bc.msgh = A_MSGH;
  h->bc.strs = A_IN;
  h->bc.c = h->w[0].rs.c;
  h->err_slot = A_ERR;
  Vm *vm = h->w[0].rs.vm;
  uint64_t tick = kvm_devices_tick_ns(vm);
  uint64_t idle = vm->has_irqchip ? IDLE_NS : 0;
  uint64_t next_tick = tick ? kvm_now_ns() + tick : 0;
  uint64_t next_idle = idle ? kvm_now_ns() + idle : 0;
  uint64_t next_kick = 0;
  pthread_mutex_lock(&h->mu);
  for (;;) {
    if (h->refuse) refuse_waiting(h);
    while (h->head) {
      Request *r = h->head;
      h->head = r->next;
      if (h->head == NULL) h->tail = NULL;
      pthread_mutex_unlock(&h->mu);
      serve(L, h, r);
      pthread_mutex_lock(&h->mu);
    }
    if (h->nfinished && !h->stopping) {         /* a vCPU ended the run */
      h->decider = h->first;
      stop_all(h);
    }
    if (h->nfinished == h->n) break;
    uint64_t now = kvm_now_ns();
    if (!h->stopping) {
      if (*h->intr) decide(h, "intr");
      else if (h->deadline && now >= h->deadline) decide(h, "timeout");
    }
    if (h->stopping) {
      if (now >= next_kick) { stop_all(h); next_kick = now + KICK_NS; }
    } else {
      if (next_idle && now >= next_idle) {
        if (all_halted(h)) decide(h, "halted");
        else
          for (int i = 0; i < h->n; i++) pthread_kill(h->w[i].tid, KVM_SIG_TICK);
        next_idle = now + idle;
      }
      if (next_tick && now >= next_tick && !h->stopping) {
        pthread_mutex_unlock(&h->mu);
        BusCall bc = h->bc;
        int st = kvm_devices_try_tick(vm, &bc);
        if (st == BUS_ERROR) {
          if (!h->refuse) lua_replace(L, h->err_slot); else lua_pop(L, 1);
        }
        pthread_mutex_lock(&h->mu);
        if (st == BUS_ERROR) { h->refuse = 1; stop_all(h); }
        else if (st == BUS_STOP) decide(h, bc.why);
        next_tick = now + tick;
      }
    }
    /* sleep until a request, a finished thread, or the next thing to do */
    uint64_t wait = 10000000u;   /* ^C is looked at this often */
    if (next_tick && next_tick > now && next_tick - now < wait) wait = next_tick - now;
    if (h->deadline && !h->stopping && h->deadline > now && h->deadline - now < wait)
      wait = h->deadline - now;
    if (h->stopping && wait > KICK_NS) wait = KICK_NS;
    if (h->head == NULL && h->nfinished < h->n) {
      struct timespec ts;
      deadline_in(&ts, wait);
      pthread_cond_timedwait(&h->wake, &h->mu, &ts);
    }
  }
  pthread_mutex_unlock(&h->mu);
  lua_settop(L, A_ERR);
  return 1;
}

/* stack slots of vm:run */
enum { R_VM = 1, R_OPTS, R_CPUS, R_TAB, R_MSGH, R_IN, R_OUT, R_ERR, R_HUB };

/* the vCPUs to run, into slot R_CPUS: opts.cpus, else every open vCPU of the VM */
static int collect(lua_State *L, Vm *vm) {
  lua_newtable(L);
  int n = 0;
  if (lua_istable(L, R_OPTS) && lua_getfield(L, R_OPTS, "cpus") != LUA_TNIL) {
    luaL_argcheck(L, lua_istable(L, -1), 2, "'cpus' must be a list of kvm.vcpu");
    lua_Integer k = luaL_len(L, -1);
    for (lua_Integer i = 1; i <= k; i++) {
      lua_rawgeti(L, -1, i);
      Vcpu *c = kvm_checkvcpu(L, -1);
      if (c->vm != vm) luaL_error(L, "vm:run: cpus[%d] belongs to another VM", (int)i);
      for (int j = 1; j <= n; j++) {
        lua_rawgeti(L, -3, j);
        if (lua_touserdata(L, -1) == c) luaL_error(L, "vm:run: cpus[%d] is listed twice", (int)i);
        lua_pop(L, 1);
      }
      lua_rawseti(L, -3, ++n);
    }
    lua_pop(L, 1);
  } else {
    lua_pop(L, 1);
    lua_getiuservalue(L, R_VM, 1);
    lua_getfield(L, -1, "vcpus");
    for (int i = 0; i < KVM_MAX_VCPUS; i++) {
      if (vm->vcpus[i] == NULL) continue;
      if (lua_rawgeti(L, -1, i + 1) == LUA_TUSERDATA && lua_touserdata(L, -1) == vm->vcpus[i])
        lua_rawseti(L, -4, ++n);
      else
        lua_pop(L, 1);
    }
    lua_pop(L, 2);
  }
  if (n == 0) luaL_error(L, "vm:run: the VM has no vCPU (vm:vcpu(id) makes one)");
  return n;
}

/* the vCPUs are no longer running (after the devices' output went out:
   an output function cannot run or close them meanwhile) */
static void not_running(Hub *h) {
  Vm *vm = h->w[0].rs.vm;
  for (int i = 0; i < h->n; i++) {
    Vcpu *c = h->w[i].rs.c;
    __atomic_store_n(&c->stop, 0, __ATOMIC_RELEASE);
    c->running = 0;
    vm->running--;
  }
}

/* after the threads: the devices' output, then the Exit of the vCPU that
   ended the run, or the error (in R_ERR) raised */
static int result(lua_State *L, Hub *h) {
  Vm *vm = h->w[0].rs.vm;
  for (int i = 0; i < h->n; i++) {
    h->w[i].rs.c->on_thread = 0;
    h->w[i].rs.c->halted = 0;
  }
  vm->threads = 0;
  kvm_devices_end_run(vm);
  BusCall bc;
  memset(&bc, 0, sizeof bc);
  bc.L = L;
  bc.tab = R_TAB;
  bc.msgh = R_MSGH;
  bc.strs = R_IN;
  bc.c = h->w[0].rs.c;
  if (!lua_isnil(L, R_ERR)) {
    bc.msgh = 0;
    lua_pushvalue(L, R_ERR);
    (void)kvm_devices_flush(vm, &bc);           /* what the guest wrote goes out first */
    not_running(h);
    lua_pushvalue(L, R_ERR);
    return lua_error(L);
  }
  int st = kvm_devices_flush(vm, &bc);
  not_running(h);
  if (st == BUS_ERROR) return lua_error(L);
  if (h->create_err) { errno = h->create_err; return kvm_fail(L, "pthread_create"); }
  for (int i = 0; i < h->n; i++)
    if (h->w[i].kvm_errno) {
      errno = h->w[i].kvm_errno;
      return kvm_fail(L, "KVM_RUN");
    }
  Worker *w = h->decider ? h->decider : &h->w[0];
  lua_rawgeti(L, R_CPUS, (lua_Integer)(w - h->w) + 1);
  kvm_push_exit(L, -1, w->rs.c, h->decider ? w->rs.why : h->why);
  lua_getiuservalue(L, -1, 2);
  lua_pushinteger(L, w->rs.c->id);
  lua_setfield(L, -2, "cpu");
  if (h->decider && w->rs.why && strcmp(w->rs.why, "debug_exit") == 0) {
    lua_pushinteger(L, w->rs.bc.code);
    lua_setfield(L, -2, "code");
  }
  lua_pop(L, 1);
  return 1;
}

/* one vCPU: here, as cpu:run (which reads only its own options) */
static int run_one(lua_State *L) {
  lua_pushcfunction(L, l_vcpu_run);
  lua_rawgeti(L, R_CPUS, 1);
  lua_pushvalue(L, R_OPTS);
  lua_call(L, 2, LUA_MULTRET);
  if (lua_type(L, R_CPUS + 1) != LUA_TUSERDATA) return lua_gettop(L) - R_CPUS;
  lua_settop(L, R_CPUS + 1);
  lua_getiuservalue(L, -1, 2);
  lua_rawgeti(L, R_CPUS, 1);
  lua_pushinteger(L, ((Vcpu *)lua_touserdata(L, -1))->id);
  lua_setfield(L, -3, "cpu");
  lua_pop(L, 2);
  return 1;
}

/*** Run every vCPU of the VM, each on a thread of its own, until the guest
powers off or resets, a vCPU exits in a way the devices do not serve, a
handler returns kvm.STOP, the timeout, max_exits or ^C; then every vCPU is
stopped and every thread joined. Lua handlers and output functions run on
the calling thread, one at a time. A VM with one vCPU runs it here, as
cpu:run does. While it runs, devices cannot be added or removed, and only
the vCPU a handler serves (parked until the handler returns) can be read or
changed.
@function vm:run
@tparam[opt] table opts as cpu:run's (`timeout`, `max_exits` over all
  vCPUs, `unclaimed`), and `cpus`, the vCPUs to run (default: every open one)
@treturn kvm.exit the Exit of the vCPU that ended the run, whose `cpu` field
  is its id; for "timeout", "intr" and "halted" (every vCPU halted for good),
  the first vCPU's
@return[2] fail, "KVM_RUN: ...", errno
*/
int l_vm_run(lua_State *L) {
  Vm *vm = kvm_checkvm(L, 1);
  lua_settop(L, 2);
  if (!lua_isnil(L, 2)) luaL_checktype(L, 2, LUA_TTABLE);
  if (vm->running || vm->in_handler)
    return luaL_error(L, "vm:run: a vCPU of this VM is already running");
  int n = collect(L, vm);                         /* R_CPUS */
  RunState opts;
  memset(&opts, 0, sizeof opts);
  kvm_run_opts(L, R_OPTS, &opts);
  if (n == 1) return run_one(L);
  for (int i = 1; i <= n; i++) {
    lua_rawgeti(L, R_CPUS, i);
    Vcpu *c = lua_touserdata(L, -1);
    lua_pop(L, 1);
    if (c->running) return luaL_error(L, "vm:run: vCPU %d is already running", c->id);
  }
  lua_getiuservalue(L, R_VM, 1);                  /* R_TAB */
  lua_pushcfunction(L, kvm_traceback);            /* R_MSGH */
  lua_pushliteral(L, "in");                       /* R_IN */
  lua_pushliteral(L, "out");                      /* R_OUT */
  lua_pushnil(L);                                 /* R_ERR */
  Hub *h = lua_newuserdatauv(L, sizeof(Hub) + (size_t)n * sizeof(Worker), 0);   /* R_HUB */
  memset(h, 0, sizeof(Hub) + (size_t)n * sizeof(Worker));
  luaL_checkstack(L, 16, "vm:run");
  h->port.call = hub_call;
  h->w = (Worker *)(h + 1);
  h->n = n;
  h->deadline = opts.deadline;
  for (int i = 0; i < n; i++) {
    Worker *w = &h->w[i];
    lua_rawgeti(L, R_CPUS, i + 1);
    w->hub = h;
    w->rs = opts;
    w->rs.deadline = 0;
    w->rs.c = lua_touserdata(L, -1);
    w->rs.vm = vm;
    w->rs.threaded = 1;
    w->rs.exits = &h->exits;
    w->rs.bc.port = &h->port;
    w->rs.bc.c = w->rs.c;
    lua_pop(L, 1);
  }
  RunState sig;                                   /* the Lua thread's: ^C */
  memset(&sig, 0, sizeof sig);
  int r = kvm_run_signals(L, &sig, 1);
  if (r) return r;                                /* fail, msg, errno */
  pthread_mutex_init(&h->mu, NULL);
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&h->wake, &ca);
  pthread_cond_init(&h->served, &ca);
  pthread_condattr_destroy(&ca);

  /* from here to the joins nothing may raise */
  for (int i = 0; i < n; i++) {
    Vcpu *c = h->w[i].rs.c;
    c->running = 1;
    c->on_thread = 1;
    c->halted = 0;
    vm->running++;
  }
  vm->threads = 1;
  kvm_devices_begin_run(vm);
  /* the threads take ^C's mask from here: blocked, so it reaches the Lua thread */
  sigset_t block, old;
  sigemptyset(&block);
  sigaddset(&block, SIGINT);
  pthread_sigmask(SIG_BLOCK, &block, &old);
  int create_err = 0;
  pthread_mutex_lock(&h->mu);
  for (int i = 0; i < n; i++) {
    int e = pthread_create(&h->w[i].tid, NULL, vcpu_thread, &h->w[i]);
    if (e) { create_err = e; break; }
    h->w[i].started = 1;
    h->w[i].rs.c->thread = h->w[i].tid;
  }
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  int started = 0;
  for (int i = 0; i < n; i++) started += h->w[i].started;
  if (create_err) {
    /* the threads that did start stop at once */
    for (int i = started; i < n; i++) {
      h->w[i].finished = 1;
      h->w[i].rs.c->on_thread = 0;
      h->nfinished++;
    }
    h->why = "stopped";
    stop_all(h);
  }
  pthread_mutex_unlock(&h->mu);
  h->intr = kvm_run_intr_flag();                  /* ^C's flag for this thread */
  lua_pushcfunction(L, serve_all);
  lua_pushlightuserdata(L, h);
  for (int i = R_TAB; i <= R_OUT; i++) lua_pushvalue(L, i);
  int ok = lua_pcall(L, 5, 1, 0) == LUA_OK;
  lua_replace(L, R_ERR);                          /* a handler's error, the Lua thread's, or nil */
  if (!ok) {                                      /* stop and wait for every thread */
    pthread_mutex_lock(&h->mu);
    h->refuse = 1;
    stop_all(h);
    refuse_waiting(h);
    pthread_mutex_unlock(&h->mu);
  }
  for (int i = 0; i < n; i++)
    if (h->w[i].started) pthread_join(h->w[i].tid, NULL);
  kvm_run_signals_end(&sig);
  pthread_cond_destroy(&h->wake);
  pthread_cond_destroy(&h->served);
  pthread_mutex_destroy(&h->mu);
  h->create_err = create_err;
  return result(L, h);
}
