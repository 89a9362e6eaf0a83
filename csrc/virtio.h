/*
** virtio.h - the virtio-mmio transport (virtio.c) and what a device type
** built on it (virtio_blk.c, virtio_rng.c) provides: its id, features,
** config space and a handler for one descriptor chain.
**
** Model: the virtio 1.2 specification (4.2 "Virtio Over MMIO", 2.7 "Split
** Virtqueues"); kvmtool's virtio/mmio.c and Firecracker's mmio.rs for the
** shape of a device on an MMIO bus.
*/
#ifndef LUAKVM_VIRTIO_H
#define LUAKVM_VIRTIO_H

#include <stdint.h>

#include "luakvm.h"

#define VIRTIO_MT          "kvm.virtio"
#define VIRTIO_MMIO_SIZE   0x200     /* registers 0x000-0x0ff, config 0x100-0x1ff */
#define VIRTIO_CONFIG_MAX  0x100
#define VIRTIO_MAX_QUEUES  2
#define VIRTIO_QUEUE_MAX   256       /* QueueNumMax: descriptors per queue */
#define VIRTIO_ERROR_MAX   96        /* a restored error message, its NUL included */

/* device status bits (2.1) */
#define VIRTIO_S_ACKNOWLEDGE  1
#define VIRTIO_S_DRIVER       2
#define VIRTIO_S_DRIVER_OK    4
#define VIRTIO_S_FEATURES_OK  8
#define VIRTIO_S_NEEDS_RESET  64
#define VIRTIO_S_FAILED       128

#define VIRTIO_F_VERSION_1    (1ull << 32)

/* interrupt status bits */
#define VIRTIO_ISR_USED    1
#define VIRTIO_ISR_CONFIG  2

/* one guest buffer of a chain, checked to lie in guest memory */
typedef struct VirtioSeg {
  uint8_t *p;
  uint32_t len;
  int write;                     /* device-writable */
} VirtioSeg;

/* a descriptor chain as the device sees it: the readable buffers first,
   then the writable ones, each as a byte stream */
typedef struct VirtioChain {
  VirtioSeg *seg;
  int n;
  uint64_t rlen, wlen;           /* bytes readable, writable */
} VirtioChain;

typedef struct Virtio Virtio;

typedef struct VirtioType {
  const char *kind;              /* vm:claims()'s kind: "virtio-blk" */
  uint32_t device_id;            /* 2 block, 4 entropy */
  int nqueues;
  /* one chain popped from queue q: handle it, set *written (bytes put in
     the writable buffers); 0, 1 to leave it (and the rest) in the queue for
     later (a console's receive buffers while no input waits), or -1 for a
     chain the device cannot accept (the device then needs a reset) */
  int (*request)(Virtio *v, int q, VirtioChain *c, uint32_t *written);
  void (*close)(Virtio *v);
  void (*stats)(Virtio *v, lua_State *L);
  /* snapshots: the type's own state, kept after the transport's (save
     appends it, a version first; restore checks it, apply 0, or takes it,
     apply 1, as DeviceOps.restore). NULL: none beyond the transport's */
  int (*save)(Virtio *v, SnapBuf *b, char *err, size_t errlen);
  int (*restore)(Virtio *v, const uint8_t *p, size_t n, int apply, char *err, size_t errlen);
} VirtioType;

typedef struct VirtioQueue {
  uint32_t num;                  /* QueueNum */
  uint32_t ready;
  uint64_t desc, avail, used;    /* guest-physical */
  uint16_t last_avail;           /* next avail ring entry to take */
  uint16_t used_idx;             /* next used ring entry to fill */
} VirtioQueue;

struct Virtio {
  Device dev;                    /* first: a Virtio is a Device */
  const VirtioType *type;
  uint64_t base;
  int irq;
  uint64_t features;             /* offered */
  uint64_t driver_features;      /* accepted by the driver */
  uint32_t dev_feat_sel, drv_feat_sel, queue_sel;
  uint32_t status, isr, config_gen;
  int irq_level;                 /* last level driven */
  VirtioQueue q[VIRTIO_MAX_QUEUES];
  uint8_t config[VIRTIO_CONFIG_MAX];
  uint32_t config_len;
  const char *error;             /* why the device needs a reset, or NULL */
  uint64_t notifies, chains, errors, irqs, irq_failures;
  VirtioSeg seg[VIRTIO_QUEUE_MAX];
  char error_buf[VIRTIO_ERROR_MAX];            /* error as a restored snapshot had it */
};

/* the transport's bus operations for a device type's DeviceOps */
int  virtio_access(Device *d, BusCall *bc, uint64_t addr, int is_write, unsigned size, uint8_t *data);
void virtio_close(Device *d);
void virtio_stats(Device *d, lua_State *L);
/* ... and its snapshot operations (the type's hooks are called from them) */
int  virtio_save(Device *d, SnapBuf *b, char *err, size_t errlen);
int  virtio_restore(Device *d, const uint8_t *p, size_t n, int apply, char *err, size_t errlen);
/* set up the transport of a new device (zeroed by kvm_device_new) */
void virtio_init(Virtio *v, const VirtioType *type, uint64_t base, int irq, uint64_t features);
/* a register access as the guest makes it (size 1, 2, 4 or 8; config space
   takes any, registers 4): the bus's access without the bus */
void virtio_mmio(Virtio *v, uint64_t off, int is_write, unsigned size, uint8_t *data);
/* take every available chain of queue q; returns the chains handled, or -1
   when the driver broke the rules (the device then needs a reset) */
int  virtio_queue_process(Virtio *v, int q);

/* copy out of / into a chain's readable / writable stream at off: bytes copied */
uint64_t virtio_chain_read(const VirtioChain *c, uint64_t off, void *buf, uint64_t len);
uint64_t virtio_chain_write(const VirtioChain *c, uint64_t off, const void *buf, uint64_t len);

/* for a vm:virtio_* method: the options (base, irq) at table index 2 and the
   checks every device makes; pushes the new device, pinning the VM */
Virtio *virtio_new(lua_State *L, size_t size, const DeviceOps *ops, const VirtioType *type,
                   uint64_t features, const char *const *extra_keys);

#endif
