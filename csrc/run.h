/*
** run.h - what the run loop (run.c) shares with vm:run (smp.c), which runs
** the same loop on one thread per vCPU.
*/
#ifndef LUAKVM_RUN_H
#define LUAKVM_RUN_H

#include <signal.h>
#include <time.h>

#include "luakvm.h"

#define KVM_SIG_TICK (SIGRTMIN + 2)   /* the tick; also how a vCPU thread is kicked */

typedef struct RunState {
  Vcpu *c;
  Vm *vm;
  BusCall bc;
  int threaded;             /* on a vCPU thread of vm:run: the Lua thread ticks the devices */
  int unclaimed_ignore;
  uint64_t max_exits;
  uint64_t *exits;          /* vm:run: exits over every vCPU (atomic), else NULL */
  uint64_t deadline;        /* ns, 0 = none */
  timer_t timer;
  int has_timer;
  struct sigaction old_int;
  int int_installed;
  const char *why;          /* synthetic reason when returning */
  uint64_t halted_since;    /* ns: first tick that saw the vCPU halted for good */
  uint64_t halted_rip;
  /* tl_tick and tl_int, their addresses taken once: in a shared library each
     access to a thread-local variable is a call (__tls_get_addr) */
  volatile sig_atomic_t *tick, *intr;
} RunState;

/* results of the loop */
enum { D_CONTINUE, D_RETURN, D_ERROR };

/* the message handler run() and vm:run() call Lua with */
int kvm_traceback(lua_State *L);
/* vcpu:run's options at idx into rs: unclaimed, max_exits, timeout */
void kvm_run_opts(lua_State *L, int idx, RunState *rs);
/* the tick's handler (once per process) and, with intr, SIGINT's (restored
   by kvm_run_signals_end) */
int kvm_run_signals(lua_State *L, RunState *rs, int intr);
void kvm_run_signals_end(RunState *rs);
/* this thread runs rs->c: the signal handlers' target, the flags cleared */
void kvm_run_enter_thread(RunState *rs);
void kvm_run_leave_thread(RunState *rs);
/* this thread's ^C flag, cleared (vm:run's Lua thread, which runs no vCPU) */
volatile sig_atomic_t *kvm_run_intr_flag(void);
/* KVM_RUN until something ends the run; D_RETURN or D_ERROR, and
   *kvm_errno when KVM_RUN itself failed */
int kvm_run_loop(RunState *rs, int *kvm_errno);

#endif
