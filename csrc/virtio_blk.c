/*
** virtio_blk.c - a virtio block device (virtio 1.2, 5.2) over a raw image
** file, read-write or read-only (opened O_RDONLY, VIRTIO_BLK_F_RO offered,
** writes fail with IOERR). Requests: IN (read), OUT (write), FLUSH
** (fdatasync: what the guest synced is on the host's disk) and GET_ID (the
** serial). Other types answer UNSUPP. Reads and writes go straight between
** the file and the guest's buffers (pread/pwrite), on the vCPU thread that
** notified.
**
** A request is the chain's readable stream (a 16-byte header {type, reserved,
** sector}, then for OUT the data) and its writable stream (for IN the data,
** then always one status byte), however the driver splits them into buffers.
** Sectors are 512 bytes; the capacity is the file's size in whole sectors at
** creation; a request past it, or of a length not a multiple of 512, gets
** IOERR.
*/

/*** vm:virtio_blk, below, is a method of kvm.vm.
@classmod kvm.vm
*/
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <limits.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "snapdev.h"
#include "virtio.h"

#define BLK_ID            2
#define BLK_F_SEG_MAX     (1ull << 2)
#define BLK_F_RO          (1ull << 5)
#define BLK_F_FLUSH       (1ull << 9)

enum { T_IN = 0, T_OUT = 1, T_FLUSH = 4, T_GET_ID = 8 };
enum { S_OK = 0, S_IOERR = 1, S_UNSUPP = 2 };

#define SECTOR   512
#define ID_BYTES 20

typedef struct Blk {
  Virtio v;                      /* first: a Blk is a Virtio */
  int fd;                        /* -1: closed */
  int readonly;
  uint64_t sectors;
  char serial[ID_BYTES];
  uint64_t reads, writes, flushes, read_bytes, write_bytes, io_errors;
} Blk;

/* preadv or pwritev all of iov[0..n) at pos (iov is consumed): 0, or -1 */
static int io_all(int fd, int write, struct iovec *iov, int n, uint64_t pos) {
  for (;;) {
    while (n > 0 && iov->iov_len == 0) { iov++; n--; }   /* nothing to move there */
    if (n == 0) return 0;
    int cnt = n > IOV_MAX ? IOV_MAX : n;
    ssize_t r = write ? pwritev(fd, iov, cnt, (off_t)pos) : preadv(fd, iov, cnt, (off_t)pos);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return -1;
    pos += (uint64_t)r;
    while (n > 0 && (size_t)r >= iov->iov_len) { r -= (ssize_t)iov->iov_len; iov++; n--; }
    if (n > 0) { iov->iov_base = (uint8_t *)iov->iov_base + r; iov->iov_len -= (size_t)r; }
  }
}

/* len bytes of the chain's readable (to_file: file <- guest) or writable
   (file -> guest) stream, from stream offset skip, at file offset pos: one
   preadv or pwritev over the guest's buffers */
static int blk_io(Blk *b, const VirtioChain *c, int to_file, uint64_t skip, uint64_t len, uint64_t pos) {
  struct iovec iov[VIRTIO_QUEUE_MAX];
  int n = 0;
  uint64_t at = 0, want = len;
  for (int i = 0; i < c->n && want > 0; i++) {
    const VirtioSeg *s = &c->seg[i];
    if (s->write == to_file) continue;    /* readable buffers feed the file, writable ones take it */
    uint64_t end = at + s->len;
    if (skip < end) {
      uint64_t from = skip > at ? skip - at : 0;
      uint64_t k = s->len - from;
      if (k > want) k = want;
      iov[n].iov_base = s->p + from;
      iov[n].iov_len = (size_t)k;
      n++;
      want -= k; skip += k;
    }
    at = end;
  }
  if (want != 0) return -1;
  return io_all(b->fd, to_file, iov, n, pos);
}

/* the data's sectors lie inside the disk */
static int in_disk(const Blk *b, uint64_t sector, uint64_t bytes) {
  return bytes % SECTOR == 0 && sector <= b->sectors && bytes / SECTOR <= b->sectors - sector;
}

static int blk_request(Virtio *v, int q, VirtioChain *c, uint32_t *written) {
  Blk *b = (Blk *)v;
  uint8_t hdr[16];
  if (c->wlen < 1) { v->error = "a block request without a status byte"; return -1; }
  uint64_t status_at = c->wlen - 1;
  uint8_t st = S_IOERR;
  *written = 1;
  if (virtio_chain_read(c, 0, hdr, sizeof hdr) == sizeof hdr) {
    uint32_t type = (uint32_t)hdr[0] | (uint32_t)hdr[1] << 8 | (uint32_t)hdr[2] << 16 | (uint32_t)hdr[3] << 24;
    uint64_t sector = 0;
    for (int i = 7; i >= 0; i--) sector = sector << 8 | hdr[8 + i];
    switch (type) {
    case T_IN: {
      uint64_t n = status_at;
      if (in_disk(b, sector, n) && blk_io(b, c, 0, 0, n, sector * SECTOR) == 0) {
        st = S_OK;
        b->reads++;
        b->read_bytes += n;
        *written = (uint32_t)(n + 1 > UINT32_MAX ? UINT32_MAX : n + 1);
      }
      break;
    }
    case T_OUT: {
      uint64_t n = c->rlen - sizeof hdr;
      if (!b->readonly && in_disk(b, sector, n) && blk_io(b, c, 1, sizeof hdr, n, sector * SECTOR) == 0) {
        st = S_OK;
        b->writes++;
        b->write_bytes += n;
      }
      break;
    }
    case T_FLUSH:
      b->flushes++;
      if (b->readonly || fdatasync(b->fd) == 0) st = S_OK;
      break;
    case T_GET_ID: {
      uint64_t n = status_at < ID_BYTES ? status_at : ID_BYTES;
      virtio_chain_write(c, 0, b->serial, n);
      *written = (uint32_t)n + 1;
      st = S_OK;
      break;
    }
    default:
      st = S_UNSUPP;
      break;
    }
  }
  if (st == S_IOERR) { b->io_errors++; *written = 1; }
  virtio_chain_write(c, status_at, &st, 1);
  return 0;
}

static void blk_close(Virtio *v) {
  Blk *b = (Blk *)v;
  if (b->fd >= 0) close(b->fd);
  b->fd = -1;
}

static void blk_stats(Virtio *v, lua_State *L) {
  Blk *b = (Blk *)v;
  kvm_add_count(L, "blk_reads", b->reads);
  kvm_add_count(L, "blk_writes", b->writes);
  kvm_add_count(L, "blk_read_bytes", b->read_bytes);
  kvm_add_count(L, "blk_write_bytes", b->write_bytes);
  kvm_add_count(L, "blk_flushes", b->flushes);
  kvm_add_count(L, "blk_io_errors", b->io_errors);
}

/* Version 1 of a block device's own state, after the transport's: the
   disk's size in sectors (u64) and whether it is read-only (u32). Nothing
   else is the device's (a request is done when its notify returns); the
   two are checked, not taken: the guest's driver and file systems know the
   disk's geometry, so a restore onto another disk is refused. The disk's
   contents are the file's: a snapshot does not copy them. */
#define BLK_SNAP_VERSION 1

static int blk_save(Virtio *v, SnapBuf *sb, char *err, size_t errlen) {
  Blk *b = (Blk *)v;
  snapbuf_u32(sb, BLK_SNAP_VERSION);
  snapbuf_u64(sb, b->sectors);
  snapbuf_u32(sb, (uint32_t)b->readonly);
  return snapdev_saved(sb, err, errlen);
}

static int blk_restore(Virtio *v, const uint8_t *p, size_t n, int apply, char *err, size_t errlen) {
  Blk *b = (Blk *)v;
  SnapRd r = { p, n, 0, 0 };
  if (snapdev_version(&r, BLK_SNAP_VERSION, err, errlen) < 0) return -1;
  uint64_t sectors = snaprd_u64(&r);
  uint32_t ro = snaprd_u32(&r);
  if (snapdev_end(&r, err, errlen) < 0) return -1;
  if (sectors != b->sectors)
    return snapdev_fail(err, errlen, "a disk of %llu sectors, this one has %llu",
                        (unsigned long long)sectors, (unsigned long long)b->sectors);
  if (ro > 1 || (int)ro != b->readonly)
    return snapdev_fail(err, errlen, "a %s disk, this one is %s", ro ? "read-only" : "read-write",
                        b->readonly ? "read-only" : "read-write");
  return 0;
}

static const VirtioType blk_type = {
  .kind = "virtio-blk",
  .device_id = BLK_ID,
  .nqueues = 1,
  .request = blk_request,
  .close = blk_close,
  .stats = blk_stats,
  .save = blk_save,
  .restore = blk_restore,
};

static const DeviceOps blk_ops = {
  .kind = "virtio-blk",
  .access = virtio_access,
  .close = virtio_close,
  .stats = virtio_stats,
  .save = virtio_save,
  .restore = virtio_restore,
};

/*** Attach a virtio block device (virtio-mmio) backed by a raw image file.
The guest finds it through the ACPI DSDT (kvm.acpi's `virtio` option: a
`LNRO0005` device with this base and irq); Linux's virtio_mmio and
virtio_blk drivers make it /dev/vda (the first), /dev/vdb...
@function vm:virtio_blk
@tparam table opts `path` (the image, required), `readonly` (default false:
  the file is opened O_RDONLY and the guest told it is read-only), `serial`
  (GET_ID's answer, at most 20 bytes, default "luakvm"), `base` (the 0x200
  bytes of registers, 0x200-aligned, default the first free slot from
  0xfeb00000), `irq` (the GSI, 0..23, default 16 + the slot's number)
@treturn kvm.virtio the device
@return[2] fail, "open disk.img: No such file or directory", errno
@raise on a bad option or a taken address range
*/
int l_vm_virtio_blk(lua_State *L) {
  static const char *const keys[] = {"path", "readonly", "serial", NULL};
  kvm_checkvm(L, 1);
  kvm_opt_table(L, 2);
  if (lua_getfield(L, 2, "path") != LUA_TSTRING)
    luaL_error(L, "vm:virtio_blk: 'path' (a string) is required");
  const char *path = lua_tostring(L, -1);
  lua_getfield(L, 2, "readonly");
  if (!lua_isnil(L, -1) && !lua_isboolean(L, -1)) luaL_error(L, "vm:virtio_blk: 'readonly' must be a boolean");
  int ro = lua_toboolean(L, -1);
  size_t slen = 6;
  const char *serial = "luakvm";
  if (lua_getfield(L, 2, "serial") != LUA_TNIL) {
    if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "vm:virtio_blk: 'serial' must be a string");
    serial = lua_tolstring(L, -1, &slen);
    if (slen > ID_BYTES) luaL_error(L, "vm:virtio_blk: 'serial' is at most %d bytes", ID_BYTES);
  }
  lua_pop(L, 1);                        /* path and serial stay referenced by the options table */
  lua_pop(L, 2);
  uint64_t features = BLK_F_SEG_MAX | BLK_F_FLUSH | (ro ? BLK_F_RO : 0);
  Blk *b = (Blk *)virtio_new(L, sizeof(Blk), &blk_ops, &blk_type, features, keys);
  b->fd = -1;                           /* closed until the file opens */
  b->readonly = ro;
  memcpy(b->serial, serial, slen);
  int fd = open(path, (ro ? O_RDONLY : O_RDWR) | O_CLOEXEC);
  struct stat sb;
  if (fd >= 0 && fstat(fd, &sb) < 0) { int en = errno; close(fd); fd = -1; errno = en; }
  if (fd < 0) {
    int en = errno;
    kvm_device_remove(L, 1, &b->v.dev);
    const char *what = lua_pushfstring(L, "open %s", path);
    errno = en;
    return kvm_fail(L, what);
  }
  b->fd = fd;
  b->sectors = (uint64_t)sb.st_size / SECTOR;
  uint8_t *cfg = b->v.config;
  for (int i = 0; i < 8; i++) cfg[i] = (uint8_t)(b->sectors >> (8 * i));   /* capacity */
  uint32_t seg_max = VIRTIO_QUEUE_MAX - 2;                                 /* header and status */
  for (int i = 0; i < 4; i++) cfg[12 + i] = (uint8_t)(seg_max >> (8 * i));
  return 1;
}
