/*
** bus.c - the device bus (see bus.h): ranges, dispatch of a port-I/O or
** MMIO exit to the device that claimed it, the VM's list of devices, and
** the one IRQ helper.
*/
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>

#include "luakvm.h"

/* ---- ranges ---- */

Range *bus_find(Bus *b, uint64_t a) {
  int lo = 0, hi = b->n - 1;
  while (lo <= hi) {
    int mid = (lo + hi) / 2;
    if (a < b->r[mid].first) hi = mid - 1;
    else if (a > b->r[mid].last) lo = mid + 1;
    else return &b->r[mid];
  }
  return NULL;
}

static const char *space_name(int is_mmio) { return is_mmio ? "address" : "port"; }

const char *bus_clash(Bus *b, int is_mmio, uint64_t first, uint64_t last, char *buf, size_t len) {
  for (int i = 0; i < b->n; i++) {
    const Range *r = &b->r[i];
    if (first <= r->last && r->first <= last) {
      snprintf(buf, len, "%s 0x%llx already claimed by 0x%llx-0x%llx", space_name(is_mmio),
               (unsigned long long)(first > r->first ? first : r->first),
               (unsigned long long)r->first, (unsigned long long)r->last);
      return buf;
    }
  }
  if (b->n >= BUS_MAX_RANGES) {
    snprintf(buf, len, "too many %s ranges (at most %d)", space_name(is_mmio), BUS_MAX_RANGES);
    return buf;
  }
  return NULL;
}

void bus_claim(lua_State *L, Bus *b, int is_mmio, uint64_t first, uint64_t last, Device *d) {
  char buf[128];
  const char *msg = bus_clash(b, is_mmio, first, last, buf, sizeof buf);
  if (msg) luaL_error(L, "%s", msg);
  int i;
  for (i = b->n; i > 0 && b->r[i - 1].first > first; i--) b->r[i] = b->r[i - 1];
  b->r[i].first = first;
  b->r[i].last = last;
  b->r[i].dev = d;
  b->r[i].hits = 0;
  b->n++;
  b->gen++;
}

void bus_release(Bus *b, Device *d) {
  int k = 0;
  for (int i = 0; i < b->n; i++)
    if (b->r[i].dev != d) b->r[k++] = b->r[i];
  if (k != b->n) b->gen++;
  b->n = k;
}

/* ---- dispatch ---- */

int bus_lua(BusCall *bc, BusWork fn, void *arg) {
  if (bc->L) return fn(bc, arg);
  return bc->port->call(bc->port, bc, fn, arg);
}

/* a Lua device's access, handed to the Lua thread */
typedef struct LuaAccess {
  Device *d;
  uint64_t addr;
  int is_write;
  unsigned size;
  uint8_t *data;
  int ran;
} LuaAccess;

static int lua_access(BusCall *bc, void *arg) {
  LuaAccess *a = arg;
  a->ran = 1;
  return a->d->ops->access(a->d, bc, a->addr, a->is_write, a->size, a->data);
}

static __attribute__((noinline)) int access_lua(Device *d, BusCall *bc, uint64_t addr,
                                                int is_write, unsigned size, uint8_t *data) {
  LuaAccess a = {d, addr, is_write, size, data, 0};
  int st = bc->port->call(bc->port, bc, lua_access, &a);
  if (!a.ran && !is_write) memset(data, 0xff, size);   /* the run was ending: not served */
  return st;
}

static int access(Device *d, BusCall *bc, uint64_t addr, int is_write, unsigned size,
                  uint8_t *data) {
  if (d->ops->lua) {
    if (bc->L) return d->ops->access(d, bc, addr, is_write, size, data);
    return access_lua(d, bc, addr, is_write, size, data);
  }
  pthread_mutex_lock(&d->lock);
  int st = d->ops->access(d, bc, addr, is_write, size, data);
  pthread_mutex_unlock(&d->lock);
  return st;
}

/* string I/O (count > 1): every element, even after a stop (the
   instruction completes) */
static __attribute__((noinline)) int pio_string(Bus *b, BusCall *bc, Range *r, uint16_t port,
                                                int is_write, unsigned size, uint32_t count,
                                                uint8_t *data) {
  unsigned gen = b->gen;
  int outcome = BUS_OK;
  for (uint32_t i = 0; i < count; i++, data += size) {
    if (b->gen != gen) {         /* a Lua handler changed the claims: look again */
      gen = b->gen;
      r = bus_find(b, port);
      if (r == NULL) {
        if (!is_write) memset(data, 0xff, (size_t)(count - i) * size);
        break;
      }
    }
    int st = access(r->dev, bc, port, is_write, size, data);
    if (st == BUS_ERROR) {
      if (!is_write && i + 1 < count) memset(data + size, 0xff, (size_t)(count - i - 1) * size);
      return BUS_ERROR;
    }
    if (st == BUS_STOP) outcome = BUS_STOP;
  }
  return outcome;
}

int bus_pio(Bus *b, BusCall *bc, uint16_t port, int is_write, unsigned size, uint32_t count,
            uint8_t *data, int *unclaimed) {
  Range *r = bus_find(b, port);
  if (r == NULL) {
    *unclaimed = 1;
    if (!is_write) memset(data, 0xff, (size_t)size * count);   /* an empty bus */
    return BUS_OK;
  }
  __atomic_fetch_add(&r->hits, count, __ATOMIC_RELAXED);
  /* one element, the common case, without the string loop's set-up */
  if (count == 1) return access(r->dev, bc, port, is_write, size, data);
  return pio_string(b, bc, r, port, is_write, size, count, data);
}

int bus_mmio(Bus *b, BusCall *bc, uint64_t addr, int is_write, unsigned size, uint8_t *data,
             int *unclaimed) {
  Range *r = bus_find(b, addr);
  if (r == NULL) {
    *unclaimed = 1;
    if (!is_write) memset(data, 0xff, size);
    return BUS_OK;
  }
  __atomic_fetch_add(&r->hits, 1, __ATOMIC_RELAXED);
  return access(r->dev, bc, addr, is_write, size, data);
}

/* ---- values the VM keeps alive ---- */

int kvm_vm_ref(lua_State *L, int vm_idx, int value_idx) {
  value_idx = lua_absindex(L, value_idx);
  lua_getiuservalue(L, vm_idx, 1);
  int ref = (int)lua_rawlen(L, -1) + 1;   /* a border: t[ref] is nil */
  while (lua_rawgeti(L, -1, ref) != LUA_TNIL) { lua_pop(L, 1); ref++; }
  lua_pop(L, 1);
  lua_pushvalue(L, value_idx);
  lua_rawseti(L, -2, ref);
  lua_pop(L, 1);
  return ref;
}

void kvm_vm_unref(lua_State *L, int vm_idx, int ref) {
  if (ref <= 0) return;
  lua_getiuservalue(L, vm_idx, 1);
  lua_pushnil(L);
  lua_rawseti(L, -2, ref);
  lua_pop(L, 1);
}

/* ---- the VM's devices ---- */

void kvm_device_room(lua_State *L, Vm *vm) {
  if (vm->threads)
    luaL_error(L, "cannot add a device while vm:run() runs the vCPUs on threads (they read the bus)");
  if (vm->ndevs >= KVM_MAX_DEVICES) luaL_error(L, "too many devices (at most %d)", KVM_MAX_DEVICES);
}

void kvm_device_lock_lua(lua_State *L, Device *d) {
  if (!d->vm->threads) { pthread_mutex_lock(&d->lock); return; }
  for (int i = 0; i < 1000; i++) {
    if (pthread_mutex_trylock(&d->lock) == 0) return;
    struct timespec ts = {0, 100000};
    nanosleep(&ts, NULL);
  }
  luaL_error(L, "the %s device is busy on a vCPU thread (which may be waiting for this thread): "
             "try again after vm:run returns", d->ops->kind);
}

void *kvm_device_new(lua_State *L, int vm_idx, size_t size, const DeviceOps *ops) {
  Vm *vm = kvm_checkvm(L, vm_idx);
  vm_idx = lua_absindex(L, vm_idx);
  kvm_device_room(L, vm);
  Device *d = lua_newuserdatauv(L, size, 1);
  memset(d, 0, size);
  d->ops = ops;
  d->vm = vm;
  pthread_mutex_init(&d->lock, NULL);
  d->ref = kvm_vm_ref(L, vm_idx, -1);
  vm->devs[vm->ndevs++] = d;
  return d;
}

static void close_device(Device *d) {
  if (d->closed) return;
  d->closed = 1;
  if (d->ops->end_run) d->ops->end_run(d);
  if (d->ops->close) d->ops->close(d);
}

void kvm_device_remove(lua_State *L, int vm_idx, Device *d) {
  Vm *vm = d->vm;
  if (vm->threads)
    luaL_error(L, "cannot remove a device while vm:run() runs the vCPUs on threads (they read the bus)");
  bus_release(&vm->pio, d);
  bus_release(&vm->mmio, d);
  close_device(d);
  int k = 0;
  for (int i = 0; i < vm->ndevs; i++)
    if (vm->devs[i] != d) vm->devs[k++] = vm->devs[i];
  vm->ndevs = k;
  kvm_vm_unref(L, vm_idx, d->ref);   /* the userdata goes with the next GC */
}

Device *kvm_device_find(Vm *vm, const DeviceOps *ops) {
  for (int i = 0; i < vm->ndevs; i++)
    if (vm->devs[i]->ops == ops) return vm->devs[i];
  return NULL;
}

uint64_t kvm_devices_tick_ns(Vm *vm) {
  uint64_t t = 0;
  for (int i = 0; i < vm->ndevs; i++) {
    uint64_t d = vm->devs[i]->tick_ns;
    if (d && (t == 0 || d < t)) t = d;
  }
  return t;
}

/* run op over every device that has it, stopping at the first that does not
   return BUS_OK; the lock is taken for devices that are not Lua's. Over a
   copy of the list: an output function may add or remove devices. */
static int each(Vm *vm, BusCall *bc, int (*pick(const DeviceOps *))(Device *, BusCall *),
                int try) {
  Device *devs[KVM_MAX_DEVICES];
  int n = vm->ndevs;
  memcpy(devs, vm->devs, (size_t)n * sizeof(Device *));
  int outcome = BUS_OK;
  for (int i = 0; i < n && outcome == BUS_OK; i++) {
    Device *d = devs[i];
    int (*op)(Device *, BusCall *) = pick(d->ops);
    if (op == NULL || d->closed) continue;
    if (!d->ops->lua) {
      if (!try) pthread_mutex_lock(&d->lock);
      else if (pthread_mutex_trylock(&d->lock) != 0) continue;
    }
    outcome = op(d, bc);
    if (!d->ops->lua) pthread_mutex_unlock(&d->lock);
  }
  return outcome;
}

static int (*pick_tick(const DeviceOps *o))(Device *, BusCall *) { return o->tick; }
static int (*pick_flush(const DeviceOps *o))(Device *, BusCall *) { return o->flush; }

int kvm_devices_tick(Vm *vm, BusCall *bc) { return each(vm, bc, pick_tick, 0); }
int kvm_devices_try_tick(Vm *vm, BusCall *bc) { return each(vm, bc, pick_tick, 1); }
int kvm_devices_flush(Vm *vm, BusCall *bc) { return each(vm, bc, pick_flush, 0); }

void kvm_devices_begin_run(Vm *vm) {
  for (int i = 0; i < vm->ndevs; i++)
    if (vm->devs[i]->ops->begin_run && !vm->devs[i]->closed) vm->devs[i]->ops->begin_run(vm->devs[i]);
}

/* in the reverse order of begin_run: two UARTs on one terminal leave it
   as the first found it */
void kvm_devices_end_run(Vm *vm) {
  for (int i = vm->ndevs - 1; i >= 0; i--)
    if (vm->devs[i]->ops->end_run) vm->devs[i]->ops->end_run(vm->devs[i]);
}

void kvm_devices_close(Vm *vm) {
  for (int i = vm->ndevs - 1; i >= 0; i--) close_device(vm->devs[i]);
}

void kvm_devices_stats(Vm *vm, lua_State *L) {
  for (int i = 0; i < vm->ndevs; i++)
    if (vm->devs[i]->ops->stats) vm->devs[i]->ops->stats(vm->devs[i], L);
}

/* ---- interrupts ---- */

int kvm_irq_line(Vm *vm, int irq, int level) {
  if (!vm->has_irqchip || vm->fd < 0) { errno = ENXIO; return -1; }
  struct kvm_irq_level il;
  memset(&il, 0, sizeof il);
  il.irq = (uint32_t)irq;
  il.level = (uint32_t)level;
  return ioctl(vm->fd, KVM_IRQ_LINE, &il);
}
