/*
** luakvm.h - private types shared by the C files of kvm.core.
** Only luaopen_kvm_core is exported (see core.c); everything here is
** hidden with -fvisibility=hidden.
*/
#ifndef LUAKVM_H
#define LUAKVM_H

#include <stdint.h>
#include <stddef.h>
#include <stdio.h>
#include <pthread.h>
#include <linux/kvm.h>

#include "lua.h"
#include "lauxlib.h"
#include "bus.h"

#define VM_MT      "kvm.vm"
#define MEMORY_MT  "kvm.memory"
#define VCPU_MT    "kvm.vcpu"
#define EXIT_MT    "kvm.exit"

#define KVM_MAX_REGIONS   32     /* memory slots a VM may hold */
#define KVM_MAX_DEVICES   64     /* devices on its bus */
#define KVM_MAX_VCPUS     256

typedef struct Memory Memory;

/* what a vCPU counts; a VM's counters are its vCPUs' summed on demand
   (vm:stats), plus what closed vCPUs left (Vm.retired) */
typedef struct VcpuStats {
  uint64_t exits;
  uint64_t exits_by_reason[64];
  uint64_t unclaimed_io, unclaimed_mmio;
  uint64_t ns_in_run;            /* inside run(), handlers included */
  uint64_t ns_in_handlers;       /* Lua handlers: sampled, 1 call in HANDLER_SAMPLE */
  uint64_t handler_calls;
} VcpuStats;

/*
** The VM userdata's uservalue 1 is a table holding the Lua objects the VM
** keeps alive: [integer ref] = its devices' userdata and what they keep (Lua
** handler functions, a UART's output and input), "memories" = table of
** Memory userdata.
*/
struct Vm {
  int fd;                        /* VM fd, -1 when closed */
  int kvm_fd;                    /* /dev/kvm */
  int run_size;                  /* KVM_GET_VCPU_MMAP_SIZE */
  Memory *regions[KVM_MAX_REGIONS];
  Bus pio, mmio;                 /* the device bus (bus.h) */
  Device *devs[KVM_MAX_DEVICES]; int ndevs;
  Vcpu *vcpus[KVM_MAX_VCPUS];    /* open vCPUs, for the summed counters */
  VcpuStats retired;             /* what closed vCPUs counted */
  uint32_t *retired_ports;       /* and their port counters (65536), or NULL */
  int in_handler;                /* a Lua handler is running */
  int running;                   /* vcpus inside run() */
  int threads;                   /* vm:run's vCPU threads are running */
  int has_irqchip;
  int has_pit;
  uint64_t created_ns;
  uint64_t baseline;             /* the snapshot its memory equals but for the
                                    pages logged dirty since (snapshot.c), or 0 */
};

struct Memory {
  Vm *vm;                        /* valid while open; the VM is pinned by uservalue 1 */
  uint8_t *host;                 /* NULL when closed */
  uint64_t guest, size;
  uint32_t slot, flags;
  int vm_closed;
  int logging;                   /* KVM logs its dirty pages (dirty_log, or a snapshot) */
  uint64_t *vmm_dirty;           /* a bit per page the VMM wrote since the VM's
                                    snapshot baseline (kvm_mem_mark), or NULL */
};

/* note that the VMM (a device, vm:write) writes [off, off+len) of a region:
   a snapshot restore copies those pages back too (KVM logs only the guest's) */
static inline void kvm_mem_mark(Memory *m, uint64_t off, uint64_t len) {
  if (m->vmm_dirty == NULL || len == 0) return;
  for (uint64_t pg = off >> 12; pg <= (off + len - 1) >> 12; pg++)
    __atomic_fetch_or(&m->vmm_dirty[pg >> 6], 1ull << (pg & 63), __ATOMIC_RELAXED);
}

struct Vcpu {
  int fd;                        /* -1 when closed */
  int id;
  Vm *vm;                        /* pinned by uservalue 1 */
  struct kvm_run *run;
  size_t run_size;
  int (*enter)(Vcpu *c);         /* KVM_RUN (a bench harness fakes it) */
  int running;
  int stop;                      /* 0, or 1 + the index of kvm_stop_reasons (atomic: below) */
  int on_thread;                 /* vm:run runs it on a thread of its own: */
  pthread_t thread;              /* ... this one (cpu:stop sends it the tick signal) */
  int serving;                   /* ... whose request the Lua thread serves now */
  int halted;                    /* ... whose last tick found it halted for good (atomic) */
  uint64_t seq;                  /* bumped on every KVM_RUN; exits remember it */
  VcpuStats stats;
  uint32_t *port_hits;           /* 65536 counters, every port-I/O element seen */
  struct kvm_guest_debug dbg;    /* the guest debug set last (debug.c); control 0 = off */
  uint32_t tsc_khz;              /* its TSC frequency as last read or set (snapshot.c), 0 unknown */
  uint32_t msr_held[4];          /* MSRs KVM refused to set back but held the value saved */
  int nmsr_held;
};

/* a vCPU's stop request, read and raised from any thread (a stronger
   reason wins: stopped < poweroff < reset) */
static inline int kvm_stop_get(Vcpu *c) { return __atomic_load_n(&c->stop, __ATOMIC_ACQUIRE); }
static inline void kvm_stop_raise(Vcpu *c, int why) {
  int cur = kvm_stop_get(c);
  while (why > cur &&
         !__atomic_compare_exchange_n(&c->stop, &cur, why, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
  }
}

/* helpers (core.c) */
uint64_t kvm_now_ns(void);
int kvm_fail(lua_State *L, const char *what);          /* nil, msg, errno */
uint64_t kvm_checkrange(lua_State *L, int arg, uint64_t lo, uint64_t hi, const char *what);
Vm *kvm_checkvm(lua_State *L, int arg);                 /* open VM or raise */
Vcpu *kvm_checkvcpu(lua_State *L, int arg);
/* ... whose state may be read or changed now: not one that vm:run holds in
   KVM_RUN on another thread (the ioctl would wait for it, forever if it is
   halted), unless the Lua thread serves its request right now */
Vcpu *kvm_checkvcpu_still(lua_State *L, int arg);
/* host pointer for [gpa, gpa+len) when one region holds it all, else NULL */
uint8_t *kvm_gpa_ptr(Vm *vm, uint64_t gpa, uint64_t len);
/* ... to write through: the pages are marked for a snapshot restore (kvm_mem_mark) */
uint8_t *kvm_gpa_wptr(Vm *vm, uint64_t gpa, uint64_t len);

int kvm_checkcap(lua_State *L, int arg);
/* t[k] += n for the table on the stack top (a counter several devices add to) */
void kvm_add_count(lua_State *L, const char *k, uint64_t n);
/* an options table at idx, the top: {} for nil or none, raise for a non-table */
void kvm_opt_table(lua_State *L, int idx);
/* the metatable `name` with the metamethods `meta`; `methods` are its
   __index, or under "methods" when meta has an __index function */
void kvm_new_class(lua_State *L, const char *name, const luaL_Reg *methods, const luaL_Reg *meta);
const char *kvm_pushhex(lua_State *L, uint64_t v);     /* pushes "0x1f", returns it */
void kvm_push_cpuid(lua_State *L, const struct kvm_cpuid_entry2 *e, int n);
extern int kvm_stop_keys[3];            /* kvm.STOP, kvm.POWEROFF, kvm.RESET */
extern const char *const kvm_stop_reasons[];  /* "none", then their run() reasons */
int l_vm_new(lua_State *L);
/* the parts of kvm.vm() and vm:vcpu() that need no KVM (a harness without
   /dev/kvm gives them other fds: bench/exitcost.c). kvm_vm_push: a new VM
   userdata on the stack, its table with "memories", fds -1 (closed).
   kvm_vcpu_push: a new open vCPU on the stack for the open VM at vm_idx,
   with fd and the kvm_run mapping (munmap'd with run_size when it closes),
   entering by kvm_enter; raises when the VM has KVM_MAX_VCPUS open */
Vm *kvm_vm_push(lua_State *L);
Vcpu *kvm_vcpu_push(lua_State *L, int vm_idx, int id, int fd, struct kvm_run *run,
                    size_t run_size);
Memory *kvm_checkmemory(lua_State *L, int arg);

/* module parts */
void kvm_open_vm(lua_State *L);       /* vm.c */
void kvm_open_memory(lua_State *L);   /* mem.c */
void kvm_open_vcpu(lua_State *L);     /* vcpu.c */
void kvm_open_exit(lua_State *L);     /* exit.c */
int  kvm_push_exit(lua_State *L, int vcpu_idx, Vcpu *c, const char *reason_override);
/* the data of the current port-I/O exit, size * count bytes (*bytes), when
   KVM's size, count and data_offset put it inside the kvm_run mapping past
   its header; NULL for a malformed exit (exit.c) */
uint8_t *kvm_io_data(const Vcpu *c, uint64_t *bytes);
int  kvm_elf_load(lua_State *L);      /* elf.c: vm:load_elf(path) */

/* run.c */
int  kvm_enter(Vcpu *c);                              /* KVM_RUN */
int  l_vcpu_run(lua_State *L);
int  l_vcpu_stop(lua_State *L);
/* vcpu.c: a vCPU's counters leave with it (added to vm->retired); the VM's
   are summed on demand (*ports: 65536 counters to free, or NULL) */
void kvm_vcpu_retire(Vcpu *c);
void kvm_vm_stats(Vm *vm, VcpuStats *sum, uint32_t **ports);
void kvm_push_by_reason(lua_State *L, const uint64_t by_reason[64]);
const char *kvm_exit_name(uint32_t reason);           /* exit.c */

/* debug.c: vcpu:set_guest_debug, vcpu:guest_debug, vcpu:step */
int  l_vcpu_set_guest_debug(lua_State *L);
int  l_vcpu_guest_debug(lua_State *L);
int  l_vcpu_step(lua_State *L);

/* socket.c: the kvm.socket class, and tcp_listen and tcp_connect into the
   module table on the stack top */
void kvm_open_socket(lua_State *L);

/* snapshot.c: the kvm.snapshot class; vm:snapshot, vm:restore */
void kvm_open_snapshot(lua_State *L);
int  l_vm_snapshot(lua_State *L);
int  l_vm_restore(lua_State *L);

/* sandbox.c */
int  l_sandbox(lua_State *L);                         /* kvm.sandbox{allow=, action=} */

#endif
