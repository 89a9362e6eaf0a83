/*
** fuzz_devsnap.c - libFuzzer harness for the devices' snapshot operations
** (DeviceOps.save and .restore, csrc/uart.c legacy.c power.c debugcon.c
** debugexit.c virtio.c virtio_blk.c): a device's state as vm:restore would
** read it from an untrusted file, then guest accesses to the device.
**
** A real VM is made once with every C device: a UART, the legacy ports,
** the power device, a debug console, a debug-exit port, a virtio block
** device (a 4-sector image), a virtio entropy device and a virtio console,
** an irqchip, 1 MiB of RAM at 0. Each device's first state is saved then
** and put back before every input, so an input starts from the same place.
**
** What must hold, besides ASan/UBSan's silence:
**   - a check (apply 0) that refuses gives a message and changes nothing
**     (the device saves the same bytes after it);
**   - a state the check takes is taken (apply 1), and saved again it is
**     the same bytes (the states are canonical), but for a virtio device
**     whose ready queue's rings lie outside guest memory (it then needs a
**     reset, as when the driver made it ready);
**   - after any accesses, what the device saves passes its own check:
**     nothing a guest can do leaves a state a restore would refuse.
**
** Input: byte 0 picks the device; byte 1 (mod 33) the number of accesses,
** 4 bytes each {offset, flags (bit 0 write, bits 2-1 size 1/2/4/1), value
** (16 bits)} at the device's first range (virtio: register offset * 4, a
** 4-byte access); the rest is the state. Seeds: FUZZ_DEVSNAP_SEEDS=dir
** writes each device's state after a few accesses there (the corpus in
** spec/fuzz/corpus/devsnap).
*/
#include "fuzz_common.h"

#include "luakvm.h"
#include "snapshot.h"

static lua_State *L;
static Vm *vm;
static char image[] = "/tmp/fuzz-devsnap-XXXXXX";
static SnapBuf first[KVM_MAX_DEVICES];    /* each device's state at the start */

static const char *SETUP =
  "local kvm = require 'kvm'\n"
  "local image = ...\n"
  "local vm = assert(kvm.vm())\n"
  "vm:memory{ guest = 0, size = 1 << 20 }\n"
  "assert(vm:irqchip())\n"
  "vm:serial{ output = false }\n"
  "vm:legacy_ports()\n"
  "vm:power()\n"
  "vm:debugcon{ output = false }\n"
  "vm:debug_exit(0x501)\n"
  "assert(vm:virtio_blk{ path = image })\n"
  "vm:virtio_rng()\n"
  "vm:virtio_console{ output = false }\n"
  "return vm\n";

static void save(Device *d, SnapBuf *b) {
  char err[256] = "";
  b->n = 0;
  if (d->ops->save(d, b, err, sizeof err) < 0 || b->oom) {
    fprintf(stderr, "\n*** %s: save failed: %s\n", d->ops->kind, err);
    abort();
  }
}

static int same(const SnapBuf *a, const SnapBuf *b) {
  return a->n == b->n && (a->n == 0 || memcmp(a->p, b->p, a->n) == 0);
}

static void die(Device *d, const char *what, const char *err) {
  fprintf(stderr, "\n*** %s: %s%s%s\n", d->ops->kind, what, err ? ": " : "", err ? err : "");
  abort();
}

/* d's claimed ranges, in address order: how many (at most max) */
static int ranges(Device *d, Range **out, int max, int *mmio) {
  int n = 0;
  *mmio = 0;
  for (int i = 0; i < vm->pio.n && n < max; i++)
    if (vm->pio.r[i].dev == d) out[n++] = &vm->pio.r[i];
  if (n > 0) return n;
  *mmio = 1;
  for (int i = 0; i < vm->mmio.n && n < max; i++)
    if (vm->mmio.r[i].dev == d) out[n++] = &vm->mmio.r[i];
  return n;
}

/* n accesses of 4 bytes each {where, flags, value (16 bits)}: a port
   device's range (where >> 4) and offset in it (where & 15), a virtio
   device's register (where & 0x7f) * 4 */
static void accesses(Device *d, const uint8_t *a, int n) {
  Range *rs[16];
  int mmio, nr = ranges(d, rs, 16, &mmio);
  if (nr == 0) abort();
  BusCall bc;
  memset(&bc, 0, sizeof bc);
  bc.L = L;
  for (int i = 0; i < n; i++, a += 4) {
    static const unsigned sizes[4] = {1, 2, 4, 1};
    uint8_t data[8] = {0};
    unsigned size = sizes[(a[1] >> 1) & 3];
    uint64_t addr;
    if (mmio) {
      addr = rs[0]->first + (a[0] & 0x7fu) * 4u;
      size = 4;
    } else {
      const Range *r = rs[(a[0] >> 4) % nr];
      uint64_t len = r->last - r->first + 1;
      addr = r->first + (a[0] & 15u) % len;
      if (size > r->last - addr + 1) size = 1;
    }
    uint32_t v = (uint32_t)a[2] | (uint32_t)a[3] << 8;
    memcpy(data, &v, 4);
    bc.why = NULL;
    d->ops->access(d, &bc, addr, a[1] & 1, size, data);
    lua_settop(L, 0);
  }
}

static void setup(void) {
  if (!fuzz_kvm_ok()) exit(1);
  int fd = mkstemp(image);
  if (fd < 0 || ftruncate(fd, 4 * 512) != 0) { perror("image"); abort(); }
  close(fd);
  L = fuzz_lua();
  if (luaL_loadstring(L, SETUP) != LUA_OK) fuzz_die(L, "setup");
  lua_pushstring(L, image);
  if (lua_pcall(L, 1, 1, 0) != LUA_OK) fuzz_die(L, "setup");
  vm = kvm_checkvm(L, -1);
  lua_setfield(L, LUA_REGISTRYINDEX, "fuzz_devsnap_vm");
  unlink(image);                        /* the device keeps it open */
  for (int i = 0; i < vm->ndevs; i++) save(vm->devs[i], &first[i]);
}

/* FUZZ_DEVSNAP_SEEDS=dir: each device's state after a few accesses
   that leave something in it (FIFO bytes, a queue set up), as seeds */
static void write_seeds(const char *dir) {
  static const uint8_t uart[] = {
    3, 1, 0x83, 0, 0, 1, 0x34, 0, 1, 1, 0x12, 0, 3, 1, 0x03, 0,   /* DLAB, divisor, 8N1 */
    2, 1, 0xc7, 0, 4, 1, 0x1b, 0, 1, 1, 0x0f, 0,                  /* FIFO, loopback, IER */
    0, 1, 'a', 0, 0, 1, 'b', 0, 0, 1, 'c', 0, 7, 1, 0x5a, 0,      /* 3 bytes in the FIFO */
  };
  /* ranges 0x60, 0x61, 0x64, 0x70-0x71, 0x80, 0xcf8-0xcff */
  static const uint8_t legacy[] = {
    0x30, 1, 0x8e, 0, 0x31, 1, 0x42, 0, 0x20, 1, 0xaa, 0,         /* CMOS 0x0e (NMI off), self test */
    0x10, 1, 0x03, 0, 0x40, 1, 0x2a, 0, 0x50, 5, 0x00, 0x80,      /* port 0x61, POST, 0xcf8 */
  };
  /* ranges 0x600-0x603, 0x604-0x605 */
  static const uint8_t power[] = { 0x02, 1, 0x55, 0, 0x10, 1, 0x01, 0 };
  /* virtio (register offset / 4): ACK|DRIVER, VERSION_1, FEATURES_OK, queue 0 of 8 at 0x10000 */
  static const uint8_t virtio[] = {
    0x1c, 1, 3, 0, 0x09, 1, 1, 0, 0x08, 1, 1, 0, 0x1c, 1, 11, 0,
    0x0c, 1, 0, 0, 0x0e, 1, 8, 0, 0x20, 1, 0x00, 0, 0x21, 1, 0, 0,
    0x24, 1, 0x00, 0x10, 0x25, 1, 0, 0, 0x28, 1, 0x00, 0x20, 0x29, 1, 0, 0,
    0x11, 1, 1, 0, 0x1c, 1, 15, 0,
  };
  for (int i = 0; i < vm->ndevs; i++) {
    Device *d = vm->devs[i];
    char err[256];
    if (d->ops->restore(d, first[i].p, first[i].n, 1, err, sizeof err) < 0) die(d, "first state", err);
    const uint8_t *a = NULL;
    size_t n = 0;
    if (strcmp(d->ops->kind, "serial") == 0) { a = uart; n = sizeof uart; }
    else if (strcmp(d->ops->kind, "legacy") == 0) { a = legacy; n = sizeof legacy; }
    else if (strcmp(d->ops->kind, "power") == 0) { a = power; n = sizeof power; }
    else if (strncmp(d->ops->kind, "virtio", 6) == 0) { a = virtio; n = sizeof virtio; }
    for (int pass = 0; pass < 2; pass++) {   /* the first state, then after the accesses */
      if (pass == 1 && n == 0) break;
      if (pass == 1) accesses(d, a, (int)(n / 4));
      SnapBuf b = {0};
      save(d, &b);
      char path[512];
      snprintf(path, sizeof path, "%s/%s-%d", dir, d->ops->kind, pass);
      FILE *f = fopen(path, "wb");
      if (f == NULL) { perror(path); abort(); }
      uint8_t head[2] = { (uint8_t)i, 0 };
      fwrite(head, 1, 2, f);
      fwrite(b.p, 1, b.n, f);
      fclose(f);
      free(b.p);
    }
  }
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc; (void)argv;
  setup();
  const char *seeds = getenv("FUZZ_DEVSNAP_SEEDS");
  if (seeds) { write_seeds(seeds); exit(0); }
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 2) return 0;
  int di = data[0] % vm->ndevs;
  Device *d = vm->devs[di];
  int nacc = data[1] % 33;
  const uint8_t *acc = data + 2;
  if (size - 2 < (size_t)nacc * 4) nacc = (int)((size - 2) / 4);
  const uint8_t *state = data + 2 + 4 * nacc;
  size_t n = size - 2 - 4 * (size_t)nacc;
  char err[256];
  static SnapBuf before, after;

  if (d->ops->restore(d, first[di].p, first[di].n, 1, err, sizeof err) < 0) die(d, "first state", err);
  save(d, &before);
  err[0] = 0;
  if (d->ops->restore(d, state, n, 0, err, sizeof err) < 0) {
    if (err[0] == 0) die(d, "a refusal without a message", NULL);
    save(d, &after);
    if (!same(&before, &after)) die(d, "a refused check changed the device", err);
  } else {
    if (d->ops->restore(d, state, n, 1, err, sizeof err) < 0) die(d, "apply failed after the check", err);
    save(d, &after);
    int virtio = strncmp(d->ops->kind, "virtio", 6) == 0;
    if (!virtio && (after.n != n || memcmp(after.p, state, n) != 0))
      die(d, "a state taken saves as other bytes", NULL);
  }
  accesses(d, acc, nacc);
  save(d, &after);
  if (d->ops->restore(d, after.p, after.n, 0, err, sizeof err) < 0)
    die(d, "its own saved state is refused", err);
  return 0;
}
