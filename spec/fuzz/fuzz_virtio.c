/*
** fuzz_virtio.c - libFuzzer harness for the virtio-mmio transport and the
** split virtqueue parser (csrc/virtio.c): the descriptor table, the avail
** ring, the queue size and the ring addresses all come from the fuzzer.
**
** No KVM is needed: a Vm that was never opened (fd -1: an interrupt fails
** and is counted) gets one memory region of 64 KiB at guest address 0x10000
** holding the input, and a device whose request handler reads the chain's
** readable stream and fills its writable one (what virtio-blk and virtio-rng
** do through the same helpers). The driver's register writes are made
** through virtio_mmio, as a guest's MMIO exits would be. ASan/UBSan are the
** oracle, and every notify must return: a chain is at most the queue long,
** a notify takes at most a queue of chains.
**
** Input: byte 0 picks QueueNum (including 0, non-powers of two and more than
** the maximum); bytes 1-6 the three ring offsets in the region (16-bit
** little-endian, unaligned ones included); byte 7 how many notifies follow
** (1-4), and for each the new avail index (bytes 8-15); the region's
** contents start at byte 16.
*/
#include "fuzz_common.h"

#include "luakvm.h"
#include "virtio.h"

#define GUEST   0x10000u
#define SIZE    0x10000u

static Vm vm;
static Memory mem;
static uint8_t *ram;
static Virtio dev;

static int request(Virtio *v, int q, VirtioChain *c, uint32_t *written) {
  uint8_t buf[64];
  uint64_t got = virtio_chain_read(c, 0, buf, sizeof buf);
  if (got > 0 && buf[0] == 0xee) { v->error = "the harness refuses it"; return -1; }
  /* the readable stream's tail, and the writable stream from its middle */
  if (c->rlen > 16) virtio_chain_read(c, c->rlen - 16, buf, 16);
  memset(buf, 0x5a, sizeof buf);
  uint64_t put = virtio_chain_write(c, c->wlen / 2, buf, sizeof buf);
  put += virtio_chain_write(c, 0, buf, c->wlen < 8 ? c->wlen : 8);
  *written = (uint32_t)(put > 0xffffffffu ? 0xffffffffu : put);
  if (c->wlen > 0) virtio_chain_write(c, c->wlen - 1, buf, 1);
  return 0;
}

static const VirtioType type = {
  .kind = "virtio-fuzz", .device_id = 4, .nqueues = 1, .request = request,
};

static void reg(uint64_t off, uint32_t val) {
  uint8_t d[4] = { (uint8_t)val, (uint8_t)(val >> 8), (uint8_t)(val >> 16), (uint8_t)(val >> 24) };
  virtio_mmio(&dev, off, 1, 4, d);
}

static uint32_t rd(uint64_t off) {
  uint8_t d[4];
  virtio_mmio(&dev, off, 0, 4, d);
  return (uint32_t)d[0] | (uint32_t)d[1] << 8 | (uint32_t)d[2] << 16 | (uint32_t)d[3] << 24;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static const uint32_t nums[16] = { 0, 1, 2, 3, 4, 8, 16, 32, 64, 128, 256, 257, 512, 7, 255, 0x10000 };
  if (ram == NULL) {
    ram = malloc(SIZE);
    if (ram == NULL) abort();
    vm.fd = -1;
    vm.kvm_fd = -1;
    mem.vm = &vm;
    mem.host = ram;
    mem.guest = GUEST;
    mem.size = SIZE;
    vm.regions[0] = &mem;
  }
  if (size < 16) return 0;
  memset(ram, 0, SIZE);
  memcpy(ram, data + 16, size - 16 < SIZE ? size - 16 : SIZE);
  memset(&dev, 0, sizeof dev);
  dev.dev.vm = &vm;
  virtio_init(&dev, &type, 0xfeb00000, 16, 0);

  uint32_t num = nums[data[0] & 15];
  uint32_t desc = GUEST + (data[1] | (uint32_t)data[2] << 8);
  uint32_t avail = GUEST + (data[3] | (uint32_t)data[4] << 8);
  uint32_t used = GUEST + (data[5] | (uint32_t)data[6] << 8);
  reg(0x070, 1);
  reg(0x070, 3);
  reg(0x024, 1); reg(0x020, 1);            /* VERSION_1 */
  reg(0x070, 11);
  reg(0x030, 0);
  reg(0x038, num);
  reg(0x080, desc); reg(0x084, 0);
  reg(0x090, avail); reg(0x094, 0);
  reg(0x0a0, used); reg(0x0a4, 0);
  reg(0x044, 1);
  reg(0x070, 15);                          /* DRIVER_OK: takes what is there */
  int notifies = 1 + (data[7] & 3);
  for (int i = 0; i < notifies; i++) {
    uint16_t idx = (uint16_t)(data[8 + 2 * i] | data[9 + 2 * i] << 8);
    uint8_t *a = kvm_gpa_ptr(&vm, avail + 2, 2);
    if (a) memcpy(a, &idx, 2);
    reg(0x050, 0);
    reg(0x064, rd(0x060));
  }
  /* the invariants: the used index never ran ahead of what was taken */
  if (!(dev.status & VIRTIO_S_NEEDS_RESET) && dev.q[0].ready &&
      (uint16_t)(dev.q[0].used_idx) != (uint16_t)(dev.q[0].last_avail)) abort();
  reg(0x070, 0);                           /* reset */
  if (dev.status != 0 || dev.q[0].ready || dev.isr != 0) abort();
  return 0;
}
