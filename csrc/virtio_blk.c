/*
** virtio_blk.c - a virtio block device (virtio 1.2, 5.2) over a raw image
** file, read-write or read-only (opened O_RDONLY, VIRTIO_BLK_F_RO offered,
** writes fail with IOERR). Requests: IN (read), OUT (write), FLUSH
** (fdatasync: what the guest synced is on the host's disk), GET_ID (the
** serial) and, where the image's file system can punch holes (probed at
** creation: a punch past the end of the file) on a writable disk, DISCARD
** (fallocate PUNCH_HOLE: the file's blocks are freed) and WRITE_ZEROES
** (PUNCH_HOLE with the unmap flag, else ZERO_RANGE, else zeros written).
** Other types answer UNSUPP. Reads and writes go straight between the file
** and the guest's buffers (pread/pwrite), on the vCPU thread that notified.
**
** A request is the chain's readable stream (a 16-byte header {type, reserved,
** sector}, then for OUT the data) and its writable stream (for IN the data,
** then always one status byte), however the driver splits them into buffers.
** Sectors are 512 bytes; the capacity is the file's size in whole sectors at
** creation; a request past it, or of a length not a multiple of 512, gets
** IOERR. A DISCARD or WRITE_ZEROES request's data is an array of 16-byte
** segments {sector, num_sectors, flags}: all are checked before any is done
** (a length not a multiple of 16, no segment or more than max_discard_seg,
** a segment of more than max_discard_sectors or outside the disk: IOERR; a
** flag other than WRITE_ZEROES' unmap: UNSUPP).
*/

/*** vm:virtio_blk, below, is a method of kvm.vm.
@classmod kvm.vm
*/
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <limits.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "snapdev.h"
#include "virtio.h"

#define BLK_ID            2
#define BLK_F_SEG_MAX     (1ull << 2)
#define BLK_F_RO          (1ull << 5)
#define BLK_F_FLUSH       (1ull << 9)
#define BLK_F_DISCARD     (1ull << 13)
#define BLK_F_WRITE_ZEROES (1ull << 14)

enum { T_IN = 0, T_OUT = 1, T_FLUSH = 4, T_GET_ID = 8, T_DISCARD = 11, T_WRITE_ZEROES = 13 };
enum { S_OK = 0, S_IOERR = 1, S_UNSUPP = 2 };

#define SECTOR   512
#define ID_BYTES 20
#define DISCARD_SEG_MAX      32                /* segments per DISCARD/WRITE_ZEROES request */
#define DISCARD_SECTORS_MAX  (1u << 22)        /* sectors per segment: 2 GiB */
#define F_UNMAP              1u                /* WRITE_ZEROES: the sectors may be deallocated */

/* config space offsets (5.2.4, struct virtio_blk_config) */
enum { C_CAPACITY = 0, C_SEG_MAX = 12, C_MAX_DISCARD_SECTORS = 36, C_MAX_DISCARD_SEG = 40,
       C_DISCARD_ALIGNMENT = 44, C_MAX_WRITE_ZEROES_SECTORS = 48, C_MAX_WRITE_ZEROES_SEG = 52,
       C_WRITE_ZEROES_MAY_UNMAP = 56 };

typedef struct Blk {
  Virtio v;                      /* first: a Blk is a Virtio */
  int fd;                        /* -1: closed */
  int readonly;
  uint64_t sectors;
  char serial[ID_BYTES];
  uint64_t reads, writes, flushes, read_bytes, write_bytes, io_errors, discards, write_zeroes;
  uint64_t request_ns, io_ns;    /* time in requests, of which in preadv/pwritev */
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
  uint64_t t0 = kvm_now_ns();
  int r = io_all(b->fd, to_file, iov, n, pos);
  b->io_ns += kvm_now_ns() - t0;
  return r;
}

static uint32_t get32le(const uint8_t *p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t get64le(const uint8_t *p) { return get32le(p) | (uint64_t)get32le(p + 4) << 32; }
static void put32le(uint8_t *p, uint32_t v) {
  for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

/* the data's sectors lie inside the disk */
static int in_disk(const Blk *b, uint64_t sector, uint64_t bytes) {
  return bytes % SECTOR == 0 && sector <= b->sectors && bytes / SECTOR <= b->sectors - sector;
}

static int blk_handle(Blk *b, VirtioChain *c, uint32_t *written);

/* one request, timed (blk_request_ns: the device's share of a request) */
static int blk_request(Virtio *v, int q, VirtioChain *c, uint32_t *written) {
  Blk *b = (Blk *)v;
  uint64_t t0 = kvm_now_ns();
  int r = blk_handle(b, c, written);
  b->request_ns += kvm_now_ns() - t0;
  return r;
}

/* zeros written over [pos, pos + len): where the file system has no ZERO_RANGE */
static int write_zeros(int fd, uint64_t pos, uint64_t len) {
  static const uint8_t zeros[64 << 10];
  while (len > 0) {
    size_t k = len < sizeof zeros ? (size_t)len : sizeof zeros;
    ssize_t r = pwrite(fd, zeros, k, (off_t)pos);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return -1;
    pos += (uint64_t)r;
    len -= (uint64_t)r;
  }
  return 0;
}

/* DISCARD or WRITE_ZEROES: every segment checked, then each done; a status */
static uint8_t blk_discard(Blk *b, const VirtioChain *c, uint32_t type) {
  uint8_t seg[DISCARD_SEG_MAX][16];
  uint64_t bytes = c->rlen - 16;
  uint64_t n = bytes / 16;
  if (bytes % 16 != 0 || n == 0 || n > DISCARD_SEG_MAX) return S_IOERR;
  if (virtio_chain_read(c, 16, seg, bytes) != bytes) return S_IOERR;
  for (uint64_t i = 0; i < n; i++) {
    uint32_t num = get32le(seg[i] + 8), flags = get32le(seg[i] + 12);
    if (flags & ~(type == T_WRITE_ZEROES ? F_UNMAP : 0u)) return S_UNSUPP;
    if (num > DISCARD_SECTORS_MAX || !in_disk(b, get64le(seg[i]), (uint64_t)num * SECTOR)) return S_IOERR;
  }
  for (uint64_t i = 0; i < n; i++) {
    off_t pos = (off_t)(get64le(seg[i]) * SECTOR), len = (off_t)get32le(seg[i] + 8) * SECTOR;
    uint32_t flags = get32le(seg[i] + 12);
    if (len == 0) continue;
    uint64_t t0 = kvm_now_ns();
    int r;
    if (type == T_DISCARD || (flags & F_UNMAP)) {
      r = fallocate(b->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, pos, len);
    } else {
      r = fallocate(b->fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, pos, len);
      if (r < 0 && errno == EOPNOTSUPP) r = write_zeros(b->fd, (uint64_t)pos, (uint64_t)len);
    }
    b->io_ns += kvm_now_ns() - t0;
    if (r < 0) return S_IOERR;
  }
  if (type == T_DISCARD) b->discards++; else b->write_zeroes++;
  return S_OK;
}

static int blk_handle(Blk *b, VirtioChain *c, uint32_t *written) {
  Virtio *v = &b->v;
  uint8_t hdr[16];
  if (c->wlen < 1) { v->error = "a block request without a status byte"; return -1; }
  uint64_t status_at = c->wlen - 1;
  uint8_t st = S_IOERR;
  *written = 1;
  if (virtio_chain_read(c, 0, hdr, sizeof hdr) == sizeof hdr) {
    uint32_t type = get32le(hdr);
    uint64_t sector = get64le(hdr + 8);
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
    case T_DISCARD:
    case T_WRITE_ZEROES:
      /* only when negotiated: offered on a writable disk whose file punches holes */
      if (!(v->driver_features & (type == T_DISCARD ? BLK_F_DISCARD : BLK_F_WRITE_ZEROES))) st = S_UNSUPP;
      else st = blk_discard(b, c, type);
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
  kvm_add_count(L, "blk_discards", b->discards);
  kvm_add_count(L, "blk_write_zeroes", b->write_zeroes);
  kvm_add_count(L, "blk_request_ns", b->request_ns);
  kvm_add_count(L, "blk_io_ns", b->io_ns);
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
  the file is opened O_RDONLY and the guest told it is read-only), `discard`
  (default true: DISCARD and WRITE_ZEROES are offered when the disk is
  writable and its file's file system can punch holes; false never), `serial`
  (GET_ID's answer, at most 20 bytes, default "luakvm"), `base` (the 0x200
  bytes of registers, 0x200-aligned, default the first free slot from
  0xfeb00000), `irq` (the GSI, 0..23, default 16 + the slot's number)
@treturn kvm.virtio the device
@return[2] fail, "open disk.img: No such file or directory", errno
@raise on a bad option or a taken address range
*/
int l_vm_virtio_blk(lua_State *L) {
  static const char *const keys[] = {"path", "readonly", "discard", "serial", NULL};
  kvm_checkvm(L, 1);
  kvm_opt_table(L, 2);
  if (lua_getfield(L, 2, "path") != LUA_TSTRING)
    luaL_error(L, "vm:virtio_blk: 'path' (a string) is required");
  const char *path = lua_tostring(L, -1);
  lua_getfield(L, 2, "readonly");
  if (!lua_isnil(L, -1) && !lua_isboolean(L, -1)) luaL_error(L, "vm:virtio_blk: 'readonly' must be a boolean");
  int ro = lua_toboolean(L, -1);
  lua_getfield(L, 2, "discard");
  if (!lua_isnil(L, -1) && !lua_isboolean(L, -1)) luaL_error(L, "vm:virtio_blk: 'discard' must be a boolean");
  int want_discard = lua_isnil(L, -1) || lua_toboolean(L, -1);
  lua_pop(L, 1);
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
  put32le(cfg + C_CAPACITY, (uint32_t)b->sectors);
  put32le(cfg + C_CAPACITY + 4, (uint32_t)(b->sectors >> 32));
  put32le(cfg + C_SEG_MAX, VIRTIO_QUEUE_MAX - 2);                           /* header and status */
  /* the probe: a hole punched past the end of the file changes nothing, and
     fails where the file system (or a read-only descriptor) cannot punch */
  if (!ro && want_discard &&
      fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, sb.st_size, SECTOR) == 0) {
    b->v.features |= BLK_F_DISCARD | BLK_F_WRITE_ZEROES;
    uint32_t align = sb.st_blksize >= SECTOR ? (uint32_t)(sb.st_blksize / SECTOR) : 1;
    put32le(cfg + C_MAX_DISCARD_SECTORS, DISCARD_SECTORS_MAX);
    put32le(cfg + C_MAX_DISCARD_SEG, DISCARD_SEG_MAX);
    put32le(cfg + C_DISCARD_ALIGNMENT, align);
    put32le(cfg + C_MAX_WRITE_ZEROES_SECTORS, DISCARD_SECTORS_MAX);
    put32le(cfg + C_MAX_WRITE_ZEROES_SEG, DISCARD_SEG_MAX);
    cfg[C_WRITE_ZEROES_MAY_UNMAP] = 1;
  }
  return 1;
}
