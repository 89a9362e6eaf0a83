/*
** bus.h - the device bus: the port space and the MMIO space, each a sorted
** table of ranges, each range served by a device. The run loop hands every
** port or MMIO exit to bus_pio / bus_mmio and knows no device.
**
** A device is a struct whose first member is a Device: its operations
** (DeviceOps), the VM it belongs to and a lock. It lives in a Lua userdata
** the VM keeps alive (kvm_device_new) and registers its ranges with
** bus_claim. Adding a device is one file (its state, its ops, the vm:
** method that creates it) and one line in vm.c's method table.
**
** Model: kvmtool's ioport/mmio registration, Firecracker's and crosvm's
** Bus/BusDevice: the bus finds the range, the device does the rest.
*/
#ifndef LUAKVM_BUS_H
#define LUAKVM_BUS_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "lua.h"

#define BUS_MAX_RANGES   64      /* claimed ranges per space */

typedef struct Device Device;
typedef struct Vm Vm;
typedef struct Vcpu Vcpu;

typedef struct BusCall BusCall;
typedef struct SnapBuf SnapBuf;
typedef struct LuaPort LuaPort;

/* Work for the thread that owns the Lua state: a Lua device's access, a
   sink's output to a Lua function. On a vCPU thread of vm:run (bc->L is
   NULL) bus_lua hands it to the Lua thread through bc->port and waits; the
   Lua thread runs it with a BusCall of its own whose c is the caller's vCPU. */
typedef int (*BusWork)(BusCall *bc, void *arg);
struct LuaPort {
  int (*call)(LuaPort *p, BusCall *bc, BusWork fn, void *arg);
};
int bus_lua(BusCall *bc, BusWork fn, void *arg);

/* What a device sees of the run() it is called from: the Lua state and the
   stack slots of the run (Lua devices call functions kept in the VM's
   table), and where it asks run() to return. */
struct BusCall {
  lua_State *L;                  /* NULL on a vCPU thread of vm:run: see bus_lua */
  LuaPort *port;                 /* ... the way to the Lua thread there */
  int tab;                       /* stack index: the VM's uservalue table */
  int msgh;                      /* stack index: message handler, or 0 */
  int strs;                      /* stack index: "in", then "out" */
  Vcpu *c;                       /* the vCPU that exited (NULL: tick, flush) */
  const char *why;               /* set with BUS_STOP: run()'s reason */
  int code;                      /* a detail of it (debug_exit's byte) */
};

/* results of an access, a tick or a flush */
enum { BUS_OK = 0, BUS_STOP, BUS_ERROR };   /* BUS_ERROR: message on the stack top */

typedef struct DeviceOps {
  const char *kind;              /* vm:claims()'s kind: "uart", "lua", ... */
  /* One access of `size` (1-8) bytes at `addr` inside one of the device's
     ranges. Reads fill data. Required. */
  int (*access)(Device *d, BusCall *bc, uint64_t addr, int is_write, unsigned size, uint8_t *data);
  int (*tick)(Device *d, BusCall *bc);    /* every tick_ns while a vCPU runs */
  int (*flush)(Device *d, BusCall *bc);   /* when run() returns: hand out output */
  void (*begin_run)(Device *d);           /* run() starts (a terminal into raw mode) */
  void (*end_run)(Device *d);             /* run() ends, idempotent (restore it) */
  void (*close)(Device *d);               /* the VM closes or the device is removed */
  void (*stats)(Device *d, lua_State *L); /* add its counters to the table on top */
  /* snapshots (snapshot.h), called while no vCPU runs: save appends the
     device's state to b, a version number first (0, or -1: cannot be saved
     now, a message in err); restore checks [p, p+n) (apply 0: a message in
     err, nothing changed) or takes it (apply 1, after a check passed). A
     device without save is left out of snapshots (vm:snapshot says so). */
  int (*save)(Device *d, SnapBuf *b, char *err, size_t errlen);
  int (*restore)(Device *d, const uint8_t *p, size_t n, int apply, char *err, size_t errlen);
  int lua;                       /* calls Lua: run on the Lua thread (bus_lua), not locked */
} DeviceOps;

struct Device {
  const DeviceOps *ops;
  Vm *vm;
  uint64_t tick_ns;              /* tick period it wants while running, 0 = none */
  int ref;                       /* its userdata's key in the VM's table */
  int closed;
  pthread_mutex_t lock;          /* held around its ops when two vCPUs can reach it */
};

typedef struct Range {
  uint64_t first, last;          /* inclusive */
  Device *dev;
  uint64_t hits;                 /* accesses dispatched here (atomic) */
} Range;

typedef struct Bus {
  Range r[BUS_MAX_RANGES];       /* sorted by first, never overlapping */
  int n;
  unsigned gen;                  /* bumped by every claim and release */
} Bus;

/* the range holding addr, or NULL */
Range *bus_find(Bus *b, uint64_t addr);
/* claim [first, last] for d; raises "port 0x25 already claimed by 0x20-0x2f" */
void bus_claim(lua_State *L, Bus *b, int is_mmio, uint64_t first, uint64_t last, Device *d);
/* message for a clash with an existing range, or NULL when free; buf >= 96 bytes */
const char *bus_clash(Bus *b, int is_mmio, uint64_t first, uint64_t last, char *buf, size_t len);
/* release every range of d */
void bus_release(Bus *b, Device *d);

/* One port-I/O exit: `count` elements of `size` bytes at data (string I/O
   repeats the port). One MMIO exit: one access. Unclaimed reads fill all
   ones; *unclaimed is set. BUS_OK, BUS_STOP (bc->why) or BUS_ERROR. */
int bus_pio(Bus *b, BusCall *bc, uint16_t port, int is_write, unsigned size, uint32_t count,
            uint8_t *data, int *unclaimed);
int bus_mmio(Bus *b, BusCall *bc, uint64_t addr, int is_write, unsigned size, uint8_t *data,
             int *unclaimed);

/* Devices of a VM (in vm->devs): create one in a new userdata left on the
   stack top, kept alive by the VM (at stack index vm_idx) until removed. */
void *kvm_device_new(lua_State *L, int vm_idx, size_t size, const DeviceOps *ops);
/* raise "too many devices" when the VM has no room for one more (a
   constructor calls it before it changes anything) */
void kvm_device_room(lua_State *L, Vm *vm);
/* lock a device for a Lua method (the Lua thread): while vm:run's threads
   run, a vCPU thread may hold it while it waits for this very thread (its
   output going to a Lua function), so try for 100 ms, then raise */
void kvm_device_lock_lua(lua_State *L, Device *d);
/* release its ranges, close it and let it go */
void kvm_device_remove(lua_State *L, int vm_idx, Device *d);
/* the first device with these ops, or NULL */
Device *kvm_device_find(Vm *vm, const DeviceOps *ops);
/* over every device of the VM: the smallest tick period wanted (0 none) */
uint64_t kvm_devices_tick_ns(Vm *vm);
int  kvm_devices_tick(Vm *vm, BusCall *bc);
/* the same from vm:run's Lua thread: a device whose lock a vCPU thread
   holds (it may be waiting for this thread) is skipped until the next tick */
int  kvm_devices_try_tick(Vm *vm, BusCall *bc);
int  kvm_devices_flush(Vm *vm, BusCall *bc);
void kvm_devices_begin_run(Vm *vm);
void kvm_devices_end_run(Vm *vm);
void kvm_devices_close(Vm *vm);
void kvm_devices_stats(Vm *vm, lua_State *L);

/* the one IRQ helper: drive `irq` to `level` through the in-kernel irqchip
   (KVM_IRQ_LINE). 0, or -1 with errno (ENXIO without an irqchip). */
int kvm_irq_line(Vm *vm, int irq, int level);

/* a value kept alive in the VM's uservalue table: its integer key */
int  kvm_vm_ref(lua_State *L, int vm_idx, int value_idx);
void kvm_vm_unref(lua_State *L, int vm_idx, int ref);

#endif
