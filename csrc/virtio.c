/*
** virtio.c - the virtio-mmio transport, register layout version 2 (virtio
** 1.2, 4.2.2), and the split virtqueue (2.7): what every virtio device of
** the core shares. A device type (virtio_blk.c, virtio_rng.c) gives its id,
** features, config space and a handler for one descriptor chain.
**
** Everything the driver writes is untrusted. A queue is checked when it is
** made ready (QueueNum a power of two up to QueueNumMax, the rings aligned
** and inside guest memory); at every notify each avail index, head,
** descriptor index, buffer address and length is checked again, a chain is
** at most QueueNum descriptors long (a loop is too long), readable buffers
** come before writable ones, and one notify takes at most QueueNum chains.
** A driver that breaks a rule gets DEVICE_NEEDS_RESET and a configuration
** interrupt; the device takes no more requests until it is reset. The host
** never reads outside guest memory and never loops on the guest's say-so.
**
** Requests are handled on the vCPU thread that writes QueueNotify, under the
** device's lock; the interrupt is a level on an IOAPIC pin through
** kvm_irq_line: high while InterruptStatus is not 0 (the DSDT says level,
** active high), as kvmtool drives it.
*/

/*** Virtio devices (vm:virtio_blk, vm:virtio_rng) are kvm.virtio objects.
@classmod kvm.virtio
*/
#include <stdio.h>
#include <string.h>

#include "snapdev.h"
#include "virtio.h"

#define VIRTIO_MAGIC   0x74726976   /* "virt" */
#define VIRTIO_VENDOR  0x4d564b4c   /* "LKVM" */

/* registers (4.2.2) */
enum {
  R_MAGIC = 0x000, R_VERSION = 0x004, R_DEVICE_ID = 0x008, R_VENDOR_ID = 0x00c,
  R_DEVICE_FEATURES = 0x010, R_DEVICE_FEATURES_SEL = 0x014,
  R_DRIVER_FEATURES = 0x020, R_DRIVER_FEATURES_SEL = 0x024,
  R_QUEUE_SEL = 0x030, R_QUEUE_NUM_MAX = 0x034, R_QUEUE_NUM = 0x038,
  R_QUEUE_READY = 0x044, R_QUEUE_NOTIFY = 0x050,
  R_INTERRUPT_STATUS = 0x060, R_INTERRUPT_ACK = 0x064, R_STATUS = 0x070,
  R_QUEUE_DESC_LOW = 0x080, R_QUEUE_DESC_HIGH = 0x084,
  R_QUEUE_DRIVER_LOW = 0x090, R_QUEUE_DRIVER_HIGH = 0x094,
  R_QUEUE_DEVICE_LOW = 0x0a0, R_QUEUE_DEVICE_HIGH = 0x0a4,
  R_SHM_SEL = 0x0ac, R_SHM_LEN_LOW = 0x0b0, R_SHM_LEN_HIGH = 0x0b4,
  R_SHM_BASE_LOW = 0x0b8, R_SHM_BASE_HIGH = 0x0bc,
  R_CONFIG_GENERATION = 0x0fc, R_CONFIG = 0x100,
};

/* descriptor flags (2.7.5) */
#define VIRTQ_DESC_F_NEXT      1
#define VIRTQ_DESC_F_WRITE     2
#define VIRTQ_DESC_F_INDIRECT  4

static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t get32(const uint8_t *p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t get64(const uint8_t *p) { return get32(p) | (uint64_t)get32(p + 4) << 32; }
static void put32(uint8_t *p, uint32_t v) {
  p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
}

/* ---- interrupts ---- */

static void update_irq(Virtio *v) {
  int level = v->isr != 0;
  if (level == v->irq_level) return;
  if (kvm_irq_line(v->dev.vm, v->irq, level) < 0) { v->irq_failures++; return; }
  v->irq_level = level;
  if (level) v->irqs++;
}

/* the driver broke a rule: DEVICE_NEEDS_RESET and a configuration interrupt */
static int fail(Virtio *v, const char *why) {
  if (!(v->status & VIRTIO_S_NEEDS_RESET)) {
    v->error = why;
    v->errors++;
    v->status |= VIRTIO_S_NEEDS_RESET;
    if (v->status & VIRTIO_S_DRIVER_OK) {
      v->isr |= VIRTIO_ISR_CONFIG;
      update_irq(v);
    }
  }
  return -1;
}

static void reset(Virtio *v) {
  memset(v->q, 0, sizeof v->q);
  v->driver_features = 0;
  v->dev_feat_sel = v->drv_feat_sel = v->queue_sel = 0;
  v->status = 0;
  v->isr = 0;
  v->error = NULL;
  update_irq(v);
}

/* ---- the split virtqueue ---- */

uint64_t virtio_chain_read(const VirtioChain *c, uint64_t off, void *buf, uint64_t len) {
  uint8_t *out = buf;
  uint64_t done = 0, at = 0;
  for (int i = 0; i < c->n && done < len; i++) {
    const VirtioSeg *s = &c->seg[i];
    if (s->write) continue;
    if (off < at + s->len) {
      uint64_t from = off > at ? off - at : 0;
      uint64_t n = s->len - from;
      if (n > len - done) n = len - done;
      memcpy(out + done, s->p + from, n);
      done += n;
      off += n;
    }
    at += s->len;
  }
  return done;
}

uint64_t virtio_chain_write(const VirtioChain *c, uint64_t off, const void *buf, uint64_t len) {
  const uint8_t *in = buf;
  uint64_t done = 0, at = 0;
  for (int i = 0; i < c->n && done < len; i++) {
    const VirtioSeg *s = &c->seg[i];
    if (!s->write) continue;
    if (off < at + s->len) {
      uint64_t from = off > at ? off - at : 0;
      uint64_t n = s->len - from;
      if (n > len - done) n = len - done;
      memcpy(s->p + from, in + done, n);
      done += n;
      off += n;
    }
    at += s->len;
  }
  return done;
}

/* the chain starting at descriptor `head` into c: every buffer in guest
   memory, at most num descriptors, readable ones first */
static int walk_chain(Virtio *v, const uint8_t *desc, uint32_t num, uint16_t head, VirtioChain *c) {
  Vm *vm = v->dev.vm;
  uint32_t i = head;
  c->seg = v->seg;
  c->n = 0;
  c->rlen = c->wlen = 0;
  for (;;) {
    if ((uint32_t)c->n >= num) return fail(v, "a descriptor chain is longer than the queue (a loop?)");
    const uint8_t *d = desc + 16 * (size_t)i;   /* read once: the guest may change it */
    uint64_t addr = get64(d);
    uint32_t len = get32(d + 8);
    uint16_t flags = get16(d + 12), next = get16(d + 14);
    if (flags & VIRTQ_DESC_F_INDIRECT) return fail(v, "an indirect descriptor (not offered)");
    int w = (flags & VIRTQ_DESC_F_WRITE) != 0;
    if (!w && c->wlen > 0) return fail(v, "a readable descriptor after a writable one");
    uint8_t *p = w ? kvm_gpa_wptr(vm, addr, len) : kvm_gpa_ptr(vm, addr, len);
    if (p == NULL) return fail(v, "a buffer outside guest memory");
    c->seg[c->n].p = p;
    c->seg[c->n].len = len;
    c->seg[c->n].write = w;
    c->n++;
    if (w) c->wlen += len; else c->rlen += len;
    if (!(flags & VIRTQ_DESC_F_NEXT)) return 0;
    if (next >= num) return fail(v, "a descriptor's next is past the queue");
    i = next;
  }
}

int virtio_queue_process(Virtio *v, int qi) {
  VirtioQueue *q = &v->q[qi];
  if (!q->ready || (v->status & VIRTIO_S_NEEDS_RESET)) return 0;
  Vm *vm = v->dev.vm;
  uint32_t num = q->num;
  /* looked up at every notify: guest memory may have changed since ready */
  const uint8_t *desc = kvm_gpa_ptr(vm, q->desc, 16ull * num);
  uint8_t *avail = kvm_gpa_ptr(vm, q->avail, 6 + 2ull * num);
  uint8_t *used = kvm_gpa_wptr(vm, q->used, 6 + 8ull * num);
  if (!desc || !avail || !used) return fail(v, "a ring outside guest memory");
  uint16_t avail_idx = __atomic_load_n((uint16_t *)(avail + 2), __ATOMIC_ACQUIRE);
  if ((uint16_t)(avail_idx - q->last_avail) > num)
    return fail(v, "the avail index is more than a queue ahead");
  int handled = 0;
  while (q->last_avail != avail_idx) {
    uint16_t head = get16(avail + 4 + 2 * (size_t)(q->last_avail % num));
    if (head >= num) return fail(v, "an avail ring entry past the queue");
    VirtioChain c;
    if (walk_chain(v, desc, num, head, &c) < 0) return -1;
    uint32_t written = 0;
    int st = v->type->request(v, qi, &c, &written);
    if (st < 0) return fail(v, v->error ? v->error : "a request the device cannot take");
    if (st > 0) break;                  /* the device takes it later */
    if (written > c.wlen) written = (uint32_t)c.wlen;
    uint8_t *u = used + 4 + 8 * (size_t)(q->used_idx % num);
    put32(u, head);
    put32(u + 4, written);
    q->used_idx++;
    __atomic_store_n((uint16_t *)(used + 2), q->used_idx, __ATOMIC_RELEASE);
    q->last_avail++;
    v->chains++;
    handled++;
  }
  if (handled) {
    v->isr |= VIRTIO_ISR_USED;
    update_irq(v);
  }
  return handled;
}

/* why queue q cannot be ready as it is set up, or NULL: its size, its
   rings' alignment and, with memory, that the rings lie in guest memory */
static const char *queue_problem(Virtio *v, const VirtioQueue *q, int memory) {
  uint32_t n = q->num;
  if (n == 0 || n > VIRTIO_QUEUE_MAX || (n & (n - 1)) != 0)
    return "QueueNum is not a power of two up to QueueNumMax";
  if ((q->desc & 15) || (q->avail & 1) || (q->used & 3)) return "a ring is misaligned";
  if (memory && (!kvm_gpa_ptr(v->dev.vm, q->desc, 16ull * n) ||
                 !kvm_gpa_ptr(v->dev.vm, q->avail, 6 + 2ull * n) ||
                 !kvm_gpa_ptr(v->dev.vm, q->used, 6 + 8ull * n)))
    return "a ring outside guest memory";
  return NULL;
}

/* QueueReady = 1: the queue's size and rings are checked once here (and
   when a snapshot brings a ready queue back) */
static void queue_ready(Virtio *v, VirtioQueue *q) {
  const char *why = queue_problem(v, q, 1);
  if (why) {
    fail(v, why);
    return;
  }
  q->ready = 1;
}

/* ---- registers ---- */

static VirtioQueue *sel_queue(Virtio *v) {
  return v->queue_sel < (uint32_t)v->type->nqueues ? &v->q[v->queue_sel] : NULL;
}

static uint32_t reg_read(Virtio *v, uint64_t off) {
  VirtioQueue *q = sel_queue(v);
  switch (off) {
  case R_MAGIC: return VIRTIO_MAGIC;
  case R_VERSION: return 2;
  case R_DEVICE_ID: return v->type->device_id;
  case R_VENDOR_ID: return VIRTIO_VENDOR;
  case R_DEVICE_FEATURES:
    return v->dev_feat_sel == 0 ? (uint32_t)v->features
         : v->dev_feat_sel == 1 ? (uint32_t)(v->features >> 32) : 0;
  case R_QUEUE_NUM_MAX: return q ? VIRTIO_QUEUE_MAX : 0;
  case R_QUEUE_NUM: return q ? q->num : 0;
  case R_QUEUE_READY: return q ? q->ready : 0;
  case R_INTERRUPT_STATUS: return v->isr;
  case R_STATUS: return v->status;
  case R_QUEUE_DESC_LOW: return q ? (uint32_t)q->desc : 0;
  case R_QUEUE_DESC_HIGH: return q ? (uint32_t)(q->desc >> 32) : 0;
  case R_QUEUE_DRIVER_LOW: return q ? (uint32_t)q->avail : 0;
  case R_QUEUE_DRIVER_HIGH: return q ? (uint32_t)(q->avail >> 32) : 0;
  case R_QUEUE_DEVICE_LOW: return q ? (uint32_t)q->used : 0;
  case R_QUEUE_DEVICE_HIGH: return q ? (uint32_t)(q->used >> 32) : 0;
  case R_SHM_LEN_LOW: case R_SHM_LEN_HIGH:    /* no shared memory regions */
  case R_SHM_BASE_LOW: case R_SHM_BASE_HIGH: return 0xffffffffu;
  case R_CONFIG_GENERATION: return v->config_gen;
  default: return 0;
  }
}

/* half of a 64-bit ring address, while the queue is not ready */
static void set_half(uint64_t *a, int high, uint32_t val) {
  if (high) *a = (*a & 0xffffffffu) | (uint64_t)val << 32;
  else *a = (*a & ~(uint64_t)0xffffffffu) | val;
}

static void set_status(Virtio *v, uint32_t val) {
  if (val == 0) { reset(v); return; }
  uint32_t old = v->status;
  val &= 0xff;
  if ((val & VIRTIO_S_FEATURES_OK) && !(old & VIRTIO_S_FEATURES_OK)) {
    /* only what was offered, and the modern interface: else FEATURES_OK stays clear */
    if ((v->driver_features & ~v->features) || !(v->driver_features & VIRTIO_F_VERSION_1))
      val &= ~(uint32_t)VIRTIO_S_FEATURES_OK;
  }
  v->status = val | (old & VIRTIO_S_NEEDS_RESET);
  if ((v->status & VIRTIO_S_DRIVER_OK) && !(old & VIRTIO_S_DRIVER_OK))
    for (int i = 0; i < v->type->nqueues; i++) virtio_queue_process(v, i);
}

static void reg_write(Virtio *v, uint64_t off, uint32_t val) {
  VirtioQueue *q = sel_queue(v);
  int q_open = q && !q->ready;        /* a queue's set-up changes only while not ready */
  switch (off) {
  case R_DEVICE_FEATURES_SEL: v->dev_feat_sel = val; break;
  case R_DRIVER_FEATURES:
    if (v->status & VIRTIO_S_FEATURES_OK) break;
    if (v->drv_feat_sel == 0) set_half(&v->driver_features, 0, val);
    else if (v->drv_feat_sel == 1) set_half(&v->driver_features, 1, val);
    break;
  case R_DRIVER_FEATURES_SEL: v->drv_feat_sel = val; break;
  case R_QUEUE_SEL: v->queue_sel = val; break;
  case R_QUEUE_NUM: if (q_open) q->num = val; break;
  case R_QUEUE_READY:
    if (!q) break;
    if (val == 1 && !q->ready) {
      queue_ready(v, q);
      if (q->ready && (v->status & VIRTIO_S_DRIVER_OK)) virtio_queue_process(v, (int)v->queue_sel);
    } else if (val == 0) {
      q->ready = 0;
    }
    break;
  case R_QUEUE_NOTIFY:
    v->notifies++;
    if (val < (uint32_t)v->type->nqueues && (v->status & VIRTIO_S_DRIVER_OK))
      virtio_queue_process(v, (int)val);
    break;
  case R_INTERRUPT_ACK:
    v->isr &= ~val;
    update_irq(v);
    break;
  case R_STATUS: set_status(v, val); break;
  case R_QUEUE_DESC_LOW: case R_QUEUE_DESC_HIGH:
    if (q_open) set_half(&q->desc, off == R_QUEUE_DESC_HIGH, val);
    break;
  case R_QUEUE_DRIVER_LOW: case R_QUEUE_DRIVER_HIGH:
    if (q_open) set_half(&q->avail, off == R_QUEUE_DRIVER_HIGH, val);
    break;
  case R_QUEUE_DEVICE_LOW: case R_QUEUE_DEVICE_HIGH:
    if (q_open) set_half(&q->used, off == R_QUEUE_DEVICE_HIGH, val);
    break;
  default: break;                     /* read-only and reserved registers */
  }
}

void virtio_mmio(Virtio *v, uint64_t off, int is_write, unsigned size, uint8_t *data) {
  if (off >= VIRTIO_MMIO_SIZE || size == 0 || size > 8 || off + size > VIRTIO_MMIO_SIZE) {
    if (!is_write) memset(data, 0, size > 8 ? 8 : size);
    return;
  }
  if (off >= R_CONFIG) {              /* config space: any width; the driver only reads it */
    if (!is_write) memcpy(data, v->config + (off - R_CONFIG), size);
    return;
  }
  if (size != 4 || (off & 3)) {       /* registers are 32 bits wide, aligned */
    if (!is_write) memset(data, 0, size);
    return;
  }
  if (is_write) reg_write(v, off, get32(data));
  else put32(data, reg_read(v, off));
}

/* ---- the device on the bus ---- */

int virtio_access(Device *d, BusCall *bc, uint64_t addr, int is_write, unsigned size, uint8_t *data) {
  Virtio *v = (Virtio *)d;
  virtio_mmio(v, addr - v->base, is_write, size, data);
  return BUS_OK;
}

void virtio_close(Device *d) {
  Virtio *v = (Virtio *)d;
  if (v->irq_level && v->dev.vm->fd >= 0) kvm_irq_line(v->dev.vm, v->irq, 0);
  v->irq_level = 0;
  if (v->type->close) v->type->close(v);
}

void virtio_stats(Device *d, lua_State *L) {
  Virtio *v = (Virtio *)d;
  kvm_add_count(L, "virtio_notifies", v->notifies);
  kvm_add_count(L, "virtio_chains", v->chains);
  kvm_add_count(L, "virtio_errors", v->errors);
  kvm_add_count(L, "virtio_irqs", v->irqs);
  if (v->type->stats) v->type->stats(v, L);
}

/* ---- snapshots ---- */

/* Version 1 of the transport's state, after the version word: the device id,
   the number of queues and the IRQ (u32 each), the features offered and
   accepted (u64 each), the three selectors, status, InterruptStatus and the
   config generation (u32 each), the config space (VIRTIO_CONFIG_MAX bytes),
   why the device needs a reset (a length byte and the message, printable
   ASCII; 0: it does not), then per queue QueueNum and QueueReady (u32), the
   desc, avail and used rings' addresses (u64) and the next avail and used
   entries (u16); last the type's state (a u32 length and its bytes, 0 when
   it keeps none). The base is where the device was found; the IRQ line
   follows InterruptStatus and is driven to its level on a restore; a ready
   queue's rings are checked against guest memory again. The counters are
   vm:stats', not the device's.

   What a driver may set to anything is taken as it is: the selectors (a read
   through one past the end gives 0), a queue's QueueNum and rings while it is
   not ready (checked when the driver makes it ready). What the device
   guarantees is checked: status a byte, FEATURES_OK only with features that
   were offered and VERSION_1, InterruptStatus bits 1-0, a message exactly
   when DEVICE_NEEDS_RESET is set, a ready queue's size and alignment. */
#define VIRTIO_SNAP_VERSION 1

typedef struct VirtioSnap {
  uint32_t device_id, nqueues, irq;
  uint64_t features, driver_features;
  uint32_t dev_feat_sel, drv_feat_sel, queue_sel, status, isr, config_gen;
  uint8_t config[VIRTIO_CONFIG_MAX];
  uint8_t error_len;
  char error[VIRTIO_ERROR_MAX];
  VirtioQueue q[VIRTIO_MAX_QUEUES];
  const uint8_t *type_state;
  uint32_t type_len;
} VirtioSnap;

int virtio_save(Device *d, SnapBuf *b, char *err, size_t errlen) {
  Virtio *v = (Virtio *)d;
  int st = 0;
  snapbuf_u32(b, VIRTIO_SNAP_VERSION);
  snapbuf_u32(b, v->type->device_id);
  snapbuf_u32(b, (uint32_t)v->type->nqueues);
  snapbuf_u32(b, (uint32_t)v->irq);
  snapbuf_u64(b, v->features);
  snapbuf_u64(b, v->driver_features);
  const uint32_t regs[6] = { v->dev_feat_sel, v->drv_feat_sel, v->queue_sel, v->status, v->isr,
                             v->config_gen };
  snapbuf_put(b, regs, sizeof regs);
  snapbuf_put(b, v->config, sizeof v->config);
  /* the message as printable ASCII, cut to VIRTIO_ERROR_MAX - 1 (the core's are shorter) */
  char msg[VIRTIO_ERROR_MAX];
  size_t elen = 0;
  if (v->status & VIRTIO_S_NEEDS_RESET) {
    const char *e = v->error && *v->error ? v->error : "unknown";
    for (; *e && elen < sizeof msg - 1; e++) {
      char c = *e;
      if (c < 0x20 || c > 0x7e) c = '?';
      msg[elen++] = c;
    }
  }
  snapbuf_u8(b, (uint8_t)elen);
  snapbuf_put(b, msg, elen);
  for (int i = 0; i < v->type->nqueues; i++) {
    const VirtioQueue *q = &v->q[i];
    snapbuf_u32(b, q->num);
    snapbuf_u32(b, q->ready);
    snapbuf_u64(b, q->desc);
    snapbuf_u64(b, q->avail);
    snapbuf_u64(b, q->used);
    snapbuf_u16(b, q->last_avail);
    snapbuf_u16(b, q->used_idx);
  }
  size_t len_at = b->n;
  snapbuf_u32(b, 0);                       /* the type's length, filled in below */
  if (v->type->save) {
    st = v->type->save(v, b, err, errlen);
    if (st == 0 && !b->oom) {
      uint32_t len = (uint32_t)(b->n - len_at - 4);
      memcpy(b->p + len_at, &len, 4);
    }
  }
  return st < 0 ? -1 : snapdev_saved(b, err, errlen);
}

/* read and check the transport's state (not the type's): 0 or -1 */
static int snap_read(Virtio *v, const uint8_t *p, size_t n, VirtioSnap *t, char *err, size_t errlen) {
  SnapRd r = { p, n, 0, 0 };
  if (snapdev_version(&r, VIRTIO_SNAP_VERSION, err, errlen) < 0) return -1;
  t->device_id = snaprd_u32(&r);
  t->nqueues = snaprd_u32(&r);
  t->irq = snaprd_u32(&r);
  if (!r.bad && (t->device_id != v->type->device_id || t->nqueues != (uint32_t)v->type->nqueues))
    return snapdev_fail(err, errlen, "virtio device %u with %u queues, this one is device %u with %d",
                        t->device_id, t->nqueues, v->type->device_id, v->type->nqueues);
  t->features = snaprd_u64(&r);
  t->driver_features = snaprd_u64(&r);
  uint32_t regs[6];
  snaprd_get(&r, regs, sizeof regs);
  t->dev_feat_sel = regs[0]; t->drv_feat_sel = regs[1]; t->queue_sel = regs[2];
  t->status = regs[3]; t->isr = regs[4]; t->config_gen = regs[5];
  snaprd_get(&r, t->config, sizeof t->config);
  t->error_len = snaprd_u8(&r);
  if (t->error_len >= sizeof t->error)
    return snapdev_fail(err, errlen, "an error message of %u bytes (at most %zu)", t->error_len,
                        sizeof t->error - 1);
  snaprd_get(&r, t->error, t->error_len);
  t->error[t->error_len] = 0;
  for (int i = 0; i < v->type->nqueues; i++) {
    VirtioQueue *q = &t->q[i];
    q->num = snaprd_u32(&r);
    q->ready = snaprd_u32(&r);
    q->desc = snaprd_u64(&r);
    q->avail = snaprd_u64(&r);
    q->used = snaprd_u64(&r);
    q->last_avail = snaprd_u16(&r);
    q->used_idx = snaprd_u16(&r);
  }
  t->type_len = snaprd_u32(&r);
  if (!r.bad && t->type_len > r.n - r.off)
    return snapdev_fail(err, errlen, "the device type's state of %u bytes runs past the state's end",
                        t->type_len);
  t->type_state = r.bad ? NULL : r.p + r.off;
  if (!r.bad) r.off += t->type_len;
  if (snapdev_end(&r, err, errlen) < 0) return -1;

  /* the type first: it says best why another device is not this one */
  if (v->type->restore) {
    if (v->type->restore(v, t->type_state, t->type_len, 0, err, errlen) < 0) return -1;
  } else if (t->type_len != 0) {
    return snapdev_fail(err, errlen, "%u bytes of %s state (it keeps none)", t->type_len, v->type->kind);
  }
  if (t->irq != (uint32_t)v->irq)
    return snapdev_fail(err, errlen, "a device on IRQ %u, this one is on IRQ %d", t->irq, v->irq);
  if (t->features != v->features)
    return snapdev_fail(err, errlen, "features 0x%llx offered, this device offers 0x%llx",
                        (unsigned long long)t->features, (unsigned long long)v->features);
  if (t->status > 0xff) return snapdev_fail(err, errlen, "status 0x%x (a byte)", t->status);
  if ((t->status & VIRTIO_S_FEATURES_OK) &&
      ((t->driver_features & ~t->features) || !(t->driver_features & VIRTIO_F_VERSION_1)))
    return snapdev_fail(err, errlen, "FEATURES_OK with features 0x%llx accepted of 0x%llx offered",
                        (unsigned long long)t->driver_features, (unsigned long long)t->features);
  if (t->isr & ~(uint32_t)(VIRTIO_ISR_USED | VIRTIO_ISR_CONFIG))
    return snapdev_fail(err, errlen, "InterruptStatus 0x%x (bits 1-0 only)", t->isr);
  if (!(t->status & VIRTIO_S_NEEDS_RESET) != !t->error_len)
    return snapdev_fail(err, errlen, "DEVICE_NEEDS_RESET %s a message why",
                        t->error_len ? "clear with" : "set without");
  for (unsigned i = 0; i < t->error_len; i++)
    if (t->error[i] < 0x20 || t->error[i] > 0x7e)
      return snapdev_fail(err, errlen, "a byte 0x%02x in the error message", (uint8_t)t->error[i]);
  for (int i = 0; i < v->type->nqueues; i++) {
    const VirtioQueue *q = &t->q[i];
    const char *why = q->ready ? queue_problem(v, q, 0) : NULL;
    if (q->ready > 1) why = "QueueReady is neither 0 nor 1";
    if (why) return snapdev_fail(err, errlen, "queue %d: %s", i, why);
  }
  return 0;
}

int virtio_restore(Device *d, const uint8_t *p, size_t n, int apply, char *err, size_t errlen) {
  Virtio *v = (Virtio *)d;
  VirtioSnap t;
  memset(&t, 0, sizeof t);
  if (snap_read(v, p, n, &t, err, errlen) < 0) return -1;
  if (!apply) return 0;
  v->driver_features = t.driver_features;
  v->dev_feat_sel = t.dev_feat_sel;
  v->drv_feat_sel = t.drv_feat_sel;
  v->queue_sel = t.queue_sel;
  v->status = t.status;
  v->isr = t.isr;
  v->config_gen = t.config_gen;
  memcpy(v->config, t.config, sizeof v->config);
  memcpy(v->error_buf, t.error, sizeof v->error_buf);
  v->error = t.error_len ? v->error_buf : NULL;
  memcpy(v->q, t.q, sizeof v->q);
  if (v->type->restore) v->type->restore(v, t.type_state, t.type_len, 1, err, errlen);
  /* a ready queue's rings in this VM's memory, as when the driver made it
     ready: the device needs a reset when they are not */
  for (int i = 0; i < v->type->nqueues; i++) {
    VirtioQueue *q = &v->q[i];
    if (q->ready && queue_problem(v, q, 1)) {
      q->ready = 0;
      queue_ready(v, q);
    }
  }
  /* the line at InterruptStatus' level, whatever it was */
  int level = v->isr != 0;
  v->irq_level = kvm_irq_line(v->dev.vm, v->irq, level) == 0 ? level : 0;
  return 0;
}

void virtio_init(Virtio *v, const VirtioType *type, uint64_t base, int irq, uint64_t features) {
  v->type = type;
  v->base = base;
  v->irq = irq;
  v->features = features | VIRTIO_F_VERSION_1;
}

/* ---- kvm.virtio: the device object ---- */

static Virtio *checkvirtio(lua_State *L) {
  Virtio *v = luaL_checkudata(L, 1, VIRTIO_MT);
  if (v->dev.closed) luaL_error(L, "attempt to use a closed kvm.virtio");
  return v;
}

static uint64_t check_access(lua_State *L, unsigned *size) {
  lua_Integer off = luaL_checkinteger(L, 2);
  lua_Integer sz = luaL_checkinteger(L, 3);
  luaL_argcheck(L, sz == 1 || sz == 2 || sz == 4 || sz == 8, 3, "size must be 1, 2, 4 or 8");
  luaL_argcheck(L, off >= 0 && off + sz <= VIRTIO_MMIO_SIZE, 2, "offset outside the device's 0x200 bytes");
  *size = (unsigned)sz;
  return (uint64_t)off;
}

/*** Read a register or config space as the guest does (an MMIO read at
`base + offset`): a test's or a script's view of the transport.
@function read
@tparam integer offset 0..0x1ff
@tparam integer size 1, 2, 4 or 8 (registers below 0x100 answer 4-byte reads only, others read 0)
@treturn integer the value (little-endian)
@raise on a bad offset or size, or a closed device
*/
static int l_virtio_read(lua_State *L) {
  Virtio *v = checkvirtio(L);
  unsigned size;
  uint64_t off = check_access(L, &size);
  uint8_t data[8] = {0};
  kvm_device_lock_lua(L, &v->dev);
  virtio_mmio(v, off, 0, size, data);
  pthread_mutex_unlock(&v->dev.lock);
  uint64_t val = 0;
  for (unsigned i = 0; i < size; i++) val |= (uint64_t)data[i] << (8 * i);
  lua_pushinteger(L, (lua_Integer)val);
  return 1;
}

/*** Write a register as the guest does (an MMIO write at `base + offset`):
a QueueNotify write handles the queue's requests before it returns.
@function write
@tparam integer offset 0..0x1ff
@tparam integer size 1, 2, 4 or 8
@tparam integer value
@treturn kvm.virtio the device
@raise on a bad offset or size, or a closed device
*/
static int l_virtio_write(lua_State *L) {
  Virtio *v = checkvirtio(L);
  unsigned size;
  uint64_t off = check_access(L, &size);
  uint64_t val = (uint64_t)luaL_checkinteger(L, 4);
  uint8_t data[8];
  for (unsigned i = 0; i < 8; i++) data[i] = (uint8_t)(val >> (8 * i));
  kvm_device_lock_lua(L, &v->dev);
  virtio_mmio(v, off, 1, size, data);
  pthread_mutex_unlock(&v->dev.lock);
  lua_settop(L, 1);
  return 1;
}

/*** What the device is and what state the driver left it in.
@function info
@treturn table `{kind = "virtio-blk", device_id =, base =, size = 0x200, irq =,
  status =, features = offered, driver_features =, isr =, queues = {{num =,
  ready =, desc =, avail =, used =, last_avail =, used_idx =}, ...}, error =
  why the device needs a reset, or nil}`
@raise on a closed device
*/
static int l_virtio_info(lua_State *L) {
  Virtio *v = checkvirtio(L);
  kvm_device_lock_lua(L, &v->dev);
  Virtio s = *v;                      /* a snapshot: nothing below may raise under the lock */
  pthread_mutex_unlock(&v->dev.lock);
  lua_createtable(L, 0, 12);
  lua_pushstring(L, s.type->kind); lua_setfield(L, -2, "kind");
  lua_pushinteger(L, s.type->device_id); lua_setfield(L, -2, "device_id");
  lua_pushinteger(L, (lua_Integer)s.base); lua_setfield(L, -2, "base");
  lua_pushinteger(L, VIRTIO_MMIO_SIZE); lua_setfield(L, -2, "size");
  lua_pushinteger(L, s.irq); lua_setfield(L, -2, "irq");
  lua_pushinteger(L, s.status); lua_setfield(L, -2, "status");
  lua_pushinteger(L, (lua_Integer)s.features); lua_setfield(L, -2, "features");
  lua_pushinteger(L, (lua_Integer)s.driver_features); lua_setfield(L, -2, "driver_features");
  lua_pushinteger(L, s.isr); lua_setfield(L, -2, "isr");
  if (s.error) { lua_pushstring(L, s.error); lua_setfield(L, -2, "error"); }
  lua_createtable(L, s.type->nqueues, 0);
  for (int i = 0; i < s.type->nqueues; i++) {
    const VirtioQueue *q = &s.q[i];
    lua_createtable(L, 0, 7);
    lua_pushinteger(L, q->num); lua_setfield(L, -2, "num");
    lua_pushboolean(L, q->ready != 0); lua_setfield(L, -2, "ready");
    lua_pushinteger(L, (lua_Integer)q->desc); lua_setfield(L, -2, "desc");
    lua_pushinteger(L, (lua_Integer)q->avail); lua_setfield(L, -2, "avail");
    lua_pushinteger(L, (lua_Integer)q->used); lua_setfield(L, -2, "used");
    lua_pushinteger(L, q->last_avail); lua_setfield(L, -2, "last_avail");
    lua_pushinteger(L, q->used_idx); lua_setfield(L, -2, "used_idx");
    lua_rawseti(L, -2, i + 1);
  }
  lua_setfield(L, -2, "queues");
  return 1;
}

static int l_virtio_tostring(lua_State *L) {
  Virtio *v = luaL_checkudata(L, 1, VIRTIO_MT);
  if (v->dev.closed) lua_pushfstring(L, "kvm.virtio %s (closed)", v->type->kind);
  else {
    char b[80];
    snprintf(b, sizeof b, "kvm.virtio %s at 0x%llx irq %d", v->type->kind, (unsigned long long)v->base, v->irq);
    lua_pushstring(L, b);
  }
  return 1;
}

static void push_class(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"read", l_virtio_read}, {"write", l_virtio_write}, {"info", l_virtio_info}, {NULL, NULL}
  };
  static const luaL_Reg meta[] = { {"__tostring", l_virtio_tostring}, {NULL, NULL} };
  if (luaL_getmetatable(L, VIRTIO_MT) == LUA_TNIL) kvm_new_class(L, VIRTIO_MT, methods, meta);
  lua_pop(L, 1);
}

#define VIRTIO_BASE  0xfeb00000u     /* default slots: 0xfeb00000 + k * 0x200, as QEMU microvm */
#define VIRTIO_SLOTS 64
#define VIRTIO_IRQ   16              /* default GSIs 16..23: IOAPIC pins no ISA device uses */

static lua_Integer opt_integer(lua_State *L, const char *k, lua_Integer dflt, lua_Integer lo,
                               lua_Integer hi, const char *range, const char *kind) {
  int isnum = 1;
  lua_Integer v = dflt;
  if (lua_getfield(L, 2, k) != LUA_TNIL) v = lua_tointegerx(L, -1, &isnum);
  if (!isnum || v < lo || v > hi)
    luaL_error(L, "vm:%s: '%s' must be an integer in %s, got %s", kind, k, range,
               luaL_tolstring(L, -1, NULL));
  lua_pop(L, 1);
  return v;
}

Virtio *virtio_new(lua_State *L, size_t size, const DeviceOps *ops, const VirtioType *type,
                   uint64_t features, const char *const *extra_keys) {
  Vm *vm = kvm_checkvm(L, 1);
  char method[32];                      /* "virtio-blk": the method is virtio_blk */
  snprintf(method, sizeof method, "%s", type->kind);
  for (char *p = method; *p; p++) if (*p == '-') *p = '_';
  kvm_opt_table(L, 2);
  lua_pushnil(L);
  while (lua_next(L, 2)) {              /* unknown keys are typos */
    const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
    int ok = k && (strcmp(k, "base") == 0 || strcmp(k, "irq") == 0);
    for (int i = 0; k && !ok && extra_keys && extra_keys[i]; i++) ok = strcmp(k, extra_keys[i]) == 0;
    if (!ok) luaL_error(L, "vm:%s: unknown option '%s'", method, luaL_tolstring(L, -2, NULL));
    lua_pop(L, 1);
  }
  /* the default: the first free slot, and GSI 16 + its number */
  int slot = 0;
  char buf[128];
  while (slot < VIRTIO_SLOTS && bus_clash(&vm->mmio, 1, VIRTIO_BASE + slot * VIRTIO_MMIO_SIZE,
                                          VIRTIO_BASE + (slot + 1) * VIRTIO_MMIO_SIZE - 1, buf, sizeof buf))
    slot++;
  lua_Integer base = opt_integer(L, "base", VIRTIO_BASE + (lua_Integer)slot * VIRTIO_MMIO_SIZE, 0,
                                 0xfffffffffe00ll, "0..0xfffffffffe00", method);
  if (base & (VIRTIO_MMIO_SIZE - 1)) luaL_error(L, "vm:%s: 'base' must be 0x200-aligned", method);
  lua_Integer irq = opt_integer(L, "irq", VIRTIO_IRQ + slot, 0, 23, "0..23", method);
  const char *clash = bus_clash(&vm->mmio, 1, (uint64_t)base, (uint64_t)base + VIRTIO_MMIO_SIZE - 1,
                                buf, sizeof buf);
  if (clash) luaL_error(L, "vm:%s: %s", method, clash);
  kvm_device_room(L, vm);
  push_class(L);
  Virtio *v = kvm_device_new(L, 1, size, ops);
  virtio_init(v, type, (uint64_t)base, (int)irq, features);
  lua_pushvalue(L, 1);
  lua_setiuservalue(L, -2, 1);           /* the device pins its VM */
  luaL_setmetatable(L, VIRTIO_MT);
  bus_claim(L, &vm->mmio, 1, (uint64_t)base, (uint64_t)base + VIRTIO_MMIO_SIZE - 1, &v->dev);
  return v;
}
