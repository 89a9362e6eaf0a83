/*
** virtio_rng.c - a virtio entropy device (virtio 1.2, 5.4): one queue whose
** writable buffers the device fills from the host's getrandom(2), at most
** 64 KiB per request (the driver asks again for more). Linux's virtio-rng
** driver makes it the hw_random source ("virtio_rng.0").
*/

/*** vm:virtio_rng, below, is a method of kvm.vm.
@classmod kvm.vm
*/
#define _GNU_SOURCE
#include <errno.h>
#include <sys/random.h>

#include "virtio.h"

#define RNG_ID        4
#define RNG_MAX_BYTES (64u << 10)

typedef struct Rng {
  Virtio v;                      /* first: an Rng is a Virtio */
  uint64_t bytes;
} Rng;

static int rng_request(Virtio *v, int q, VirtioChain *c, uint32_t *written) {
  Rng *r = (Rng *)v;
  uint64_t want = c->wlen < RNG_MAX_BYTES ? c->wlen : RNG_MAX_BYTES;
  uint64_t done = 0;
  for (int i = 0; i < c->n && done < want; i++) {
    const VirtioSeg *s = &c->seg[i];
    if (!s->write) continue;
    uint64_t n = s->len < want - done ? s->len : want - done;
    uint64_t got = 0;
    while (got < n) {
      ssize_t k = getrandom(s->p + got, (size_t)(n - got), 0);
      if (k < 0 && errno == EINTR) continue;
      if (k <= 0) break;
      got += (uint64_t)k;
    }
    done += got;
    if (got < n) break;
  }
  r->bytes += done;
  *written = (uint32_t)done;
  return 0;
}

static void rng_stats(Virtio *v, lua_State *L) {
  kvm_add_count(L, "rng_bytes", ((Rng *)v)->bytes);
}

/* a snapshot holds nothing of it beyond the transport's state */
static const VirtioType rng_type = {
  .kind = "virtio-rng",
  .device_id = RNG_ID,
  .nqueues = 1,
  .request = rng_request,
  .stats = rng_stats,
};

static const DeviceOps rng_ops = {
  .kind = "virtio-rng",
  .access = virtio_access,
  .close = virtio_close,
  .stats = virtio_stats,
  .save = virtio_save,
  .restore = virtio_restore,
};

/*** Attach a virtio entropy device (virtio-mmio) fed by the host's
getrandom(2). The guest finds it through the ACPI DSDT (kvm.acpi's `virtio`
option); Linux's virtio-rng driver makes it a hw_random source.
@function vm:virtio_rng
@tparam[opt] table opts `base`, `irq` as for `vm:virtio_blk`
@treturn kvm.virtio the device
@raise on a bad option or a taken address range
*/
int l_vm_virtio_rng(lua_State *L) {
  virtio_new(L, sizeof(Rng), &rng_ops, &rng_type, 0, NULL);
  return 1;
}
